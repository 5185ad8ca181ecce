"""Rollout engine throughput: python bench/rollout.py [--quick] [--model_config=qwen2.5-1.5b|qwen2.5-7b] [--prompts 64]
[--samples 8] [--max_new_tokens 1024] [--dtype=bf16|fp32] [--engines pad,drop,cb]

Times rollout.generate with each engine on one fixed workload, side by side in one process, and prints one JSON line
per engine: useful tokens/s, the useful-token fraction, seconds, rows, device (and on CUDA the % of the HBM roofline).

Workload: `prompts` random prompts (lengths uniform in [prompt_len/2, prompt_len]) x `samples` samples, T=1, top_p=1,
on a model with random weights built from a hard-coded config (no download): --quick a small Qwen2 (4 layers, width
256, vocab 32k, fp32), else Qwen2.5-1.5B or -7B shapes. Response lengths: EOS is allowed, the stop set being
K = 3 * vocab / max_new_tokens random token ids, so under the random model's nearly flat next-token distribution a
row stops with probability ~3 / max_new_tokens per step: lengths are ~geometric with mean ~max_new_tokens / 3 and ~5%
of rows reach max_new_tokens, so padded decoding keeps ~30% useful tokens, as with SimpleRL-Zoo-like length spreads.
Each engine samples its own lengths from that same distribution (the lines report them).

Definitions. useful tokens = response tokens (through the first stop token). row-steps = tokens the engine sampled:
"pad" samples all B rows at each of its R steps (R = longest response), "drop" and "cb" each row until its own stop.
useful_token_fraction = useful / row-steps. logit_rows (measured: rows through the LM head) cross-checks it.
Roofline (CUDA only): the time to read, at 3.35 TB/s (H100 SXM HBM3), the weights once per decode step plus the KV
cache of the rows still running (ideal schedule: each row until its own stop), over the measured time; prefill is
not counted. Timings include each engine's per-call setup (cb builds its paged cache and thread on every call).
"""
import argparse
import json
import os
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rollout import generate  # noqa: E402
from model import attention_impl  # noqa: E402  (flash_attention_2 where it imports on CUDA, as in training)

CONFIGS = {  # shapes of the Hugging Face configs (Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-7B), plus a CPU-sized one
    "quick": dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
HBM_BYTES_PER_S = 3.35e12  # H100 SXM


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


def workload(args, vocab):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.prompts,), generator=g)
    prompts = [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lens]
    k = max(1, round(3 * vocab / args.max_new_tokens))
    stop_ids = torch.randperm(vocab - 1, generator=g)[:k].add(1).tolist()  # never the pad id 0
    return prompts, stop_ids


def roofline_seconds(model, prompts, lengths, samples):
    """Ideal decode time: per step, all weights (the input embedding only if untied: a lookup reads b rows) plus the
    KV cache of the rows still running, read once from HBM."""
    c = model.config
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size
    if not c.tie_word_embeddings:
        weights -= model.get_input_embeddings().weight.numel() * size
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * size
    plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(samples)  # (B,)
    total = 0.0
    for t in range(int(lengths.max())):
        live = lengths > t  # (B,) rows sampling their token t
        total += weights + kv_per_token * float((plen[live] + t).sum())
    return total / HBM_BYTES_PER_S


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU-sized: small model, 16 prompts x 8, 256 tokens, 1 thread")
    ap.add_argument("--model_config", default="qwen2.5-1.5b", choices=[k for k in CONFIGS if k != "quick"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=256, help="longest prompt; lengths uniform in [half, this]")
    ap.add_argument("--max_new_tokens", type=int, default=1024)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--engines", default="pad,drop,cb")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 under --quick)")
    args = ap.parse_args()
    if args.quick:
        args.model_config, args.prompts, args.samples, args.prompt_len, args.max_new_tokens = "quick", 16, 8, 128, 256
        args.threads = args.threads or 1  # 2 OpenMP threads on a 2-core box shared with other jobs ran 5-20x slower
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    model = build(args.model_config, dtype, device)
    prompts, stop_ids = workload(args, model.config.vocab_size)
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    logit_rows = [0]
    count = lambda module, inputs, output: logit_rows.__setitem__(0, logit_rows[0] + inputs[0].shape[:-1].numel())
    model.lm_head.register_forward_hook(count)  # rows whose next-token logits were computed

    for engine in args.engines.split(","):
        kw = dict(temperature=1.0, top_p=1.0, stop_ids=stop_ids, pad_id=0, engine=engine)
        generate(model, prompts[:2], n=2, max_new_tokens=4, **kw)  # warm-up: kernels, allocator
        torch.manual_seed(0)
        logit_rows[0] = 0
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ro = generate(model, prompts, n=args.samples, max_new_tokens=args.max_new_tokens, **kw)
        sync()
        seconds = time.perf_counter() - t0
        B, R = ro.response_ids.shape
        useful = int(ro.lengths.sum())
        row_steps = B * R if engine == "pad" else useful
        line = dict(engine=engine, tokens_per_s=round(useful / seconds, 1),
                    useful_token_fraction=round(useful / row_steps, 3), seconds=round(seconds, 2), rows=B,
                    device=name, model=args.model_config, dtype=str(dtype)[6:],
                    attn=model.config._attn_implementation, useful_tokens=useful,
                    row_steps=row_steps, logit_rows=logit_rows[0], mean_len=round(useful / B, 1), max_len=R,
                    hit_max=round(sum(r == "length" for r in ro.finish_reason) / B, 3),
                    max_new_tokens=args.max_new_tokens, prompt_len=f"{args.prompt_len // 2}-{args.prompt_len}")
        if cuda:
            ideal = roofline_seconds(model, prompts, ro.lengths, args.samples)
            line["hbm_roofline_pct"] = round(100 * ideal / seconds, 1)
            line["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
