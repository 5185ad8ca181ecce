"""Per-GPU memory of train.py, COMPUTED from the model shapes (not measured: no GPU has run this design yet):
    python bench/memory.py [--gpus=8,16] [--micro_batch_tokens=32768] [--max_response_len=8192]

For each Qwen2.5 size x GPU count (32B also 64) x --shard mode (and zero3 with --gen_tp), on an 80 GB H100, in a Zoo
step (1024 prompts x 8 samples, prompts <= 1024 tokens, kl_coef > 0 so a frozen reference is loaded) with the default
rollout engine "slots": the resident bytes at load, during the rollout and during the update; the KV-cache slots of
(1024 + max_response_len) tokens that rollout.kv_slots allocates in the memory left (90% of the free memory, less a
prefill), and whether a step fits. The rollout runs on distributed.inference_copy, a bf16 copy of the policy (split
over the tp group when gen_tp > 1) that is allocated at load and stays for the whole run, update included.
Every formula is in a function below and written out in MEMORY.md. GiB = 2**30 bytes, as train.py's peak_mem_gib.
"""
import argparse
import math
from collections import namedtuple

GIB = 2**30
GPU = 80 * GIB               # H100-80GB as planned (torch sees ~79.6 GiB, of which the CUDA context and NCCL take ~1-2)
BUDGET = 0.9 * GPU           # load and update peaks must stay under it: ~10% for fragmentation, NCCL, CUDA context
FREE_SHARE = 0.9             # rollout.slots_that_fit: slots take 90% of the free memory (after empty_cache)
SLOT_TEMPS = 56              # rollout.kv_slots: bytes per vocabulary entry of a slot's decode-step temporaries
PROMPTS, G, PROMPT_LEN = 1024, 8, 1024  # train.Config: prompts_per_step, samples_per_prompt, max_prompt_len
LOGIT_CHUNK = 2048           # model.token_logprobs chunk rows
C_H, C_I = 16, 4             # one decoder layer's activations per token, in bf16 elements: 16*hidden + 4*intermediate
C_PREFILL_H, C_PREFILL_I = 8, 3  # the same without autograd (prefill, no_grad): rollout.kv_slots' constants

Model = namedtuple("Model", "hidden layers heads kv_heads head_dim inter vocab tied published")
MODELS = {  # Qwen/Qwen2.5-*/config.json (+ head_dim = hidden / heads); `published` = the model card's count
    "0.5b": Model(896, 24, 14, 2, 64, 4864, 151936, True, 0.49e9),
    "1.5b": Model(1536, 28, 12, 2, 128, 8960, 151936, True, 1.54e9),
    "7b": Model(3584, 28, 28, 4, 128, 18944, 152064, False, 7.62e9),
    "14b": Model(5120, 48, 40, 8, 128, 13824, 152064, False, 14.7e9),
    "32b": Model(5120, 64, 40, 8, 128, 27648, 152064, False, 32.8e9),
}
MODES = ("ddp", "zero2", "zero3")


def max_tp(m):
    """The largest --gen_tp <= 8 (one node) that divides the heads, KV heads and MLP width (distributed.tp_plan)."""
    return max(t for t in (1, 2, 4, 8) if not (m.heads % t or m.kv_heads % t or m.inter % t))


def setups(m):
    """(shard, gen_tp) pairs, simplest first: ddp, zero2, zero3, then zero3 with the tensor-parallel rollout copy."""
    return [(mode, 1) for mode in MODES] + [("zero3", max_tp(m))] * (max_tp(m) > 1)
ZOO_GPUS = {"7b": 16, "14b": 16, "32b": 64}  # the Zoo's hardware (README: the recipe); 0.5B/1.5B: no count given


def layer_params(m):
    """q/k/v projections with bias (Qwen2), o without, SwiGLU MLP (gate, up, down), two RMSNorm weights."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    return m.hidden * q + q + 2 * (m.hidden * kv + kv) + q * m.hidden + 3 * m.hidden * m.inter + 2 * m.hidden


def root_params(m):
    """What FSDP's root unit owns: embeddings, lm_head (unless tied to the embeddings), final norm."""
    return m.vocab * m.hidden * (1 if m.tied else 2) + m.hidden


def n_params(m):
    return m.layers * layer_params(m) + root_params(m)


def kv_bytes_per_token(m, tp=1):
    """K and V of every layer, bf16 in every shard mode: the slot cache's dtype is autocast's (rollout.slot_attention
    casts K/V to it), and the copy that generates is bf16 anyway. With --gen_tp a GPU holds kv_heads / tp heads."""
    return m.layers * m.kv_heads // tp * m.head_dim * 2 * 2


def inference_copy(m, tp=1):
    """distributed.inference_copy, the model that generates: bf16, allocated at load, refreshed by copy_weights before
    each rollout, and resident for the whole run (rollout AND update). gen_tp = 1: the full model on every GPU (2P).
    gen_tp > 1: each layer's projections (biases included) split over the tp group by tp_plan; the layer's two RMSNorm
    weights and the root (embeddings, final norm, lm_head) replicated."""
    if tp == 1:
        return 2 * n_params(m)
    norms = 2 * m.hidden
    return 2 * (m.layers * ((layer_params(m) - norms) / tp + norms) + root_params(m))


def load_peak(m, mode, n, tp=1):
    """ddp: every rank loads the fp32 policy (4P), then the reference in bf16 (2P), DDP allocates its gradient buckets
    (4P; the gradients are views into them), then the inference copy. zero2/zero3: the models are built on the meta
    device and sharded; rank 0 alone reads the weights (into HOST memory, in the checkpoint's dtype: 2P for bf16
    Qwen2.5) and broadcasts them tensor by tensor, so a GPU holds its fp32 policy shards, its bf16 reference shards and
    one full tensor in flight (the embedding, bf16); that tensor is freed before the inference copy is allocated."""
    P = n_params(m)
    if mode == "ddp":
        return (4 + 4 * (n > 1) + 2) * P + inference_copy(m, tp)
    return 4 * P / n + 2 * P / n + max(2 * m.vocab * m.hidden, inference_copy(m, tp))


def adam_states(m, mode, n):
    """AdamW's m and v, fp32: 8P per rank under ddp, 8P/N under zero2/zero3 (sharded like the parameters). train.py
    creates them before the first rollout (train.create_adam_states), so every step's rollout has them resident."""
    return 8 * n_params(m) / (1 if mode == "ddp" else n)


def resident(m, mode, n, phase, tp=1):
    """Bytes per rank, by component, outside the KV cache and activations. phase: 'gen' (rollout) or 'update'
    (backward). Adam's m and v exist from before the first rollout on (adam_states)."""
    P, upd = n_params(m), phase == "update"
    out = {"inference copy": inference_copy(m, tp)}
    if mode == "ddp":  # full fp32 replica + Adam; the gradients live in DDP's buckets (gradient_as_bucket_view), which
        # exist from load on with several ranks; alone, the gradients exist in the update only (zero_grad(set_to_none))
        out.update({"params+grads+adam": (4 + 4 * (n > 1 or upd)) * P + adam_states(m, mode, n), "ref": 2 * P})
        # autocast caches a bf16 copy of every fp32 weight that requires grad (no_grad or not) until the `with autocast`
        # block exits: one mini-batch of the update (and the log-prob passes). The rollout reads the bf16 copy: none.
        out["bf16 weights"] = 2 * P * upd
        return out
    # FSDP2: fp32 shards of params (+ grads in the update; zero_grad(set_to_none) frees them) and Adam m, v
    out.update({"params+grads+adam": (4 + 4 * upd) * P / n + adam_states(m, mode, n), "ref": 2 * P / n})  # ref: bf16
    if not upd:  # the rollout gathers nothing: copy_weights unshards one unit at a time, before the KV cache exists
        out["bf16 weights"] = 0
    elif mode == "zero2":  # every layer stays gathered through forward+backward
        out["bf16 weights"] = 2 * P
    else:  # zero3: the root + the running layer + the prefetched one
        out["bf16 weights"] = 2 * (root_params(m) + 2 * layer_params(m))
    if upd:  # one layer's unsharded bf16 grads + their fp32 copy for the fp32 reduce-scatter
        out["grad buffers"] = 6 * layer_params(m)
    return out


def activations(m, mode, tokens):
    """Update with gradient checkpointing on a micro-batch of `tokens` (padded) tokens. The residual stream is fp32
    under ddp (fp32 embedding output; autocast does not cast adds) and bf16 under FSDP (bf16 params)."""
    ckpt = m.layers * tokens * m.hidden * (4 if mode == "ddp" else 2)  # each layer's saved input
    recompute = tokens * (C_H * m.hidden + C_I * m.inter) * 2          # one layer re-run in backward
    logits = LOGIT_CHUNK * m.vocab * 4 * 4                              # fp32 z, softmax, softmax*z, grad
    return ckpt + recompute + logits


def prefill_bytes(m, prompt_len=PROMPT_LEN):
    """One prompt's prefill (batch 1, no_grad, logits of its last position only), as rollout.kv_slots reserves it."""
    return prompt_len * (C_PREFILL_H * m.hidden + C_PREFILL_I * m.inter) * 2


def slot_bytes(m, cap, tp=1):
    """One slot: KV of `cap` tokens (longest prompt + max_response_len; the cache is static, allocated at full length
    for every slot) plus its share of a decode step's temporaries (bf16 and fp32 logits, softmax, the race's noise,
    sort, cumsum, log-softmax: SLOT_TEMPS bytes per vocabulary entry; lm_head is replicated under gen_tp)."""
    return cap * kv_bytes_per_token(m, tp) + SLOT_TEMPS * m.vocab


def kv_slots(m, resident_bytes, rows, cap, tp=1, prompt_len=PROMPT_LEN, gpu=GPU):
    """rollout.kv_slots on a GPU of `gpu` bytes whose allocator holds `resident_bytes`: 90% of the free memory, less a
    prefill, over slot_bytes; at most `rows` (the call's rows: a rank's, or its tp group's)."""
    room = FREE_SHARE * (gpu - resident_bytes) - prefill_bytes(m, prompt_len)
    return max(0, min(rows, math.floor(room / slot_bytes(m, cap, tp))))


def estimate(m, mode, n, micro_batch_tokens, response_len, tp=1):
    """With tp > 1 a group of tp GPUs decodes its ranks' prompts together: S and the Zoo's rows are per group (each GPU
    of it holds S slots of kv_heads / tp heads)."""
    gen, upd = resident(m, mode, n, "gen", tp), resident(m, mode, n, "update", tp)
    act, cap = activations(m, mode, micro_batch_tokens), PROMPT_LEN + response_len
    zoo_rows = PROMPTS // n * tp * G  # per generating rank (tp == 1) or group
    S = kv_slots(m, sum(gen.values()), zoo_rows, cap, tp)
    out_bufs = 8 * (zoo_rows + 1) * response_len  # _generate_slots' int64 token buffer (B + 1, max_new_tokens)
    return dict(gen=gen, upd=upd, act=act, gen_static=sum(gen.values()), upd_peak=sum(upd.values()) + act,
                load=load_peak(m, mode, n, tp), kv_room=FREE_SHARE * (GPU - sum(gen.values())) - prefill_bytes(m),
                slots=S, zoo_rows=zoo_rows, waves=math.ceil(zoo_rows / S) if S else None,
                gen_peak=sum(gen.values()) + S * slot_bytes(m, cap, tp) + prefill_bytes(m) + out_bufs)


def fits(e):
    return e["load"] <= BUDGET and e["upd_peak"] <= BUDGET and e["slots"] >= G  # a prompt needs its G slots at once


def best_setup(m, n, response_len):
    """At n GPUs: the simplest (shard, gen_tp) whose slots decode the Zoo's rows in the fewest waves (rows / slots,
    rounded up), and the largest micro_batch_tokens (>= one full sequence) whose update still fits. None when nothing
    fits."""
    est = {st: estimate(m, st[0], n, 32768, response_len, st[1]) for st in setups(m)}
    ok = [st for st in est if fits(est[st])]
    if not ok:
        return None
    st = min(ok, key=lambda st: est[st]["waves"])  # min keeps the first (simplest) of equal wave counts
    mbt = [t for t in (16384, 32768, 65536, 131072)
           if t >= PROMPT_LEN + response_len and fits(estimate(m, st[0], n, t, response_len, st[1]))]
    return st, (mbt[-1] if mbt else None), est[st]


def recommend(name, gpus, response_len):
    """One line per model: the Zoo's GPU count if it fits (the Zoo: 7B/14B 16, 32B 64), else the smallest GPU count
    that fits; the other counts follow."""
    m, lines = MODELS[name], []
    best = {n: best_setup(m, n, response_len) for n in gpus}
    for n in sorted(gpus, key=lambda n: (n != ZOO_GPUS.get(name) or best[n] is None, n)):
        if best[n]:
            (mode, tp), mbt, e = best[n]
            who = "rank" if tp == 1 else f"group of {tp}"
            at_once = ("all decode at once" if e["waves"] == 1 else
                       f"{e['zoo_rows'] / e['slots']:.1f} rows per slot, decoded as slots free up")
            lines.append(f"{n} GPUs, --shard={mode}" + f" --gen_tp={tp}" * (tp > 1) + f", --micro_batch_tokens="
                         f"{mbt or 'none fits'}: {e['slots']} slots of {PROMPT_LEN + response_len} tokens per GPU "
                         f"(KV room {e['kv_room'] / GIB:.1f} GiB); the Zoo's {e['zoo_rows']} rows per {who}: {at_once}")
    if lines:
        return f"- **{name}**: " + lines[0] + "." + "".join(f" Alternative: {x}." for x in lines[1:])
    return f"- **{name}**: nothing fits on {', '.join(map(str, gpus))} x 80 GB GPUs."


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="8,16", help="comma-separated GPU counts (32b also gets 64)")
    ap.add_argument("--micro_batch_tokens", type=int, default=32768)
    ap.add_argument("--max_response_len", type=int, default=8192)
    a = ap.parse_args()
    gpus = sorted({int(g) for g in a.gpus.split(",")})
    g = lambda x: f"{x / GIB:.1f}"
    print("Parameter counts from the shapes (vs the model cards):")
    for name, m in MODELS.items():
        print(f"- {name}: {n_params(m) / 1e9:.3f}B (card {m.published / 1e9:.2f}B), KV {kv_bytes_per_token(m) // 1024} "
              f"KiB/token (bf16, every mode), one slot {slot_bytes(m, PROMPT_LEN + a.max_response_len) / 2**20:.0f} "
              f"MiB, one layer {layer_params(m) / 1e6:.1f}M, root {root_params(m) / 1e6:.1f}M")
    print(f"\nGiB per GPU; budget {g(BUDGET)} GiB (80 GiB - 10%) for load and update; the rollout's slots take 90% of "
          f"the free memory; slots of {PROMPT_LEN} + {a.max_response_len} tokens; micro_batch_tokens "
          f"{a.micro_batch_tokens}.\n")
    print("| model | GPUs | shard | inference copy | load peak | rollout: state+ref | KV room | slots/GPU "
          "| Zoo rows/rank (tp: /group) | rows/slot | rollout peak | update: state+ref+bufs | update: bf16 weights "
          "| activations | update peak | fits |")
    print("|" + "---|" * 16)
    for name, m in MODELS.items():
        for n in gpus + [64] * (name == "32b" and 64 not in gpus):
            for mode, tp in setups(m):
                e = estimate(m, mode, n, a.micro_batch_tokens, a.max_response_len, tp)
                copy = e["gen"]["inference copy"]
                per_slot = f"{e['zoo_rows'] / e['slots']:.1f}" if e["slots"] else "-"
                print(f"| {name} | {n} | {mode}{f' tp{tp}' * (tp > 1)} | {g(copy)} | {g(e['load'])} "
                      f"| {g(e['gen_static'] - copy)} | {g(max(e['kv_room'], 0))} | {e['slots']} | {e['zoo_rows']} "
                      f"| {per_slot} | {g(e['gen_peak'])} "
                      f"| {g(e['upd_peak'] - e['act'] - e['upd']['bf16 weights'] - copy)} "
                      f"| {g(e['upd']['bf16 weights'])} | {g(e['act'])} | {g(e['upd_peak'])} "
                      f"| {'yes' if fits(e) else 'NO'} |")
    print("\nRecommendations (per-rank rollout = 1024 / GPUs prompts x 8 samples):")
    for name in MODELS:
        print(recommend(name, gpus + [64] * (name == "32b" and 64 not in gpus), a.max_response_len))


if __name__ == "__main__":
    main()
