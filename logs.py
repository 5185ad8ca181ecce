"""What a run records: config.json, metrics.jsonl, samples.jsonl and the step line (rank 0 writes them all).

    logs.start(cfg, start_step)        # config.json; a resumed run drops log lines written after its checkpoint
    m = logs.step_metrics(...)         # every rank: the step's metrics, summed over ranks
    logs.log_step(out, metrics, ...)   # the step line, a metrics.jsonl row, a few completions in samples.jsonl
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
    lines of steps after `start`, the checkpoint we resume from, are dropped."""
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
                    if l.endswith("\n") and json.loads(l)["step"] <= start]
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
    """One metrics.jsonl row: sums over all ranks (every rank calls this), then means (loss stats: over the tokens
    trained on). times: the step's five timestamps (start, rollout, reward, log-probs, update done)."""
    G = cfg.samples_per_prompt
    groups = rewards.view(-1, G)  # (B/G, G)
    tot = dict(zip(sums, distributed.all_sum(list(sums.values()), device)))
    # zero-variance groups: all rewards equal, exactly (train.kept_responses' rule for --skip_zero_var)
    n_resp, reward_sum, zero_var, clip_n, len_sum, to_s, fail_n = distributed.all_sum([
        len(grades), rewards.sum().item(), (groups == groups[:, :1]).all(1).sum().item(),
        sum(r == "length" for r in ro.finish_reason), ro.lengths.sum().item(),
        sum(g.status == "timeout" for g in grades), sum(g.status == "error" for g in grades)], device)
    lmax, lmin = ro.lengths.max().to(device), ro.lengths.min().to(device)  # (on the GPU for NCCL)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX)
        dist.all_reduce(lmin, op=dist.ReduceOp.MIN)
    t0, t1, t2, t3, t4 = times
    n_tok = max(tot["tokens"], 1)  # 0 when --skip_zero_var / --mask_truncated left every response out
    return dict(step=step, epoch=round(epoch, 4), reward=reward_sum / n_resp,
                zero_var_groups=zero_var / (n_resp / G), len_mean=len_sum / n_resp, len_max=int(lmax),
                len_min=int(lmin), clip_ratio=clip_n / n_resp, pg_loss=tot["pg"] / n_tok,
                clip_frac=tot["clipped"] / n_tok, kl=tot["kl"] / n_tok, entropy=tot["entropy"] / n_tok,
                grad_norm=sum(grad_norms) / len(grad_norms), lr=cfg.lr, skipped_updates=skipped,
                skipped_groups=int(zero_var) if cfg.skip_zero_var else 0,  # left out of the update (all ranks)
                masked_responses=int(clip_n) if cfg.mask_truncated else 0,
                grade_timeouts=int(to_s), grade_errors=int(fail_n),
                t_rollout=t1 - t0, t_reward=t2 - t1, t_logprobs=t3 - t2, t_update=t4 - t3, t_step=t4 - t0,
                gen_tok_s=ro.lengths.sum().item() / (t1 - t0), train_tok_s=sum(seq_lens) / (t4 - t3),
                peak_mem_gib=max(rollout_mem, peak_memory_gib(device)), peak_mem_rollout_gib=rollout_mem)


def log_step(out, m, ro, texts, grades, golds, tokenizer):
    """Rank 0: the step's line, its metrics.jsonl row and a few completions in samples.jsonl (golds: per row)."""
    print(f"step {m['step']} | reward {m['reward']:.3f} | len {m['len_mean']:.0f} | clip {m['clip_ratio']:.2f} | "
          f"kl {m['kl']:.2e} | ent {m['entropy']:.3f} | gnorm {m['grad_norm']:.3f} | "
          f"{m['t_step']:.1f}s (gen {m['t_rollout']:.1f} / logp {m['t_logprobs']:.1f} / upd {m['t_update']:.1f})")
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(m) + "\n")
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        for b in range(min(4, len(texts))):  # a few completions per step
            f.write(json.dumps(dict(step=m["step"], prompt=tokenizer.decode(ro.prompt_ids[b]), response=texts[b],
                                    gold=golds[b], reward=grades[b].reward, pred=grades[b].pred,
                                    finish=ro.finish_reason[b])) + "\n")
