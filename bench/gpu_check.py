"""GPU checks of rollout's engine "slots", for what the CPU tests cannot reach: python bench/gpu_check.py [--dry]

1. decode attention: the flash path (flash_attn_with_kvcache where flash-attn imports, else torch's varlen flash with
   seqused_k) against masked SDPA in fp32, on one random bf16 cache whose slots hold different lengths: max abs error
   of the attention output (bf16: ~1e-2), and that the flash path left the cache as the SDPA path did.
2. end to end, a small random Qwen2 in bf16 with its output layer x8 (peaked distributions), 12 prompts x 4 samples on
   16 slots (refilled): greedy tokens with CUDA graphs == without (CUDA_GRAPHS = False: the same kernels, eager);
   greedy rows equal to "pad"'s (bf16 kernels that depend on the batch shape may flip near-ties: a fraction); decode
   log-probs of a sampled rollout (T=1, top_p=0.9) against a teacher-forced full forward (sdpa) of the same tokens
   (max and mean abs error).
One JSON line per check. --dry runs part 2 on the CPU in fp32 with 5 prompts x 16 tokens (plumbing only).
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rollout  # noqa: E402
from rollout import generate, slot_attention  # noqa: E402


def attention_check(device):
    S, L, Hq, Hkv, D = 8, 640, 12, 2, 128  # Qwen2.5-1.5B's heads
    g = torch.Generator(device).manual_seed(0)
    cache = torch.randn(1, 2, S, L, Hkv, D, generator=g, device=device).to(torch.bfloat16)
    pos = torch.tensor([0, 1, 7, 63, 64, 200, 511, 639], device=device)  # (S,) keys already held
    q, k, v = (torch.randn(S, h, 1, D, generator=g, device=device).to(torch.bfloat16) for h in (Hq, Hkv, Hkv))
    layer, scale = SimpleNamespace(layer_idx=0), D ** -0.5
    flash_cache, ref_cache = cache.clone(), cache.float()
    out = slot_attention(layer, q, k, v, None, scale, slot_cache=flash_cache, slot_pos=pos,
                         slot_used=(pos + 1).int())[0]
    mask = (torch.arange(L, device=device) <= pos[:, None])[:, None, None]  # (S, 1, 1, L)
    ref = slot_attention(layer, q.float(), k.float(), v.float(), None, scale, slot_cache=ref_cache, slot_pos=pos,
                         slot_mask=mask)[0]
    return dict(check="decode_attention", kernel="flash_attn" if rollout._flash_attn_with_kvcache() else "torch_flash",
                max_abs_err=round((out.float() - ref).abs().max().item(), 5),
                ref_max_abs=round(ref.abs().max().item(), 3),
                cache_written=torch.equal(flash_cache.float(), ref_cache.to(torch.bfloat16).float()))


def end_to_end(device, dtype, count=12, max_new_tokens=64):
    cfg = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 4096, (int(n),), generator=g).tolist()
               for n in torch.randint(5, 200, (count,), generator=g)]
    kw = dict(n=4, max_new_tokens=max_new_tokens, top_p=1.0, stop_ids=[1], pad_id=0)
    stats = {}
    graphs = generate(model, prompts, temperature=0, engine="slots", slots=16, stats=stats, **kw)
    rollout.CUDA_GRAPHS = False
    eager = generate(model, prompts, temperature=0, engine="slots", slots=16, **kw)
    rollout.CUDA_GRAPHS = True
    pad = generate(model, prompts, temperature=0, engine="pad", **kw)
    torch.manual_seed(1)  # top_p < 1: the nucleus sort runs inside the graphs too
    ro = generate(model, prompts, temperature=1.0, engine="slots", slots=16, return_logprobs=True,
                  **dict(kw, top_p=0.9))
    errs = []
    with torch.no_grad():
        for p, r, m, lp in zip(ro.prompt_ids, ro.response_ids, ro.response_mask, ro.logprobs):
            ids = torch.tensor(p + r[m].tolist(), device=device)[None]
            z = model(input_ids=ids).logits[0, len(p) - 1:-1].float()  # (len, V)
            errs.append((z.log_softmax(-1).gather(1, ids[0, len(p):, None]).squeeze(1).cpu() - lp[m]).abs())
    err = torch.cat(errs)
    return dict(check="end_to_end", device=str(device), dtype=str(dtype)[6:], stats=stats,
                graphs_equal_eager=torch.equal(graphs.response_ids, eager.response_ids),
                rows_equal_pad=round(sum(torch.equal(a, b) for a, b in zip(graphs.response_ids, pad.response_ids))
                                     / len(pad.response_ids), 3),
                logprob_max_abs_err=round(err.max().item(), 4), logprob_mean_abs_err=round(err.mean().item(), 5),
                tokens=len(err))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="CPU, fp32: end to end only")
    args = ap.parse_args()
    if args.dry or not torch.cuda.is_available():
        print(json.dumps(end_to_end(torch.device("cpu"), torch.float32, count=5, max_new_tokens=16)), flush=True)
        return
    device = torch.device("cuda")
    print(json.dumps(attention_check(device)), flush=True)
    print(json.dumps(end_to_end(device, torch.bfloat16)), flush=True)


if __name__ == "__main__":
    main()
