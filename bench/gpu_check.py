"""GPU checks of rollout's engine "slots", for what the CPU tests cannot reach: python bench/gpu_check.py [--dry]

1. decode attention: the flash path (flash_attn_with_kvcache where flash-attn imports, else torch's varlen flash with
   seqused_k) against masked SDPA in fp32, on one random bf16 cache whose slots hold different lengths: max abs error
   of the attention output (bf16: ~1e-2), and that the flash path left the cache as the SDPA path did.
2. end to end, a small random Qwen2 in bf16 with its output layer x8 (peaked distributions), 12 prompts x 4 samples on
   16 slots (refilled), every row run to max_new_tokens (the stop id is outside the vocabulary), so the busy slots are
   always a multiple of 4 = the graphs' rounding grain: eager decodes the SAME batch sizes b as the graphs
   (same_shapes: the b's seen eagerly equal those captured), so a mismatch blames the graph, not a kernel whose
   result depends on b. Greedy tokens with CUDA graphs == without (CUDA_GRAPHS = False: the same kernels, eager);
   greedy rows equal to "pad"'s (bf16 kernels that depend on the batch shape may flip near-ties: a fraction); decode
   log-probs of a sampled rollout (T=1, top_p=0.9) against a teacher-forced full forward (sdpa) of the same tokens
   (max and mean abs error).
3. sampling at T = 1 (the noise of a replayed graph): (a) token histograms: one prompt repeated, 4096 rows, the token
   each row samples at its last decode step (rows are independent: a multinomial sample each; output layer x4),
   graphs against eager at the same b, by a two-sample chi-square test (categories with pooled count < 10 merged); it
   passes at p >= 1e-3.
   Two controls in the same run show the test's power: eager against eager with another seed (chance: must pass) and
   eager at T = 1 against T = 1.25 (a real difference: must fail). (b) replays draw fresh noise: a graph of
   rollout.sample captured once and replayed twice on the same logits draws different tokens; and a model whose
   logits are all zero (uniform over the vocabulary) decoded with graphs repeats its previous token at a rate ~1/V
   (a baked RNG offset would give the same draw at every replay: rate ~1).
One JSON line per check, each with ok: true/false. --dry runs 2 and 3 on the CPU in fp32 at toy sizes (plumbing only:
no graphs there; at its 256 rows the T = 1.25 control can miss p < 1e-3, so ok may read false).
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
    err, written = (out.float() - ref).abs().max().item(), torch.equal(flash_cache.float(),
                                                                      ref_cache.to(torch.bfloat16).float())
    return dict(check="decode_attention", kernel="flash_attn" if rollout.FLASH_ATTN_WITH_KVCACHE else "torch_flash",
                max_abs_err=round(err, 5), ref_max_abs=round(ref.abs().max().item(), 3), cache_written=written,
                ok=err < 0.05 and written)


def small_model(device, dtype, scale=8.0):
    """A random Qwen2 (4 layers, width 512, vocab 4096) with its output layer x scale (8: peaked distributions; 0: all
    logits zero, uniform)."""
    cfg = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def decode_sizes(model):
    """Records the batch size of every eager decode forward (graph replays are not seen; captures are)
    -> (set, handle)."""
    seen = set()
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: seen.add(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True)
    return seen, handle


def end_to_end(device, dtype, count=12, max_new_tokens=64):
    model = small_model(device, dtype)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (int(n),), generator=g).tolist()
               for n in torch.randint(5, 200, (count,), generator=g)]
    kw = dict(n=4, max_new_tokens=max_new_tokens, top_p=1.0, stop_ids=[V], pad_id=0)  # no stop: rows run to the end
    stats = {}
    graph_b, handle = decode_sizes(model)
    graphs = generate(model, prompts, temperature=0, engine="slots", slots=16, stats=stats, **kw)
    handle.remove()
    rollout.CUDA_GRAPHS = False
    eager_b, handle = decode_sizes(model)
    eager = generate(model, prompts, temperature=0, engine="slots", slots=16, **kw)
    handle.remove()
    rollout.CUDA_GRAPHS = True
    pad = generate(model, prompts, temperature=0, engine="pad", **kw)
    torch.manual_seed(1)  # top_p < 1: the nucleus sort runs inside the graphs too
    ro = generate(model, prompts, temperature=1.0, engine="slots", slots=16, return_logprobs=True,
                  **dict(kw, top_p=0.9, stop_ids=[1]))
    errs = []
    with torch.no_grad():
        for p, r, m, lp in zip(ro.prompt_ids, ro.response_ids, ro.response_mask, ro.logprobs):
            ids = torch.tensor(p + r[m].tolist(), device=device)[None]
            z = model(input_ids=ids).logits[0, len(p) - 1:-1].float()  # (len, V)
            errs.append((z.log_softmax(-1).gather(1, ids[0, len(p):, None]).squeeze(1).cpu() - lp[m]).abs())
    err = torch.cat(errs)
    equal = torch.equal(graphs.response_ids, eager.response_ids)
    return dict(check="end_to_end", device=str(device), dtype=str(dtype)[6:], stats=stats,
                graph_batch_sizes=sorted(graph_b), eager_batch_sizes=sorted(eager_b), same_shapes=graph_b == eager_b,
                graphs_equal_eager=equal,
                rows_equal_pad=round(sum(torch.equal(a, b) for a, b in zip(graphs.response_ids, pad.response_ids))
                                     / len(pad.response_ids), 3),
                logprob_max_abs_err=round(err.max().item(), 4), logprob_mean_abs_err=round(err.mean().item(), 5),
                tokens=len(err), ok=equal and graph_b == eager_b)  # log-prob errors: read them (bf16: ~1e-2)


def chi_square_p(a, b, min_count=10):
    """Two-sample chi-square test of two token samples a, b (1-D long) drawn from one distribution: categories with
    pooled count < min_count merged into one -> (p-value, degrees of freedom)."""
    V = int(max(a.max(), b.max())) + 1
    ca, cb = torch.bincount(a, minlength=V).double(), torch.bincount(b, minlength=V).double()  # (V,)
    rare = ca + cb < min_count
    ca = torch.cat([ca[~rare], ca[rare].sum()[None]])  # (k,) the last category: the merged rare ones
    cb = torch.cat([cb[~rare], cb[rare].sum()[None]])
    keep = ca + cb > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    pooled = (ca + cb) / (na + nb)  # (k,)
    stat = ((ca - na * pooled) ** 2 / (na * pooled) + (cb - nb * pooled) ** 2 / (nb * pooled)).sum()
    df = len(ca) - 1
    return torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2).item(), df  # P(chi2_df > stat)


def sampling_check(device, dtype, prompts=256, n=16, slots=64, max_new_tokens=8):
    """Check 3 (see the docstring): graph sampling at T = 1 against eager, with its two controls; fresh noise per
    replay."""
    model = small_model(device, dtype, scale=4.0)  # less peaked than x8: more categories in the histograms
    V = model.config.vocab_size
    prompt = torch.randint(3, V, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(n=n, max_new_tokens=max_new_tokens, top_p=1.0, stop_ids=[V], pad_id=0, engine="slots", slots=slots)

    def last_tokens(graphs, seed, temperature=1.0):  # (prompts * n,) each row's token at its last decode step
        rollout.CUDA_GRAPHS = graphs
        torch.manual_seed(seed)
        sizes, handle = decode_sizes(model)
        try:
            ro = generate(model, [prompt] * prompts, temperature=temperature, **kw)
        finally:
            rollout.CUDA_GRAPHS = True
            handle.remove()
        return ro.response_ids[:, -1], sizes
    graph_tokens, graph_b = last_tokens(True, 1)
    eager_tokens, eager_b = last_tokens(False, 2)
    p_graphs, df = chi_square_p(graph_tokens, eager_tokens)
    p_chance = chi_square_p(last_tokens(False, 3)[0], eager_tokens)[0]
    p_real = chi_square_p(last_tokens(False, 4, temperature=1.25)[0], eager_tokens)[0]

    # fresh noise: one captured graph of rollout.sample, replayed twice on the same logits
    logits = torch.zeros(64, V, device=device)  # (64, V) uniform
    if device.type == "cuda":
        rollout.sample(logits, 1.0, 1.0)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            drawn = rollout.sample(logits, 1.0, 1.0)  # (64,)
        graph.replay()
        first = drawn.clone()
        graph.replay()
        replays_differ = not torch.equal(first, drawn)
    else:
        replays_differ = not torch.equal(rollout.sample(logits, 1.0, 1.0), rollout.sample(logits, 1.0, 1.0))
    # and in the engine: all-zero logits, every step a uniform draw; a repeat of the previous token has chance 1 / V
    flat = small_model(device, dtype, scale=0.0)
    torch.manual_seed(5)
    ro = generate(flat, [prompt] * 16, temperature=1.0, **dict(kw, n=4, max_new_tokens=16, slots=64))
    steps = ro.response_ids[:, 1:]  # (64, 15) tokens of decode steps (position 0 came from the prefill)
    repeat_rate = (steps[:, 1:] == steps[:, :-1]).double().mean().item()
    ok = p_graphs >= 1e-3 and p_chance >= 1e-3 and p_real < 1e-3 and replays_differ and repeat_rate < 0.01 \
        and graph_b == eager_b
    return dict(check="sampling_T1", device=str(device), dtype=str(dtype)[6:], rows=prompts * n, categories_df=df,
                p_graphs_vs_eager=round(p_graphs, 4), p_control_chance=round(p_chance, 4),
                p_control_T1_vs_T1p25=p_real, same_shapes=graph_b == eager_b, graph_batch_sizes=sorted(graph_b),
                sample_graph_replays_differ=replays_differ, engine_repeat_rate=round(repeat_rate, 5),
                repeat_rate_chance=round(1 / V, 5), ok=ok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="CPU, fp32: checks 2 and 3 at toy sizes")
    args = ap.parse_args()
    if args.dry or not torch.cuda.is_available():
        cpu = torch.device("cpu")
        torch.set_num_threads(1)  # a shared 2-core box: 2 OpenMP threads ran 5-20x slower (bench/rollout.py --quick)
        print(json.dumps(end_to_end(cpu, torch.float32, count=5, max_new_tokens=16)), flush=True)
        print(json.dumps(sampling_check(cpu, torch.float32, prompts=32, n=8, slots=32, max_new_tokens=3)), flush=True)
        return
    device = torch.device("cuda")
    for check in (lambda: attention_check(device), lambda: end_to_end(device, torch.bfloat16),
                  lambda: sampling_check(device, torch.bfloat16)):
        try:  # each check independent: one raising does not hide the others
            print(json.dumps(check()), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(check="error", error=f"{type(e).__name__}: {e}", ok=False)), flush=True)


if __name__ == "__main__":
    main()
