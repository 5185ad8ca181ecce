"""What a run records and shows (rank 0): config.json, metrics.jsonl, samples.jsonl, curves.png, the step line with
its ETA, the end-of-run line, and optionally the same metrics in Weights & Biases and TensorBoard.

    logs.check_packages(cfg)           # before any model loads: math-verify, wandb / tensorboard if asked
    rec = logs.start(cfg, start_step)  # config.json; trims log lines past the checkpoint; opens the sinks
    m = logs.step_metrics(...)         # every rank: the step's metrics, summed over ranks
    rec.log_step(m, ...)               # the step line, a metrics.jsonl row, a few completions, the sinks, curves.png
    rec.log_evals(dict(step=0, **evals))   # step 0: the initial model's evals alone (train.py --eval_every)
    rec.finish()                       # closes the sinks; one line naming the outputs
    logs.plot_curves(path, panels, title)  # the one plotting function: train.py's curves.png and eval.py's

Sinks: --wandb=PROJECT logs to a W&B run named after --out (WANDB_MODE=offline keeps it local, under OUT/wandb/);
--tensorboard writes event files to OUT/tb. Both get every metrics.jsonl key per step (as train/KEY; eval_B as
eval/B), the resolved config, and the step's sample completions (a W&B table, TensorBoard text). A resumed run
continues the same W&B run (its id is kept in OUT/wandb_id) and the same TensorBoard curves: the resumed writer purges
the events at and after its first step, so the steps a crashed process logged past its checkpoint are replaced. W&B
keeps the first values it got for a step, so steps it already has are not sent again (metrics.jsonl holds the
replay; on CPU it is identical).

ETA: elapsed is the time since this process's first step began; the time left is the mean wall time of this process's
steps so far (rollout to the next rollout: eval, checkpoints and logging included, since they recur) times the
steps left.
"""
import dataclasses
import importlib
import json
import math
import os
import resource
import subprocess
import sys
import textwrap
import time
import uuid

import torch
import torch.distributed as dist

import distributed


def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def check_packages(cfg, grading=True):
    """Exits with one line (naming the pip command) if a package the run will import later does not import:
    math-verify for grading (reward.py; grading=False: the caller grades), wandb for --wandb, tensorboard for
    --tensorboard. Without matplotlib, one warning: the run goes on without curves.png."""
    if not has_matplotlib():
        print("warning: no curves.png without the matplotlib package (pip install matplotlib)", file=sys.stderr)
    for needed, module, why, pip in [(grading, "math_verify", "grading", "math-verify"),
                                     (cfg.wandb, "wandb", f"--wandb={cfg.wandb}", "wandb"),
                                     (cfg.tensorboard, "torch.utils.tensorboard", "--tensorboard", "tensorboard")]:
        try:
            if needed:
                importlib.import_module(module)
        except ImportError as e:
            sys.exit(f"error: {why} needs the {pip} package ({e}); pip install {pip}")


def start(cfg, start):
    """Rank 0, before the first step: config.json (the config that runs, argv, versions, git hash); the
    metrics.jsonl and samples.jsonl lines of steps after `start`, the checkpoint we resume from, are dropped (all of
    them when start is 0: a run that begins again also redoes its step-0 eval); the sinks are opened. -> the Recorder
    of this process's steps."""
    import transformers
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        git = ""
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), git=git, argv=sys.argv, python=sys.version.split()[0],
                       torch=torch.__version__, transformers=transformers.__version__), f, indent=2)
    logged = [r["step"] for r in read_jsonl(os.path.join(cfg.out, "metrics.jsonl"))]  # by the previous process
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(cfg.out, name)
        if os.path.exists(path):
            kept = [l for l in open(path)  # (a line cut short by a kill has no newline)
                    if l.endswith("\n") and json.loads(l)["step"] <= start] if start else []
            open(path, "w").writelines(kept)
    return Recorder(cfg, start, max(logged, default=0))


def read_jsonl(path):
    """The complete lines of a .jsonl file as dicts ([] if there is no file)."""
    return [json.loads(l) for l in open(path) if l.endswith("\n")] if os.path.exists(path) else []


def peak_memory_gib(device, reset=False):
    """GiB: the GPU's max allocated since the last reset (then reset, if asked), or the process's max RSS (CPU)."""
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def memory_meaning(device):
    """What peak_memory_gib measures on this device, for the lines that print it."""
    return (f"torch max allocated on {device}; nvidia-smi adds the allocator's cache and the CUDA context"
            if device.type == "cuda" else "CPU: this process's max RSS so far")


def step_metrics(cfg, step, epoch, ro, rewards, grades, sums, grad_norms, skipped, times, seq_lens, rollout_mem,
                 device, lr, rollout_stats=None):
    """One metrics.jsonl row: sums over all ranks (every rank calls this), then means (loss stats: over the tokens
    trained on). rewards (B,): the ones trained on (shaped); accuracy: the fraction of grades that are correct.
    times: the step's five timestamps (start, rollout, reward, log-probs, update done). lr: this step's.
    rollout_stats: this rank's rollout.generate stats (rollout_metrics)."""
    G = cfg.samples_per_prompt
    groups = rewards.view(-1, G)  # (B/G, G)
    tot = dict(zip(sums, distributed.all_sum(list(sums.values()), device)))
    # zero-variance groups: all rewards equal, exactly (train.kept_responses' rule for --skip_zero_var)
    n_resp, reward_sum, correct_n, zero_var, clip_n, len_sum, to_s, fail_n = distributed.all_sum([
        len(grades), rewards.sum().item(), sum(g.correct for g in grades),
        (groups == groups[:, :1]).all(1).sum().item(),
        sum(r == "length" for r in ro.finish_reason), ro.lengths.sum().item(),
        sum(g.status == "timeout" for g in grades), sum(g.status == "error" for g in grades)], device)
    lmax, lmin = ro.lengths.max().to(device), ro.lengths.min().to(device)  # (on the GPU for NCCL)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX)
        dist.all_reduce(lmin, op=dist.ReduceOp.MIN)
    t0, t1, t2, t3, t4 = times
    n_tok = max(tot["tokens"], 1)  # 0 when --skip_zero_var / --mask_truncated left every response out
    return dict(step=step, epoch=round(epoch, 4), reward=reward_sum / n_resp, accuracy=correct_n / n_resp,
                zero_var_groups=zero_var / (n_resp / G), len_mean=len_sum / n_resp, len_max=int(lmax),
                len_min=int(lmin), clip_ratio=clip_n / n_resp, pg_loss=tot["pg"] / n_tok,
                clip_frac=tot["clipped"] / n_tok, kl=tot["kl"] / n_tok, entropy=tot["entropy"] / n_tok,
                grad_norm=sum(grad_norms) / len(grad_norms), lr=lr, skipped_updates=skipped,
                skipped_groups=int(zero_var) if cfg.skip_zero_var else 0,  # left out of the update (all ranks)
                masked_responses=int(clip_n) if cfg.mask_truncated else 0,
                grade_timeouts=int(to_s), grade_errors=int(fail_n),
                t_rollout=t1 - t0, t_reward=t2 - t1, t_logprobs=t3 - t2, t_update=t4 - t3, t_step=t4 - t0,
                gen_tok_s=ro.lengths.sum().item() / (t1 - t0), train_tok_s=sum(seq_lens) / (t4 - t3),
                peak_mem_gib=max(rollout_mem, peak_memory_gib(device)), peak_mem_rollout_gib=rollout_mem,
                **rollout_metrics(rollout_stats or {}))


def rollout_metrics(stats):
    """The metrics.jsonl keys of engine "slots"' stats (rollout._generate_slots; each rank's own rollout, rank 0's
    logged): its slots (and how many fit, uncapped, on GPU), decode forwards, the ideal count and their ratio, mean
    occupancy, forwards under a quarter full, prefill seconds, and on a GPU of rollout.GPU_PEAKS the HBM/compute
    roofline's share of the decode seconds. {} for engine "pad" (no stats): the keys are absent, not zero."""
    if not stats:
        return {}
    m = dict(rollout_slots=stats["slots"], rollout_forwards=stats["decode_forwards"],
             rollout_ideal_forwards=stats["ideal_forwards"], rollout_sched_eff=stats["schedule_efficiency"],
             rollout_occupancy=stats["occupancy"], rollout_tail_forwards=stats["tail_forwards"],
             t_prefill=stats["prefill_s"])
    if stats.get("slots_fit") is not None:
        m["rollout_slots_fit"] = stats["slots_fit"]
    if stats.get("roofline_s") is not None and stats["decode_s"] > 0:
        m["rollout_roofline"] = stats["roofline_s"] / stats["decode_s"]
    return m


def duration(seconds):
    """42s, 7m05s or 15h02m."""
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def refill_line(m):
    """--dynamic_sampling's part of the step line: generation batches, and the groups of them whose rewards differed
    (before the batch took prompts_per_step of them); "" without it."""
    if "gen_batches" not in m:
        return ""
    return f"refill {m['gen_batches']} batches: {m['gen_kept_groups']}/{m['gen_prompts']} groups differ | "


def eval_line(m):
    """The eval accuracies of a metrics row (eval_<benchmark>, %) as the end of its step line; "" when none."""
    accs = "".join(f" | {k} {v:.1f}" for k, v in m.items() if k.startswith("eval_") and "/" not in k)
    return f"{accs} ({m['t_eval']:.0f}s eval)" if accs else ""


def rollout_line(m):
    """The rollout's schedule efficiency (and on GPU its % of the decode roofline) for the step line; "" for "pad"."""
    roof = f", roofline {100 * m['rollout_roofline']:.0f}%" if "rollout_roofline" in m else ""
    return f"sched {m['rollout_sched_eff']:.2f}{roof} | " if "rollout_sched_eff" in m else ""


def sink_tag(key):
    """The W&B / TensorBoard name of a metrics.jsonl key: train/KEY, or eval/BENCHMARK for eval_BENCHMARK."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class Recorder:
    """Rank 0's record of this process's steps: the files in --out, the W&B run and TensorBoard writer (None when
    not asked for), and the clock of the ETA. last_logged: the last step the previous process logged (0: none)."""

    def __init__(self, cfg, start, last_logged):
        self.cfg, self.start, self.t0, self.peak = cfg, start, time.time(), 0.0
        config = dataclasses.asdict(cfg)
        self.wandb = self.tb = None
        if cfg.wandb:
            import wandb
            id_file = os.path.join(cfg.out, "wandb_id")  # a resumed run continues its W&B run; a fresh one starts one
            resumed = start and os.path.exists(id_file)
            run_id = open(id_file).read().strip() if resumed else uuid.uuid4().hex[:8]
            self.wandb_has = last_logged if resumed else -1  # W&B keeps a step's first values: not resent
            open(id_file, "w").write(run_id)
            self.wandb = wandb.init(project=cfg.wandb, name=os.path.basename(os.path.abspath(cfg.out)), id=run_id,
                                    resume="allow", config=config, dir=cfg.out)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides this directory's earlier events at and after the first step we log
            self.tb = SummaryWriter(os.path.join(cfg.out, "tb"), purge_step=start + 1)
            self.tb.add_text("config", textwrap.indent(json.dumps(config, indent=2), "    "), start)

    def log_step(self, m, ro, texts, grades, rewards, golds, tokenizer, curves=False):
        """The step's line (step k/N, elapsed, ETA), its metrics.jsonl row, a few completions in samples.jsonl (each
        with its reward trained on and its grade's `correct`), the sinks; curves.png too if `curves` (checkpoints and
        the last step). rewards (B,), golds: per row."""
        cfg, step = self.cfg, m["step"]
        elapsed = time.time() - self.t0
        left = elapsed / (step - self.start) * (cfg.steps - step)
        print(f"step {step}/{cfg.steps} | reward {m['reward']:.3f} | len {m['len_mean']:.0f} | "
              f"clip {m['clip_ratio']:.2f} | kl {m['kl']:.2e} | ent {m['entropy']:.3f} | gnorm {m['grad_norm']:.3f} | "
              f"{m['t_step']:.1f}s (gen {m['t_rollout']:.1f} / logp {m['t_logprobs']:.1f} / upd {m['t_update']:.1f}) | "
              f"{rollout_line(m)}{refill_line(m)}"
              f"elapsed {duration(elapsed)} | eta {duration(left)}{eval_line(m)}", flush=True)
        samples = [dict(step=step, prompt=tokenizer.decode(ro.prompt_ids[b]), response=texts[b], gold=golds[b],
                        reward=float(rewards[b]), correct=grades[b].correct, pred=grades[b].pred,
                        finish=ro.finish_reason[b])
                   for b in range(min(4, len(texts)))]  # a few completions per step
        with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        with open(os.path.join(cfg.out, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        self.peak = max(self.peak, m["peak_mem_gib"])
        scalars = {sink_tag(k): v for k, v in m.items() if k != "step"}
        if self.tb:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, step)
            self.tb.add_text("samples", "\n\n".join(
                f"**reward {s['reward']}** | correct {s['correct']} | gold `{s['gold']}` | pred `{s['pred']}` | "
                f"{s['finish']}\n\n"
                + textwrap.indent(s["prompt"] + s["response"], "    ") for s in samples), step)
            self.tb.flush()  # a run stopped by sys.exit never closes it
        if self.wandb and step > self.wandb_has:
            import wandb
            table = wandb.Table(columns=list(samples[0]), data=[list(s.values()) for s in samples])
            self.wandb.log({**scalars, "samples": table}, step=step)
        if curves:
            plot_run(cfg.out)

    def log_evals(self, m):
        """Step 0 (train.py --eval_every): the initial model's evals, a metrics.jsonl row and a line of their own."""
        print(f"step 0/{self.cfg.steps}{eval_line(m)}", flush=True)
        with open(os.path.join(self.cfg.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        scalars = {sink_tag(k): v for k, v in m.items() if k != "step"}
        if self.tb:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, 0)
            self.tb.flush()
        if self.wandb and self.wandb_has < 0:
            self.wandb.log(scalars, step=0)

    def finish(self, device):
        """The end of the run: the sinks closed, and one line naming the run directory and what is in it."""
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()
        out, ckpts, peak = self.cfg.out, distributed.checkpoints(self.cfg.out), max(self.peak, peak_memory_gib(device))
        print(f"done in {duration(time.time() - self.t0)}, peak memory {peak:.1f} GiB ({memory_meaning(device)})"
              f" | run {out} | last checkpoint {ckpts[-1] if ckpts else 'none (--save_every=0)'} | "
              f"{os.path.join(out, 'metrics.jsonl')} | {os.path.join(out, 'curves.png')}", flush=True)

# -----------------------------------------------------------------------------
# Curves: one plotting function for training runs (OUT/curves.png) and eval.py --checkpoints (OUT/eval/curves.png).


CURVES = [  # the panels of a training run's curves.png: (title, {legend label: metrics.jsonl key})
    ("reward (mean)", {"reward": "reward", "accuracy": "accuracy"}),
    ("response length (tokens)", {"mean": "len_mean", "max": "len_max"}),
    ("clip ratio (cut at max length)", {"clip ratio": "clip_ratio"}),
    ("KL to reference (per token)", {"kl": "kl"}),
    ("entropy (per token)", {"entropy": "entropy"}),
    ("grad norm (before clipping)", {"grad norm": "grad_norm"}),
    ("seconds per step, by phase", {"rollout": "t_rollout", "reward": "t_reward", "log-probs": "t_logprobs",
                                    "update": "t_update"}),
]


def series(rows, keys):
    """{label: (steps, values)} from metrics rows, for each label -> key of `keys`; rows without the key are skipped."""
    return {label: ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
            for label, key in keys.items()}


def plot_run(out):
    """OUT/curves.png from OUT/metrics.jsonl: the CURVES panels, and eval accuracy (%) per benchmark when the run
    evaluated (--eval_every). Returns the panel titles ([] without matplotlib: check_packages warned at the start)."""
    if not has_matplotlib():
        return []
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    evals = {k[5:]: k for r in rows for k in r if k.startswith("eval_") and "/" not in k}  # accuracies only
    panels = [(title, series(rows, keys)) for title, keys in CURVES]
    panels += [("eval accuracy (%)", series(rows, evals))] if evals else []
    title = f"{os.path.basename(os.path.abspath(out))}: {len(rows)} steps ({os.path.join(out, 'metrics.jsonl')})"
    return plot_curves(os.path.join(out, "curves.png"), panels, title)


def plot_curves(path, panels, title):
    """panels [(title, {label: (steps, values)})] -> a PNG at `path`: up to 4 panels a row, each against the training
    step, a legend where a panel has several lines. Returns the panel titles."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state; PNGs are drawn by Agg
    from matplotlib.ticker import MaxNLocator
    cols = min(4, len(panels))
    fig = Figure(figsize=(4.5 * cols, 0.6 + 3.3 * math.ceil(len(panels) / cols)), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.1)  # inches around each panel: the figure title clear of the panel titles
    fig.suptitle(title, fontweight="bold")
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for a, (name, lines) in zip(axes, panels):
        for label, (x, y) in lines.items():
            a.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=label)
        if len(lines) > 1:  # in a band of headroom above the lines, so it never hides them
            ncol = max(1, min(len(lines), 64 // (max(map(len, lines)) + 5)))  # ~64 characters fit across a panel
            lo, hi = a.get_ylim()
            a.set_ylim(lo, lo + (hi - lo) / (1 - 0.13 * math.ceil(len(lines) / ncol)))
            a.legend(fontsize=8, loc="upper center", ncol=ncol, frameon=False, handlelength=1.5)
        a.set(title=name, xlabel="training step")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    for a in axes[len(panels):]:
        a.set_axis_off()
    fig.savefig(path, dpi=100)
    return [name for name, _ in panels]
