"""What a run records: config.json, metrics.jsonl, samples.jsonl and the step line (rank 0 writes them all).

    logs.start(cfg, start_step)        # config.json; a resumed run drops log lines written after its checkpoint
    m = logs.step_metrics(...)         # every rank: the step's metrics, summed over ranks
    logs.log_step(out, metrics, ...)   # the step line, a metrics.jsonl row, a few completions in samples.jsonl
    logs.log_step(out, dict(step=0, **evals))   # step 0: the initial model's evals alone (train.py --eval_every)
"""
import dataclasses
import json
import os
import resource
import subprocess
import sys

import torch
import torch.distributed as dist

import distributed


def start(cfg, start):
    """Rank 0: config.json (the config that runs, argv, versions, git hash); the metrics.jsonl and samples.jsonl
    lines of steps after `start`, the checkpoint we resume from, are dropped (all of them when start is 0: a run
    that begins again also redoes its step-0 eval)."""
    import transformers
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        git = ""
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), git=git, argv=sys.argv, python=sys.version.split()[0],
                       torch=torch.__version__, transformers=transformers.__version__), f, indent=2)
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(cfg.out, name)
        if os.path.exists(path):
            kept = [l for l in open(path)  # (a line cut short by a kill has no newline)
                    if l.endswith("\n") and json.loads(l)["step"] <= start] if start else []
            open(path, "w").writelines(kept)


def peak_memory_gib(device, reset=False):
    """GiB: the GPU's max allocated since the last reset (then reset, if asked), or the process's max RSS (CPU)."""
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def step_metrics(cfg, step, epoch, ro, rewards, grades, sums, grad_norms, skipped, times, seq_lens, rollout_mem,
                 device):
    """One metrics.jsonl row: sums over all ranks (every rank calls this), then means. times: the step's five
    timestamps (start, rollout, reward, log-probs, update done)."""
    G = cfg.samples_per_prompt
    tot = dict(zip(sums, distributed.all_sum(list(sums.values()), device)))
    n_resp, reward_sum, zero_var, clip_n, len_sum, to_s, fail_n = distributed.all_sum([
        len(grades), rewards.sum().item(), (rewards.view(-1, G).std(1) == 0).sum().item(),
        sum(r == "length" for r in ro.finish_reason), ro.lengths.sum().item(),
        sum(g.status == "timeout" for g in grades), sum(g.status == "error" for g in grades)], device)
    lmax, lmin = ro.lengths.max().to(device), ro.lengths.min().to(device)  # (on the GPU for NCCL)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX)
        dist.all_reduce(lmin, op=dist.ReduceOp.MIN)
    t0, t1, t2, t3, t4 = times
    return dict(step=step, epoch=round(epoch, 4), reward=reward_sum / n_resp,
                zero_var_groups=zero_var / (n_resp / G), len_mean=len_sum / n_resp, len_max=int(lmax),
                len_min=int(lmin), clip_ratio=clip_n / n_resp, pg_loss=tot["pg"] / tot["tokens"],
                clip_frac=tot["clipped"] / tot["tokens"], kl=tot["kl"] / tot["tokens"],
                entropy=tot["entropy"] / tot["tokens"], grad_norm=sum(grad_norms) / len(grad_norms), lr=cfg.lr,
                skipped_updates=skipped, grade_timeouts=int(to_s), grade_errors=int(fail_n),
                t_rollout=t1 - t0, t_reward=t2 - t1, t_logprobs=t3 - t2, t_update=t4 - t3, t_step=t4 - t0,
                gen_tok_s=ro.lengths.sum().item() / (t1 - t0), train_tok_s=sum(seq_lens) / (t4 - t3),
                peak_mem_gib=max(rollout_mem, peak_memory_gib(device)), peak_mem_rollout_gib=rollout_mem)


def log_step(out, m, ro=None, texts=(), grades=(), golds=(), tokenizer=None):
    """Rank 0: the step's line, its metrics.jsonl row and a few completions in samples.jsonl (golds: per row). Eval
    accuracies (eval_<benchmark>) end the line; a row without a rollout (ro None: step 0) has only those."""
    train = "" if ro is None else (
        f" | reward {m['reward']:.3f} | len {m['len_mean']:.0f} | clip {m['clip_ratio']:.2f} | "
        f"kl {m['kl']:.2e} | ent {m['entropy']:.3f} | gnorm {m['grad_norm']:.3f} | "
        f"{m['t_step']:.1f}s (gen {m['t_rollout']:.1f} / logp {m['t_logprobs']:.1f} / upd {m['t_update']:.1f})")
    evals = "".join(f" | {k} {v:.1f}" for k, v in m.items() if k.startswith("eval_") and "/" not in k)
    print(f"step {m['step']}{train}{evals}" + (f" ({m['t_eval']:.0f}s eval)" if evals else ""))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(m) + "\n")
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        for b in range(min(4, len(texts))):  # a few completions per step
            f.write(json.dumps(dict(step=m["step"], prompt=tokenizer.decode(ro.prompt_ids[b]), response=texts[b],
                                    gold=golds[b], reward=grades[b].reward, pred=grades[b].pred,
                                    finish=ro.finish_reason[b])) + "\n")


def read_metrics(out):
    """The rows of out/metrics.jsonl (step 0, when there is one, holds evals only)."""
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.isfile(path) else []
