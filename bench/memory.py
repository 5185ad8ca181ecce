"""Per-GPU memory of train.py, COMPUTED from the model shapes (not measured):
    python bench/memory.py [--gpus=8,16] [--micro_batch_tokens=32768] [--max_response_len=8192]

For each Qwen2.5 size x GPU count (32B also 64) x --shard mode: the resident bytes at load, during the rollout and
during the update of a Zoo step (1024 prompts x 8 samples, prompts <= 1024 tokens, kl_coef > 0 so a frozen reference
is loaded), and how many sequences one HF generate call can hold in its KV cache on an 80 GB H100 with 10% headroom.
Every formula is in a function below and written out in MEMORY.md. GiB = 2**30 bytes, as train.py's peak_mem_gib.
"""
import argparse
import math
from collections import namedtuple

GIB = 2**30
BUDGET = 80 * 0.9 * GIB      # H100-80GB (~79.6 GiB usable) minus ~10% for fragmentation, NCCL, CUDA context
PROMPTS, G, PROMPT_LEN = 1024, 8, 1024  # train.Config: prompts_per_step, samples_per_prompt, max_prompt_len
LOGIT_CHUNK = 2048           # model.token_logprobs chunk rows
C_H, C_I = 16, 4             # one decoder layer's activations per token, in bf16 elements: 16*hidden + 4*intermediate
C_PREFILL_H, C_PREFILL_I = 8, 3  # the same without autograd (prefill, no_grad): fewer live tensors

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
ZOO_GPUS = {"7b": 16, "14b": 16, "32b": 64}  # RECIPE.md hardware; 0.5B/1.5B: no count given


def layer_params(m):
    """q/k/v projections with bias (Qwen2), o without, SwiGLU MLP (gate, up, down), two RMSNorm weights."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    return m.hidden * q + q + 2 * (m.hidden * kv + kv) + q * m.hidden + 3 * m.hidden * m.inter + 2 * m.hidden


def root_params(m):
    """What FSDP's root unit owns: embeddings, lm_head (unless tied to the embeddings), final norm."""
    return m.vocab * m.hidden * (1 if m.tied else 2) + m.hidden


def n_params(m):
    return m.layers * layer_params(m) + root_params(m)


def kv_bytes_per_token(m, mode, tp=1):
    """K and V of every layer. bf16, except K under ddp: with fp32 weights the rotary cos/sin are fp32 and promote
    the (autocast bf16) keys to fp32 before they enter the cache (checked on transformers 5.24, CPU autocast).
    With --gen_tp the bf16 tensor-parallel copy holds kv_heads / tp heads per GPU."""
    if tp > 1:
        return m.layers * m.kv_heads // tp * m.head_dim * 4
    return m.layers * m.kv_heads * m.head_dim * ((4 if mode == "ddp" else 2) + 2)


def tp_copy(m, tp):
    """--gen_tp: the rollout's bf16 copy, split by heads/columns over tp GPUs; embeddings, norms, lm_head replicated.
    It stays allocated for the whole run (rollout and update)."""
    return 0 if tp == 1 else 2 * (m.layers * layer_params(m) / tp + root_params(m))


def load_peak(m, mode, n, tp=1):
    """ddp: every rank loads the fp32 policy (4P), DDP allocates its gradient buckets (4P; the gradients are views
    into them), then the reference loads in bf16 (2P). zero2/zero3: the models are built on the meta device and
    sharded; rank 0 alone reads the weights (into HOST memory, in the checkpoint's dtype: 2P for bf16 Qwen2.5) and
    broadcasts them tensor by tensor, so a GPU holds its fp32 policy shards, its bf16 reference shards and one full
    tensor in flight (the embedding, bf16)."""
    P = n_params(m)
    if mode == "ddp":
        return (4 + 4 * (n > 1) + 2) * P + tp_copy(m, tp)
    return 4 * P / n + 2 * P / n + 2 * m.vocab * m.hidden + tp_copy(m, tp)


def resident(m, mode, n, phase, tp=1):
    """Bytes per rank, by component, outside activations/KV. phase: 'gen' (rollout) or 'update' (backward)."""
    P, upd = n_params(m), phase == "update"
    out = {"tp copy": tp_copy(m, tp)}
    if mode == "ddp":  # full fp32 replica + Adam; the gradients live in DDP's buckets (gradient_as_bucket_view)
        out.update({"params+grads+adam": 12 * P, "ddp buckets": 4 * P * (n > 1), "ref": 2 * P})
        # autocast caches a bf16 copy of every fp32 weight (leaf, requires_grad), no_grad or not, until the
        # `with autocast` block exits: the whole rollout (unless the tp copy generates), or one mini-batch of updates
        out["bf16 weights"] = 2 * P if upd or tp == 1 else 0
        return out
    # FSDP2: fp32 shards of params (+ grads in the update; zero_grad(set_to_none) frees them) and Adam m, v
    out.update({"params+grads+adam": (4 + 4 * upd + 8) * P / n, "ref": 2 * P / n})  # ref: bf16, resharded
    if not upd:  # gathered() for the rollout, or nothing when the tp copy generates
        out["bf16 weights"] = 2 * P if tp == 1 else 0
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


def per_row_gen(m, mode, response_len, tp=1):
    """One generate row: KV for prompt+response (every row of a call at full length: the worst case), and the
    per-step logits (bf16 out of lm_head, fp32 copy, /T, softmax = ~14 bytes per vocab entry). Prefill of the prompt
    is checked too."""
    kv = kv_bytes_per_token(m, mode, tp)
    decode = (PROMPT_LEN + response_len) * kv + 14 * m.vocab
    prefill = PROMPT_LEN * (kv + (C_PREFILL_H * m.hidden + C_PREFILL_I * m.inter) * 2)
    return max(decode, prefill)


def estimate(m, mode, n, micro_batch_tokens, response_len, tp=1):
    """With tp > 1 a group of tp GPUs decodes its ranks' prompts together: rows/call and the Zoo's rows are per group."""
    gen, upd = resident(m, mode, n, "gen", tp), resident(m, mode, n, "update", tp)
    act = activations(m, mode, micro_batch_tokens)
    kv_room = BUDGET - sum(gen.values())
    rows = max(0, math.floor(kv_room / per_row_gen(m, mode, response_len, tp)))
    zoo_prompts = PROMPTS // n * tp  # per generating group (one rank when tp == 1)
    # generate() takes whole prompts (G rows each); below G rows a prompt's samples would have to be split too
    calls = math.ceil(zoo_prompts / (rows // G)) if rows >= G else math.ceil(zoo_prompts * G / rows) if rows else None
    return dict(gen=gen, upd=upd, act=act, gen_static=sum(gen.values()), upd_peak=sum(upd.values()) + act,
                load=load_peak(m, mode, n, tp), kv_room=kv_room, rows=rows, zoo_rows=zoo_prompts * G, calls=calls)


def fits(e):
    return e["load"] <= BUDGET and e["upd_peak"] <= BUDGET and e["rows"] >= G  # generate takes whole prompts


def best_setup(m, n, response_len):
    """At n GPUs: the simplest (shard, gen_tp) needing the fewest generate calls, and the largest
    micro_batch_tokens (>= one full sequence) whose update still fits. None when nothing fits."""
    est = {st: estimate(m, st[0], n, 32768, response_len, st[1]) for st in setups(m)}
    ok = [st for st in est if fits(est[st])]
    if not ok:
        return None
    st = min(ok, key=lambda st: est[st]["calls"])  # min keeps the first (simplest) of equal call counts
    mbt = [t for t in (16384, 32768, 65536, 131072)
           if t >= PROMPT_LEN + response_len and fits(estimate(m, st[0], n, t, response_len, st[1]))]
    return st, (mbt[-1] if mbt else None), est[st]


def recommend(name, gpus, response_len):
    """One line per model: the Zoo's GPU count if it fits (RECIPE.md: 7B/14B 16, 32B 64), else the smallest GPU count
    that fits; the other counts follow."""
    m, lines = MODELS[name], []
    best = {n: best_setup(m, n, response_len) for n in gpus}
    for n in sorted(gpus, key=lambda n: (n != ZOO_GPUS.get(name) or best[n] is None, n)):
        if best[n]:
            (mode, tp), mbt, e = best[n]
            who = "rank" if tp == 1 else f"group of {tp}"
            calls = ("fits in ONE generate call" if e["calls"] == 1 else
                     f"does NOT fit one generate call: {e['calls']} calls of <= {e['rows'] // G * G} rows "
                     f"(--rollout_prompts={e['rows'] // G})")
            lines.append(f"{n} GPUs, --shard={mode}" + f" --gen_tp={tp}" * (tp > 1) + f", --micro_batch_tokens="
                         f"{mbt or 'none fits'}: <= {e['rows']} sequences per generate call (KV room "
                         f"{e['kv_room'] / GIB:.1f} GiB); the Zoo's {e['zoo_rows']} rows per {who} {calls}")
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
        print(f"- {name}: {n_params(m) / 1e9:.3f}B (card {m.published / 1e9:.2f}B), KV "
              f"{kv_bytes_per_token(m, 'zero2') // 1024} KiB/token (ddp: x1.5), one layer "
              f"{layer_params(m) / 1e6:.1f}M, root {root_params(m) / 1e6:.1f}M")
    print(f"\nGiB per GPU; budget {g(BUDGET)} GiB (80 GiB - 10%); prompt {PROMPT_LEN} + response "
          f"{a.max_response_len} tokens per row; micro_batch_tokens {a.micro_batch_tokens}.\n")
    print("| model | GPUs | shard | load peak | rollout: state+ref | rollout: bf16 weights | KV room | rows/call "
          "| Zoo rows/rank (tp: /group) | generate calls | update: state+ref+bufs | update: bf16 weights "
          "| activations | update peak | fits |")
    print("|" + "---|" * 15)
    for name, m in MODELS.items():
        for n in gpus + [64] * (name == "32b" and 64 not in gpus):
            for mode, tp in setups(m):
                e = estimate(m, mode, n, a.micro_batch_tokens, a.max_response_len, tp)
                print(f"| {name} | {n} | {mode}{f' tp{tp}' * (tp > 1)} | {g(e['load'])} "
                      f"| {g(e['gen_static'] - e['gen']['bf16 weights'])} "
                      f"| {g(e['gen']['bf16 weights'])} | {g(max(e['kv_room'], 0))} | {e['rows']} | {e['zoo_rows']} "
                      f"| {e['calls'] or '-'} | {g(e['upd_peak'] - e['act'] - e['upd']['bf16 weights'])} "
                      f"| {g(e['upd']['bf16 weights'])} | {g(e['act'])} | {g(e['upd_peak'])} "
                      f"| {'yes' if fits(e) else 'NO'} |")
    print("\nRecommendations (per-rank rollout = 1024 / GPUs prompts x 8 samples):")
    for name in MODELS:
        print(recommend(name, gpus + [64] * (name == "32b" and 64 not in gpus), a.max_response_len))


if __name__ == "__main__":
    main()
