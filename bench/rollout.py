"""Rollout engine throughput, schedule and per-step cost: python bench/rollout.py [--quick]
[--model_config=qwen2.5-1.5b|qwen2.5-7b] [--prompts 64] [--samples 8] [--max_new_tokens 1024] [--mean_len 100]
[--workload zoo|steady] [--slots 0]
[--dtype=bf16|fp32] [--engines slots,pad,hf_cb] [--kernels]

Times each engine on one workload, side by side in one process, under one KV budget, and prints JSON lines:
- first, for the model it runs, `ops`: the non-view aten ops per layer per decode step of engine "slots" (the CPU proxy
  for kernel launches; goal <= 15 per layer), counted by a TorchDispatchMode over eager decode steps (op_counts);
- with --kernels on CUDA, `kernels`: the CUDA kernels one eager decode step launches, with rollout.COMPILE False and
  True (torch.profiler; cuda_kernels; the compiled line's first_call_s holds the compile time), and `step_time`: the
  decode step's time eager, as CUDA graphs, and as CUDA graphs of the compiled step (step_times);
- then one line per engine: decode forwards, schedule efficiency, useful tokens/s, and on CUDA the % of the roofline
  and the peak memory.

Engines: "slots" and "pad" are rollout.generate's; "hf_cb" is HF continuous batching (`model.generate_batch`, paged KV
cache), run here for comparison only (it left rollout.py: on transformers 5.17 num_return_sequences returns only the
parent requests). It asks for n samples by repeating each prompt n times with num_return_sequences=1, and its page
size is the config field `page_size` (5.18+) or `block_size` (5.17). Without flash-attn (the GPU box has none) HF
packs the batch into one sequence under a dense mask.

Workload: `prompts` random prompts (lengths uniform in [prompt_len/2, prompt_len]) x `samples` samples, T=1, top_p=1,
on a model with random weights built from a hard-coded config (no download): --quick a small Qwen2 (4 layers, width
256, vocab 32k, fp32), else Qwen2.5-1.5B or -7B shapes. Response lengths are FORCED (force_lengths): a forward hook
replaces the model's next-token logits by a chain over token ids, so that every row's length is drawn, at its first
token, from a distribution, then counts down to a stop token. --workload zoo (default): a lognormal with mean
--mean_len (default max_new_tokens * 800 / 8192: the Zoo's ~800 of 8192, scaled) whose top 1% runs to max_new_tokens;
most forwards then run on the few long rows (the tail). --workload steady: uniform in [mean/2, 3 mean/2] (no row at
the cap), for many more rows than slots, so the S slots stay busy for most forwards: the engine's steady state
(its lines report `occupancy` and `tail_forwards` so the reader sees how steady it was). Each engine draws its own
lengths (each line reports them); the hook's ops run inside the engines' steps (and CUDA graphs).

KV budget: S slots (--slots; 0 = as many as fit in the free GPU memory, rollout.kv_slots; on CPU rows / 4). "slots"
decodes on S slots; "pad" gets max_prompts = S / samples, so each generate call holds S rows; "hf_cb" gets a paged
cache of S rows at full length (prompt_len + max_new_tokens), all prompts in one call.

Definitions. useful tokens = response tokens (through the stop token). decode_forwards = model forwards after the
prefill ("slots": its own count, stats["decode_forwards"], checked against a forward hook where no CUDA graph hides
the calls; "pad": forwards of one token per row; "hf_cb": all its forwards that ran eagerly, prefills mixed in; HF's
CUDA graph replays are not seen, `hf_graphs` says whether it used them).
ideal_forwards = max(ceil(sum(lengths - 1) / S), max(lengths) - 1): S slots decode at most S tokens per forward, the
longest row needs max(lengths) - 1 forwards (every engine samples a row's first token from its prompt's prefill).
schedule_efficiency = ideal_forwards / decode_forwards (hf_cb's can pass 1: its pages are taken as rows grow, so
more than S short rows fit in the pages of S full-length rows). fifo_forwards = the forwards of the best schedule that
admits rows in prompt order into S slots as they free (one row at a time, no lag). row_steps = rows decoded, summed over
forwards.
Roofline (CUDA only; GPU table GPUS: H100 SXM 3.35 TB/s, H200 4.8 TB/s, 989 TFLOP/s dense bf16 both):
- decode_roofline_pct ("slots"): the engine's stats["roofline_s"] / stats["decode_s"]: the sum over its decode
  forwards of max(bytes / HBM bandwidth, flops / peak) (weights except an untied input embedding, plus the busy rows'
  live KV; 2 flops per weight per row plus attention) over the decode time alone (no prefill, no graph capture).
  At b ~ 512 a 7B step is compute-bound: the flops term, not the bytes, is the bound there.
- call_roofline_pct (every engine): max(total bytes / bandwidth, total flops / peak) of an ideal decode (weights read
  once per ideal forward, each row's KV once per token it decodes; flops of the useful tokens) over the whole call's
  seconds, prefill, setup and captures included (call_roofline_seconds): a coarser bound, comparable across engines.
seconds and tokens_per_s are totals: each engine's per-call setup included (hf_cb builds its paged cache and thread on
every call; "slots" allocates its cache and captures its CUDA graphs on every call); "slots" also reports prefill_s,
capture_s and decode_s (its stats; None where the engine on this branch does not fill them).
"""
import argparse
import dataclasses
import heapq
import json
import math
import os
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import attention_impl  # noqa: E402  (flash_attention_2 where it imports on CUDA, as in training)
import rollout  # noqa: E402
from rollout import generate, kv_slots, response_mask  # noqa: E402

CONFIGS = {  # shapes of the Hugging Face configs (Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-7B), plus a CPU-sized one
    "quick": dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
STOP, BASE = 1, 2  # forced workload: the stop token; counter tokens BASE + j ("j more tokens, then the stop")
GPUS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12), "A100": (2.0e12, 312e12)}  # HBM B/s, dense bf16 FLOP/s
VIEWS = {"_unsafe_view", "alias", "lift_fresh"}  # aten ops that alias without saying so in their schema
SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "item"}  # aten ops that wait for the device


def build(name, dtype, device):
    attn = attention_impl(device) if dtype != torch.float32 else "sdpa"  # flash-attn takes bf16/fp16 only
    cfg = Qwen2Config(**CONFIGS[name], max_position_embeddings=32768, rope_theta=1e6, eos_token_id=0, pad_token_id=0,
                      attn_implementation=attn)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def length_probs(mean, cap, at_cap=0.01):
    """(cap,) P(length = l) for l = 1..cap: a lognormal with this mean (before the cap) and P(length >= cap) = at_cap,
    binned to integers; its tail beyond cap is the mass at cap (rows that run to max_new_tokens)."""
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - at_cap)).item()  # 2.33 for 1%
    r = 2 * math.log(cap / mean)  # mean = exp(mu + s^2 / 2) and log(cap) = mu + z s  =>  s^2 / 2 - z s + r / 2 = 0
    if r > z * z:
        raise ValueError(f"no lognormal has mean {mean} and {at_cap:.0%} of its mass beyond {cap}")
    s = z - math.sqrt(z * z - r)
    cdf = torch.distributions.Normal(math.log(mean) - s * s / 2, s).cdf(torch.arange(1, cap).add(0.5).log())  # F(l+.5)
    return torch.diff(torch.cat([torch.zeros(1), cdf, torch.ones(1)]))  # (cap,)


def steady_probs(mean, cap):
    """(cap,) P(length = l) for l = 1..cap: uniform on the integers in [mean / 2, 3 mean / 2] (all below cap)."""
    lo, hi = max(1, round(mean / 2)), round(3 * mean / 2)
    if hi >= cap:
        raise ValueError(f"steady lengths up to {hi} need max_new_tokens > {hi}")
    probs = torch.zeros(cap)
    probs[lo - 1:hi] = 1 / (hi - lo + 1)
    return probs  # (cap,)


def force_lengths(model, probs):
    """Forward hook on model: the next-token logits become a chain over token ids, so responses have FORCED lengths
    drawn from probs (cap,) = P(length = 1..cap) and rows of length cap run to max_new_tokens = cap. Fed the START token
    (the last vocabulary id: end every prompt with it), the logits are log probs over the first tokens: STOP for
    length 1, BASE + l - 2 for l < cap, BASE + cap - 1 for cap. Fed BASE + j, the next token is BASE + j - 1 (BASE:
    STOP); fed anything else, STOP. Pure tensor ops, no host sync: it runs inside every engine's step (and is
    recorded into the CUDA graphs of "slots"). Returns the hook's handle (.remove() it)."""
    V, cap = model.config.vocab_size, len(probs)
    if BASE + cap >= V - 1:
        raise ValueError(f"vocab {V} too small for forced lengths up to {cap}")
    device = next(model.parameters()).device
    nxt = torch.full((V,), STOP, dtype=torch.long)  # (V,) the forced successor of each fed token
    nxt[BASE + 1:BASE + cap] = torch.arange(BASE, BASE + cap - 1)
    first = torch.full((V,), -math.inf)  # (V,) log-probs of the first token, after START
    first[[STOP, *range(BASE, BASE + cap - 2), BASE + cap - 1]] = probs.log()
    nxt, first = nxt.to(device), first.to(device)

    def hook(module, args, kwargs, output):
        z = output.logits  # (b, q, V): the positions whose logits were kept
        keep = kwargs.get("logits_to_keep", 0)
        ids = kwargs["input_ids"][:, keep] if isinstance(keep, torch.Tensor) else kwargs["input_ids"][:, -z.shape[1]:]
        forced = torch.full_like(z, -math.inf).scatter_(-1, nxt[ids][..., None], 0.0)  # (b, q, V)
        output.logits = torch.where((ids == V - 1)[..., None], first.to(z.dtype), forced)
        return output
    return model.register_forward_hook(hook, with_kwargs=True)


def workload(args, vocab, cap):
    """Random prompts ending with the START token (vocab - 1), their other tokens above the forced chain's ids."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.prompts,), generator=g)
    return [torch.randint(BASE + cap + 1, vocab - 1, (int(n) - 1,), generator=g).tolist() + [vocab - 1] for n in lens]


def fifo_forwards(lengths, S):
    """Decode forwards of the in-order schedule with no group constraint and no lag: each row takes the first free
    of S slots and holds it for (its length - 1) forwards (its first token comes from the prefill)."""
    free = [0] * S  # heap of the forward at which each slot frees
    end = 0
    for n in lengths:
        start = heapq.heappop(free)
        end = max(end, start + n - 1)
        heapq.heappush(free, start + n - 1)
    return end


def call_roofline_seconds(model, prompts, lengths, samples, forwards, hbm, peak):
    """A bound on a whole call's decode time: max(bytes / hbm, flops / peak), bytes = all weights (the input embedding
    only if tied: an untied lookup reads b rows) once per forward of the ideal schedule plus each row's KV cache once
    per token it decodes; flops = 2 per weight (input embedding excluded) per decoded token plus attention (4 * layers
    * q heads * head dim per key read)."""
    c = model.config
    size = next(model.parameters()).element_size()
    params = sum(p.numel() for p in model.parameters())
    if not c.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()
    D = c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * D * size
    plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(samples).double()  # (B,)
    n = lengths.double()  # (B,) a row reads plen + t keys at its token t = 0..n-1
    keys = float((n * plen + n * (n - 1) / 2).sum())
    flops = 2 * params * float(n.sum()) + 4 * c.num_hidden_layers * c.num_attention_heads * D * keys
    return max((params * size * forwards + kv_per_token * keys) / hbm, flops / peak)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each aten op with where it ran: (decode forward index, inside a forward?, layer index or None)."""

    def __init__(self):
        super().__init__()
        self.step, self.forward, self.layer, self.ops = 0, False, None, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        view = name in VIEWS or any(r.alias_info is not None and not r.alias_info.is_write
                                    for r in func._schema.returns)
        self.ops.append((self.step, self.forward, self.layer, view, name in SYNCS))
        return func(*args, **(kwargs or {}))


def _switches(**values):
    """Set rollout's module switches (those this branch has) -> the old values, to restore with _switches(**old)."""
    old = {k: getattr(rollout, k) for k in values if hasattr(rollout, k)}
    for k in old:
        setattr(rollout, k, values[k])
    return old


def op_counts(model, G=2):
    """Aten ops of engine "slots"' eager decode steps (CUDA_GRAPHS and COMPILE off), per layer and per step: one prompt
    x G samples on G slots, 16 decode steps, stop flags read every 8 steps; steps 1-6 (no flag read before them) are
    averaged. A step = its forward (layers + embedding, final norm, LM head) + what runs before the next forward
    (sampling, state updates). Views (outputs alias inputs: view, reshape, transpose, select, slice, expand, t, ...)
    launch no kernel and are counted apart; syncs = ops that wait for the device (_local_scalar_dense, nonzero, ...)."""
    L = model.config.num_hidden_layers
    mode, hooks = _OpCounter(), []

    def enter(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            mode.step, mode.forward = mode.step + 1, True

    def leave(module, args, kwargs, output):
        mode.forward = False
    hooks += [model.register_forward_pre_hook(enter, with_kwargs=True),
              model.register_forward_hook(leave, with_kwargs=True)]
    for i, layer in enumerate(model.model.layers):
        hooks += [layer.register_forward_pre_hook(lambda m, a, i=i: setattr(mode, "layer", i)),
                  layer.register_forward_hook(lambda m, a, o: setattr(mode, "layer", None))]
    old = _switches(CUDA_GRAPHS=False, COMPILE=False)
    every = dict(rollout.SYNC_EVERY) if hasattr(rollout, "SYNC_EVERY") else None
    if every is not None:
        rollout.SYNC_EVERY.update(cpu=8, cuda=8)
    V = model.config.vocab_size
    try:
        with mode:  # stop id V is never sampled: both rows run all 17 tokens (16 decode steps)
            generate(model, [[3, 4, 5, 6]], n=G, max_new_tokens=17, temperature=1.0, top_p=1.0, stop_ids=[V],
                     pad_id=0, slots=G)
    finally:
        for h in hooks:
            h.remove()
        _switches(**old)
        if every is not None:
            rollout.SYNC_EVERY.update(every)
    steps = range(1, 7)
    per = lambda keep: sum(1 for op in mode.ops if op[0] in steps and keep(op)) / len(steps)  # noqa: E731
    layer_ops = per(lambda op: op[2] is not None and not op[3])
    step_ops = per(lambda op: not op[3])
    return dict(ops="per eager decode step, engine slots", model_layers=L, rows=G,
                per_layer_nonview=round(layer_ops / L, 2), per_layer_views=round(per(lambda op: op[2] is not None
                                                                                     and op[3]) / L, 2),
                outside_layers_nonview=round(step_ops - layer_ops, 2), per_step_nonview=round(step_ops, 2),
                per_step_views=round(per(lambda op: op[3]), 2), per_step_syncs=round(per(lambda op: op[4]), 2),
                decode_forwards_seen=mode.step, goal_per_layer=15)


def cuda_kernels(model, compile):
    """CUDA kernels one eager decode step of engine "slots" launches (rollout.CUDA_GRAPHS off, rollout.COMPILE =
    compile), by difference: the kernels (memcpy/memset excluded) of a call with 16 decode steps minus one with 8,
    over 8 (one prompt x 2 samples; stop flags read every 8 steps, so the longer call reads them once more: a few
    kernels, < 0.5 per step). Returns None where rollout has no COMPILE switch and compile is asked for."""
    if compile and not hasattr(rollout, "COMPILE"):
        return None
    from torch.autograd import DeviceType
    V = model.config.vocab_size
    old = _switches(CUDA_GRAPHS=False, COMPILE=compile)
    every = dict(rollout.SYNC_EVERY)
    rollout.SYNC_EVERY.update(cuda=8)
    call = lambda m: generate(model, [[3, 4, 5, 6]], n=2, max_new_tokens=m, temperature=1.0, top_p=1.0,  # noqa: E731
                              stop_ids=[V], pad_id=0, slots=2)

    def kernels(m):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            call(m)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset")))
    try:
        t0 = time.perf_counter()
        call(9)  # warm-up (and the compile, if any)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        short, long = kernels(9), kernels(17)
    finally:
        _switches(**old)
        rollout.SYNC_EVERY.update(every)
    L = model.config.num_hidden_layers
    return dict(kernels="per eager decode step, engine slots", compile=compile, per_step=(long - short) / 8,
                per_layer_upper=round((long - short) / 8 / L, 2), calls_9_17=[short, long],
                first_call_s=round(warm, 1), model_layers=L, goal_per_layer=15)


def step_times(model, modes, prompts=8, G=8, m=129):
    """Decode step time of engine "slots" at b = prompts x G rows (all busy for m - 1 steps): eager (CUDA_GRAPHS off;
    what --gen_tp pays), CUDA graphs, and CUDA graphs of the compiled step (rollout.COMPILE, where it exists). Each mode
    runs twice (every call captures its graphs); step_ms = stats decode_s / decode_forwards of the second call (wall /
    forwards where decode_s is missing). The compile itself (rollout caches the compiled step per process, for every
    b) happens in the first call that compiles: main runs cuda_kernels(model, True) first, whose first_call_s holds it
    (when step_times runs alone, compile_s_estimate = first call - second call does)."""
    V = model.config.vocab_size
    ids = [[3 + i, 4, 5, 6] for i in range(prompts)]
    lines = []
    for name in modes:  # "eager" | "graphs" | "graphs+compile"
        graphs, compile = name != "eager", name == "graphs+compile"
        if compile and not hasattr(rollout, "COMPILE"):
            lines.append(dict(step_time=name, note="rollout.COMPILE missing on this branch"))
            continue
        old = _switches(CUDA_GRAPHS=graphs, COMPILE=compile)
        try:
            walls = []
            for _ in range(2):
                stats = {}
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                generate(model, ids, n=G, max_new_tokens=m, temperature=1.0, top_p=1.0, stop_ids=[V], pad_id=0,
                         slots=prompts * G, stats=stats)
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - t0)
        finally:
            _switches(**old)
        decode_s = stats.get("decode_s")
        lines.append(dict(step_time=name, rows=prompts * G, step_ms=round(1e3 * (decode_s or walls[1])
                                                                           / stats["decode_forwards"], 3),
                          from_decode_s=decode_s is not None, first_call_s=round(walls[0], 2),
                          second_call_s=round(walls[1], 2), compile_s_estimate=round(walls[0] - walls[1], 2),
                          capture_s=stats.get("capture_s"), decode_forwards=stats["decode_forwards"],
                          graphs=stats.get("graphs")))
    return lines


def generate_hf_cb(model, prompts, n, max_new_tokens, slots, stop_ids, pad_id):
    """HF continuous batching (`model.generate_batch`) at T = 1, top_p = 1 -> (tokens (B, R) right-padded with pad_id,
    forwards seen, its use_cuda_graph after the call). Each prompt is repeated n times with num_return_sequences=1
    (5.17 creates the children of num_return_sequences but returns only the parents). Paged KV cache of `slots` rows
    at full length (longest prompt + max_new_tokens) in pages of 32 tokens; max_batch_tokens cut so HF's dense sdpa
    mask (max_batch_tokens x cache tokens) stays under 2^26 entries."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    rows = [p for p in prompts for _ in range(n)]  # prompt-major
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                              num_return_sequences=1, eos_token_id=list(stop_ids), pad_token_id=pad_id)
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    page = "page_size" if "page_size" in fields else "block_size"  # 5.17: block_size; later: page_size
    blocks = slots * -(-(max(map(len, prompts)) + max_new_tokens) // 32)
    cache = ContinuousBatchingConfig(**{page: 32}, num_blocks=blocks,
                                     max_batch_tokens=max(64, min(8192, 2 ** 26 // (blocks * 32))))
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    saved, model.generation_config = model.generation_config, GenerationConfig()  # no model defaults (top_k, ...)
    try:
        out = model.generate_batch(rows, generation_config=config, continuous_batching_config=cache)
    finally:
        model.generation_config = saved
        handle.remove()
    results = list(out.values())  # in input order; failed or missing requests are logged, not raised
    if len(results) != len(rows) or any(r.error or list(r.prompt_ids) != p for r, p in zip(results, rows)):
        raise RuntimeError(f"generate_batch returned {len(results)}/{len(rows)} complete requests in prompt order")
    R = max(len(r.generated_tokens) for r in results)
    tokens = torch.full((len(rows), R), pad_id, dtype=torch.long)  # (B, R)
    for i, r in enumerate(results):
        tokens[i, :len(r.generated_tokens)] = torch.tensor(r.generated_tokens)
    return tokens, calls[0], str(cache.use_cuda_graph)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU-sized: small model, 16 prompts x 8, 512 tokens, mean "
                                                         "50, 32 slots, 1 thread")
    ap.add_argument("--model_config", default="qwen2.5-1.5b", choices=list(CONFIGS))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=256, help="longest prompt; lengths uniform in [half, this]")
    ap.add_argument("--max_new_tokens", type=int, default=1024)
    ap.add_argument("--mean_len", type=float, default=0, help="mean forced length (0: max_new_tokens * 800 / 8192)")
    ap.add_argument("--workload", default="zoo", choices=["zoo", "steady"], help="forced lengths (see above)")
    ap.add_argument("--slots", type=int, default=0, help="KV budget in rows (0: free GPU memory; CPU: rows / 4)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--engines", default="slots,pad,hf_cb")
    ap.add_argument("--kernels", action="store_true", help="CUDA: kernels per decode step and step times (see above)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 under --quick)")
    args = ap.parse_args()
    if args.quick:
        args.model_config, args.prompts, args.samples, args.prompt_len, args.max_new_tokens = "quick", 16, 8, 64, 512
        args.slots = args.slots or 32
        args.threads = args.threads or 1  # 2 OpenMP threads on a 2-core box shared with other jobs ran 5-20x slower
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = [e for e in args.engines.split(",") if e]  # --engines= : none (e.g. --kernels only)
    if set(engines) - {"slots", "pad", "hf_cb"}:
        ap.error(f"--engines: expected slots, pad, hf_cb; got {args.engines}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    model = build(args.model_config, dtype, device)
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    hbm, peak = next((v for k, v in GPUS.items() if k in name), (None, None))
    print(json.dumps(op_counts(model) | dict(model=args.model_config, device=name)), flush=True)
    if args.kernels and cuda:  # eager and graphs first: the compile (minutes at worst) last
        print(json.dumps(cuda_kernels(model, False) | dict(model=args.model_config)), flush=True)
        for line in step_times(model, ["eager", "graphs"]):
            print(json.dumps(line | dict(model=args.model_config, device=name)), flush=True)
        print(json.dumps((cuda_kernels(model, True) or dict(kernels="compiled", note="rollout.COMPILE missing"))
                         | dict(model=args.model_config)), flush=True)
        for line in step_times(model, ["graphs+compile"]):
            print(json.dumps(line | dict(model=args.model_config, device=name)), flush=True)
    if not engines:
        return

    cap, G, B = args.max_new_tokens, args.samples, args.prompts * args.samples
    prompts = workload(args, model.config.vocab_size, cap)
    mean = args.mean_len or cap * 800 / 8192
    force_lengths(model, length_probs(mean, cap) if args.workload == "zoo" else steady_probs(mean, cap))
    S = args.slots or (kv_slots(model, B, args.prompt_len, args.prompt_len + cap, dtype, device)[0] if cuda else B // 4)
    S = S // G * G  # whole prompts, so every engine holds the same rows
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    decodes, rows = [0], [0]

    def count(module, args, kwargs):  # forwards of one token per row (pad; slots where no graph replays)
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            decodes[0] += 1
            rows[0] += ids.shape[0]
    model.register_forward_pre_hook(count, with_kwargs=True)
    print(json.dumps(dict(slots=S, rows=B, max_prompts=S // G, device=name, workload=args.workload, mean_len=mean)),
          flush=True)

    for engine in engines:  # hf_cb last where asked: generate_batch may leave the model's attention switched
        kw = dict(temperature=1.0, top_p=1.0, stop_ids=[STOP], pad_id=0, engine=engine)
        kw |= dict(slots=S) if engine == "slots" else dict(max_prompts=S // G)
        if engine == "hf_cb":
            generate_hf_cb(model, prompts[:2], 2, 4, 4, [STOP], 0)  # warm-up: kernels, allocator
        else:
            generate(model, prompts[:2], n=2, max_new_tokens=4, **(dict(kw, slots=4) if engine == "slots" else kw))
        torch.manual_seed(0)
        decodes[0] = rows[0] = 0
        stats, extra = {}, {}
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if engine == "hf_cb":
            tokens, calls, extra["hf_graphs"] = generate_hf_cb(model, prompts, G, cap, S, [STOP], 0)
            lengths, stopped = response_mask(tokens, [STOP])[1:]
            finish = ["stop" if s else "length" for s in stopped.tolist()]
        else:
            ro = generate(model, prompts, n=G, max_new_tokens=cap, **kw,
                          **(dict(stats=stats) if engine == "slots" else {}))
            lengths, finish = ro.lengths, ro.finish_reason
        sync()
        seconds = time.perf_counter() - t0
        forwards = stats.get("decode_forwards") or (calls if engine == "hf_cb" else decodes[0])
        if engine == "slots" and not stats["graphs"]:  # eager: every decode forward went through the hook
            assert forwards == decodes[0] and stats["row_steps"] == rows[0], (stats, decodes, rows)
        useful = int(lengths.sum())
        ideal = max(-(-int((lengths - 1).sum()) // S), int(lengths.max()) - 1)
        line = dict(engine=engine, decode_forwards=forwards, ideal_forwards=ideal,
                    schedule_efficiency=round(ideal / forwards, 3),
                    fifo_forwards=fifo_forwards(lengths.tolist(), S), tokens_per_s=round(useful / seconds, 1),
                    seconds=round(seconds, 2), useful_tokens=useful,
                    row_steps=stats.get("row_steps") or (rows[0] if engine == "pad" else None),
                    slots=S, rows=B, mean_len=round(useful / B, 1), max_len=int(lengths.max()),
                    hit_max=round(sum(r == "length" for r in finish) / B, 3), max_new_tokens=cap,
                    prompt_len=f"{args.prompt_len // 2}-{args.prompt_len}", workload=args.workload, device=name,
                    model=args.model_config, dtype=str(dtype)[6:],
                    attn=stats.get("attention") or model.config._attn_implementation) | extra
        if engine == "slots":  # the engine's own stats; None where this branch's engine does not fill a key
            line |= {k: round(v, 3) if isinstance(v, float) else v for k, v in
                     ((k, stats.get(k)) for k in ("graphs", "prefill_forwards", "refills", "prefill_s", "capture_s",
                                                  "decode_s", "occupancy", "tail_forwards", "roofline_s"))}
            if stats.get("roofline_s") is not None and stats.get("decode_s"):
                line["decode_roofline_pct"] = round(100 * stats["roofline_s"] / stats["decode_s"], 1)
            else:
                line["decode_roofline_pct"] = None
        if cuda:
            if hbm is not None:
                line["call_roofline_pct"] = round(100 * call_roofline_seconds(model, prompts, lengths, G, ideal, hbm,
                                                                              peak) / seconds, 1)
            line["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
