"""Rollout engine throughput and schedule: python bench/rollout.py [--quick] [--model_config=qwen2.5-1.5b|qwen2.5-7b]
[--prompts 64] [--samples 8] [--max_new_tokens 1024] [--mean_len 100] [--slots 0] [--dtype=bf16|fp32]
[--engines pad,cb,slots]

Times rollout.generate with each engine on one workload, side by side in one process, under one KV budget, and prints
one JSON line per engine: decode forwards, schedule efficiency, useful tokens/s (and on CUDA the % of the HBM
roofline and the peak memory).

Workload: `prompts` random prompts (lengths uniform in [prompt_len/2, prompt_len]) x `samples` samples, T=1, top_p=1,
on a model with random weights built from a hard-coded config (no download): --quick a small Qwen2 (4 layers, width
256, vocab 32k, fp32), else Qwen2.5-1.5B or -7B shapes. Response lengths are FORCED (force_lengths): a forward hook
replaces the model's next-token logits by a chain over token ids, so that every row's length is drawn, at its first
token, from a lognormal with mean --mean_len (default max_new_tokens * 800 / 8192: the Zoo's ~800 of 8192, scaled)
whose top 1% runs to max_new_tokens, and then counts down to a stop token. Each engine draws its own lengths from that
distribution (each line reports them); the hook's ops run inside the engines' steps (and CUDA graphs).

KV budget: S slots (--slots; 0 = as many as fit in the free GPU memory, rollout.kv_slots; on CPU rows / 4). "slots"
decodes on S slots; the chunked engines get max_prompts = S / samples, so each generate call holds S rows.

Definitions. useful tokens = response tokens (through the stop token). decode_forwards = model forwards after the
prefill ("slots": its own count, stats["decode_forwards"], checked against a forward hook where no CUDA graph hides
the calls; "pad": forwards of one token per row; "cb": all its forwards, its prefills are mixed in).
ideal_forwards = max(ceil(sum(lengths - 1) / S), max(lengths) - 1): S slots decode at most S tokens per forward, the
longest row needs max(lengths) - 1 forwards (every engine samples a row's first token from its prompt's prefill).
schedule_efficiency = ideal_forwards / decode_forwards. fifo_forwards = the
forwards of the best schedule that admits rows in prompt order into S slots as they free (one row at a time, no
lag): what no in-order engine beats when a long row is admitted late. row_steps = rows decoded, summed over forwards.
Roofline (CUDA only): the time to read, at the GPU's HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s), the weights
once per ideal forward plus each row's KV cache at each of its tokens, over the measured time; prefill not counted.
Timings include each engine's per-call setup (cb builds its paged cache and thread on every call; "slots" allocates
its cache and captures its CUDA graphs on every call).
"""
import argparse
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
from rollout import generate, kv_slots  # noqa: E402

CONFIGS = {  # shapes of the Hugging Face configs (Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-7B), plus a CPU-sized one
    "quick": dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
STOP, BASE = 1, 2  # forced workload: the stop token; counter tokens BASE + j ("j more tokens, then the stop")


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


def roofline_seconds(model, prompts, lengths, samples, forwards, hbm):
    """Ideal decode time: all weights (the input embedding only if untied: a lookup reads b rows) read once per
    forward of the ideal schedule, plus each row's KV cache read once per token it decodes, at hbm bytes/s."""
    c = model.config
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    if not c.tie_word_embeddings:
        weights -= model.get_input_embeddings().weight.numel() * size
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * size
    plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(samples).double()  # (B,)
    n = lengths.double()  # (B,) a row reads plen + t keys at its token t = 0..n-1
    kv = kv_per_token * float((n * plen + n * (n - 1) / 2).sum())
    return (weights * forwards + kv) / hbm


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
    ap.add_argument("--slots", type=int, default=0, help="KV budget in rows (0: free GPU memory; CPU: rows / 4)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--engines", default="pad,cb,slots")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 under --quick)")
    args = ap.parse_args()
    if args.quick:
        args.model_config, args.prompts, args.samples, args.prompt_len, args.max_new_tokens = "quick", 16, 8, 64, 512
        args.slots = args.slots or 32
        args.threads = args.threads or 1  # 2 OpenMP threads on a 2-core box shared with other jobs ran 5-20x slower
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    model = build(args.model_config, dtype, device)
    cap, G, B = args.max_new_tokens, args.samples, args.prompts * args.samples
    prompts = workload(args, model.config.vocab_size, cap)
    force_lengths(model, length_probs(args.mean_len or cap * 800 / 8192, cap))
    S = args.slots or (kv_slots(model, B, args.prompt_len, args.prompt_len + cap, dtype, device)[0] if cuda else B // 4)
    S = S // G * G  # whole prompts, so every engine holds the same rows
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    hbm = 4.8e12 if "H200" in name else 3.35e12  # HBM bytes/s: H200, else H100 SXM
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    decodes, rows = [0], [0]

    def count(module, args, kwargs):  # forwards of one token per row (pad; slots where no graph replays)
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            decodes[0] += 1
            rows[0] += ids.shape[0]
    model.register_forward_pre_hook(count, with_kwargs=True)
    print(json.dumps(dict(slots=S, rows=B, max_prompts=S // G, device=name)), flush=True)

    for engine in args.engines.split(","):
        kw = dict(temperature=1.0, top_p=1.0, stop_ids=[STOP], pad_id=0, engine=engine)
        kw |= dict(slots=S) if engine == "slots" else dict(max_prompts=S // G)
        warm = dict(kw, slots=4) if engine == "slots" else kw
        generate(model, prompts[:2], n=2, max_new_tokens=4, **warm)  # warm-up: kernels, allocator
        torch.manual_seed(0)
        decodes[0] = rows[0] = 0
        calls = [0]
        if engine == "cb":  # all of cb's forwards
            handle = model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        stats = {}
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ro = generate(model, prompts, n=G, max_new_tokens=cap, **kw, **(dict(stats=stats) if engine == "slots" else {}))
        sync()
        seconds = time.perf_counter() - t0
        if engine == "cb":
            handle.remove()
        lengths = ro.lengths
        forwards = stats.get("decode_forwards") or calls[0] or decodes[0]
        if engine == "slots" and not stats["graphs"]:  # eager: every decode forward went through the hook
            assert forwards == decodes[0] and stats["row_steps"] == rows[0], (stats, decodes, rows)
        useful = int(lengths.sum())
        ideal = max(-(-int((lengths - 1).sum()) // S), int(lengths.max()) - 1)
        line = dict(engine=engine, decode_forwards=forwards, ideal_forwards=ideal,
                    schedule_efficiency=round(ideal / forwards, 3),
                    fifo_forwards=fifo_forwards(lengths.tolist(), S), tokens_per_s=round(useful / seconds, 1),
                    seconds=round(seconds, 2), useful_tokens=useful,
                    row_steps=stats.get("row_steps") or (rows[0] if engine != "cb" else None),
                    slots=S, rows=B, mean_len=round(useful / B, 1), max_len=int(lengths.max()),
                    hit_max=round(sum(r == "length" for r in ro.finish_reason) / B, 3), max_new_tokens=cap,
                    prompt_len=f"{args.prompt_len // 2}-{args.prompt_len}", device=name, model=args.model_config,
                    dtype=str(dtype)[6:], attn=stats.get("attention") or model.config._attn_implementation)
        if engine == "slots":
            line["graphs"] = stats["graphs"]
        if cuda:
            ideal_s = roofline_seconds(model, prompts, lengths, G, ideal, hbm)
            line["hbm_roofline_pct"] = round(100 * ideal_s / seconds, 1)
            line["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
