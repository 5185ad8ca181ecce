"""rollout.py engines ("pad", "slots"): identical greedy outputs, decode log-probs == training forward,
and the same sampling distribution, checked against exact next-token probabilities of a tiny model. "slots" runs on
2 prompts' worth of slots, so that its slots are refilled; its schedule, its decode step (no host sync, no copy of the
cache, the same ops at any context) and the step's compiled trace are checked at the end."""
import inspect

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, GenerationConfig, TopPLogitsWarper

import rollout
from bench.rollout import force_lengths, length_probs
from conftest import make_llama_tokenizer, make_model
from model import Policy
from rollout import SlotState, decode_step, generate, kv_shape, slots_attention
from train import Samples, sequence_logprobs

ENGINES = ["pad", "slots"]
TEXTS = ["What is 3 + 5?", "1 2", "Let's think step by step. 7 + 2 =", "9"]  # different lengths: left padding


def sharp_model(tokenizer):
    """The tiny random model with its output layer scaled x8: peaky next-token distributions (top token ~10%, a long
    tail: ~20% of the mass beyond rank 50 at T=0.7), so a wrong temperature, top_k or top_p shows. It ships sampling
    defaults (Qwen2.5-Instruct's, plus min_p and a stronger repetition penalty) that the engines must ignore."""
    model = make_model(tokenizer).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                               repetition_penalty=1.3, min_p=0.05)
    return model


def run(model, prompts, engine, seed=0, **kw):
    torch.manual_seed(seed)
    if engine == "slots":  # slots for 2 prompts: the later prompts wait for free slots
        kw.setdefault("slots", 2 * kw["n"])
    ro = generate(model, prompts, pad_id=0, engine=engine, **kw)
    assert model.config._attn_implementation == "sdpa"  # "slots" restored the model's attention
    return ro


def test_greedy_engines_identical(tokenizer):
    """Greedy, 4 prompts of different lengths x 3 samples, no row stopping: the same tokens from every engine."""
    model = sharp_model(tokenizer)  # top-2 logit gaps along these greedy paths >= 8e-4, fp32 noise ~1e-6
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    ros = {e: run(model, prompts, e, n=3, max_new_tokens=20, temperature=0, top_p=1.0, stop_ids=[0]) for e in ENGINES}
    pad = ros["pad"]
    assert pad.response_ids.shape == (12, 20) and len({tuple(r) for r in pad.response_ids.tolist()}) == 4
    for e, ro in ros.items():
        assert torch.equal(ro.response_ids, pad.response_ids), e
        assert torch.equal(ro.lengths, pad.lengths) and ro.finish_reason == pad.finish_reason, e
        assert ro.prompt_ids == pad.prompt_ids, e


def test_dropping_finished_rows_keeps_greedy_outputs(tokenizer):
    """Stop on a token that greedy decoding emits at different steps for different prompts (and never for some), so
    rows leave the "slots" batch at different times; the outputs must still equal "pad"'s."""
    model = sharp_model(tokenizer)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    args = dict(n=2, max_new_tokens=20, temperature=0, top_p=1.0)
    free = run(model, prompts, "pad", stop_ids=[len(tokenizer)], **args).response_ids[::2]  # (4, 20), never stops
    first = lambda tok: [(r == tok).int().argmax().item() if (r == tok).any() else None for r in free]
    stop = next(t for t in free.flatten().tolist() if None in first(t) and len(set(first(t)) - {None}) >= 2)
    ros = {e: run(model, prompts, e, stop_ids=[stop], **args) for e in ENGINES}
    pad = ros["pad"]
    assert {"stop", "length"} == set(pad.finish_reason) and len(set(pad.lengths.tolist())) >= 3  # rows end apart
    for e, ro in ros.items():
        assert torch.equal(ro.response_ids, pad.response_ids), e
        assert torch.equal(ro.lengths, pad.lengths) and ro.finish_reason == pad.finish_reason, e


@pytest.mark.parametrize("engine,top_p,arch", [("pad", 1.0, "qwen2"), ("slots", 1.0, "qwen2"), ("slots", 0.9, "qwen2"),
                                               ("pad", 1.0, "llama"), ("slots", 1.0, "llama")])
def test_decode_logprobs_equal_training_forward(tokenizer, engine, top_p, arch):
    """Sampled rows that stop at different steps (1 in 64 tokens is a stop token) and run past 32 tokens:
    the decode log-probs of every row equal a fresh forward's, so the rows kept in the cache as others end are the
    right ones. Also on a Llama (tied embeddings; prompts start with the tokenizer's <s>)."""
    tokenizer = make_llama_tokenizer() if arch == "llama" else tokenizer
    model = make_model(tokenizer, arch=arch).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    assert arch == "qwen2" or all(p[0] == tokenizer.bos_token_id for p in prompts)
    T = 0.8
    ro = run(model, prompts, engine, seed=3, n=4, max_new_tokens=40, temperature=T, top_p=top_p,
             stop_ids=list(range(0, len(tokenizer), 64)), return_logprobs=True)
    assert {"stop", "length"} == set(ro.finish_reason) and len(set(ro.lengths.tolist())) >= 4
    assert max(len(p) for p in prompts) + ro.lengths.max() > 40
    B = len(ro.prompt_ids)
    s = Samples(seqs=[torch.cat([torch.tensor(p), r[m]]) for p, r, m in
                      zip(ro.prompt_ids, ro.response_ids, ro.response_mask)],
                prompt_lens=[len(p) for p in ro.prompt_ids], adv=torch.zeros(B), keep=torch.ones(B, dtype=torch.bool),
                old_logp=[None] * B, ref_logp=[None] * B, pad_id=0)
    with torch.no_grad():
        logp, _ = sequence_logprobs(Policy(model), s, list(range(B)), T, torch.device("cpu"))
    decode = ro.logprobs[ro.response_mask]  # (N,) row-major = the same order
    assert logp.shape == decode.shape and (ro.logprobs[~ro.response_mask] == 0).all()
    assert torch.allclose(logp, decode, atol=1e-5), (logp - decode).abs().max()


def test_bad_arguments_raise(tokenizer):
    """An unknown engine ("cb": removed), max_prompts with "slots", fewer slots than samples: refused."""
    model = make_model(tokenizer).eval()
    for engine in ("vllm", "cb"):
        with pytest.raises(ValueError, match="engine"):
            run(model, [[5, 6]], engine, n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, stop_ids=[0])
    with pytest.raises(ValueError, match="max_prompts"):  # "slots" takes all prompts at once
        run(model, [[5, 6]], "slots", n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, stop_ids=[0], max_prompts=1)
    with pytest.raises(ValueError, match="fewer than the n=2 samples"):
        run(model, [[5, 6]], "slots", n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, stop_ids=[0], slots=1)


# -----------------------------------------------------------------------------
# Same distribution: empirical frequencies of the first two generated tokens against exact probabilities.

@torch.no_grad()
def exact(model, prompt, T, top_p):
    """-> p1 (V,) of the first token, cond (V, V) of the second given the first, p2 (V,) of the second: softmax(z/T)
    cut by HF's own TopPLogitsWarper (the reference nucleus) and renormalised."""
    V = model.config.vocab_size
    warp = lambda z: TopPLogitsWarper(top_p)(None, z / T).softmax(-1) if top_p < 1 else (z / T).softmax(-1)
    p1 = warp(model(torch.tensor([prompt])).logits[:, -1])[0]  # (V,)
    cond = warp(model(torch.tensor([prompt + [t] for t in range(V)])).logits[:, -1])  # (V, V)
    return p1, cond, p1 @ cond


def binned(p):
    """Bin of each token by its rank under p: ranks 0..19 alone, 20..49 one bin, the rest one bin -> (V,) long."""
    rank = torch.empty_like(p, dtype=torch.long)
    rank[p.argsort(descending=True)] = torch.arange(len(p))
    return torch.where(rank < 20, rank, torch.where(rank < 50, 20, 21))


def tv(x, p, bins):
    """Total variation between p and either samples x (N,) long or a distribution x (V,) float, over the rank bins."""
    q = x if x.is_floating_point() else torch.bincount(x, minlength=len(p)) / len(x)  # samples -> frequencies
    mass = lambda d: torch.zeros(22).index_add(0, bins, d)  # (22,) mass per bin
    return 0.5 * (mass(q) - mass(p)).abs().sum().item()


def threshold(p, bins, N, sims=500):
    """The largest binned TV of `sims` exact draws of N tokens from p (a Monte Carlo 99.8% bound)."""
    g = torch.Generator().manual_seed(0)
    return max(tv(torch.multinomial(p, N, replacement=True, generator=g), p, bins) for _ in range(sims))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_same_distribution(tokenizer, engine):
    """T=0.7, top_p=1: first and second token frequencies (N=3000 samples of each of two prompts, one left-padded)
    match the exact distributions. The test is shown to detect T=1 (temperature ignored), top_k=20 and top_p=0.8 (as
    shipped in Qwen2.5-Instruct's generation_config)."""
    model, T, N = sharp_model(tokenizer), 0.7, 3000
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    V = len(tokenizer)
    ro = run(model, prompts, engine, n=N, max_new_tokens=2, temperature=T, top_p=1.0, stop_ids=[V])
    assert ro.response_ids.shape == (2 * N, 2)
    for g, prompt in enumerate(prompts):
        got = ro.response_ids[g * N:(g + 1) * N]  # (N, 2) prompt-major
        p1, cond, p2 = exact(model, prompt, T, 1.0)
        for k, p in enumerate([p1, p2]):
            bins = binned(p)
            limit = threshold(p, bins, N)
            top_k = torch.where(bins < 20, p, 0)  # what top_k=20 would leave
            wrong = [exact(model, prompt, 1.0, 1.0)[2 * k], exact(model, prompt, T, 0.8)[2 * k], top_k / top_k.sum()]
            assert min(tv(q, p, bins) for q in wrong) > 2 * limit  # each would fail this test
            assert tv(got[:, k], p, bins) < limit, (engine, g, k, tv(got[:, k], p, bins), limit)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_top_p_nucleus(tokenizer, engine):
    """T=0.7, top_p between two cumulative masses: no token outside the nucleus ever appears (first token, and second
    token given the first), and the first token's frequencies match the renormalised nucleus."""
    model, T, N = sharp_model(tokenizer), 0.7, 3000
    prompt = tokenizer(TEXTS[0])["input_ids"]
    full = exact(model, prompt, T, 1.0)[0].sort(descending=True).values.cumsum(0)  # (V,) cumulative mass by rank
    top_p = ((full[9] + full[10]) / 2).item()  # nucleus = the 11 most probable tokens, far from a boundary
    p1, cond, _ = exact(model, prompt, T, top_p)
    assert (p1 > 0).sum() == 11
    ro = run(model, [prompt], engine, n=N, max_new_tokens=2, temperature=T, top_p=top_p, stop_ids=[len(tokenizer)])
    first, second = ro.response_ids[:, 0], ro.response_ids[:, 1]  # (N,)
    assert (p1[first] > 0).all() and (cond[first, second] > 0).all()
    bins = binned(p1)
    assert tv(first, p1, bins) < threshold(p1, bins, N)


# -----------------------------------------------------------------------------
# "slots": the schedule on forced lengths, and one decode step's ops.

def forced_prompts(model, count, cap, seed=0):
    """Random prompts of 3..9 tokens ending with force_lengths' START token (the last vocabulary id)."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    lens = torch.randint(2, 9, (count,), generator=g)
    return [torch.randint(cap + 3, V - 1, (int(n),), generator=g).tolist() + [V - 1] for n in lens]


def slots_bound(lengths, S, G, k):
    """rollout._generate_slots' bound on decode forwards: floor((sum(l - 1) + B k) / (S - G + 1)) + max(l) + k - 1."""
    return (int((lengths - 1).sum()) + len(lengths) * k) // (S - G + 1) + int(lengths.max()) + k - 1


@pytest.mark.parametrize("every", [1, 4])
def test_slots_schedule_keeps_slots_busy(tokenizer, monkeypatch, every):
    """Lengths FORCED by a logits hook (lognormal, mean 12, 5% run to max_new_tokens = 40), 8 prompts x 3 samples on
    6 slots, stop flags read every `every` steps: the decode forwards, counted by a hook on the model, equal the
    engine's own count and stay within the bound stated in rollout._generate_slots. The chunked "pad" (2 prompts per
    call: the same 6 rows of KV) breaks the same bound (k = 1) on its own lengths: each call waits for its longest
    row."""
    monkeypatch.setitem(rollout.SYNC_EVERY, "cpu", every)
    model = make_model(tokenizer).eval()
    cap, n, S = 40, 3, 6
    prompts = forced_prompts(model, 8, cap)
    force_lengths(model, length_probs(12, cap, at_cap=0.05))
    decodes, prefills = [0], [0]

    def count(module, args, kwargs):
        decodes[0] += "slot_pos" in kwargs
        prefills[0] += "slot_fill" in kwargs
        decodes.append(kwargs["input_ids"].shape[1] == 1)  # every forward of the chunked engine below: one token?
    model.register_forward_pre_hook(count, with_kwargs=True)
    stats = {}
    ro = run(model, prompts, "slots", n=n, max_new_tokens=cap, temperature=1.0, top_p=1.0, stop_ids=[1], slots=S,
             stats=stats)
    lengths = ro.lengths
    assert len(set(lengths.tolist())) >= 8 and lengths.max() > 20  # forced spread
    assert decodes[0] == stats["decode_forwards"] and stats["slots"] == S
    # one prefill forward per refill (all the prompts admitted together), fewer refills than prompts
    assert prefills[0] == stats["prefill_forwards"] == stats["refills"] < len(prompts)
    assert stats["ideal_forwards"] <= stats["decode_forwards"] and 0 < stats["occupancy"] <= 1
    assert stats["schedule_efficiency"] == stats["ideal_forwards"] / stats["decode_forwards"]
    assert stats["row_steps"] == round(stats["occupancy"] * S * stats["decode_forwards"])  # (no graphs: b = busy)
    assert stats["decode_forwards"] <= slots_bound(lengths, S, n, every), (stats, slots_bound(lengths, S, n, every))
    # issue 12's form, ceil(sum / S) + longest + admissions + k: no theorem (up to G - 1 free slots wait for a whole
    # group, hence S - G + 1 above), but it holds here (60 <= 93 at k = 1, 52 <= 74 at k = 4)
    assert stats["decode_forwards"] <= -(-int(lengths.sum()) // S) + int(lengths.max()) + len(prompts) + every
    del decodes[1:]
    pad = run(model, prompts, "pad", n=n, max_new_tokens=cap, temperature=1.0, top_p=1.0, stop_ids=[1],
              max_prompts=S // n)
    assert sum(decodes[1:]) > slots_bound(pad.lengths, S, n, 1)  # (k = 1: it reads its stop flags every step)


class OpLog(TorchDispatchMode):
    """Every aten op run under it -> (op, size of its largest new tensor: outputs sharing no input's memory)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        fresh = [o.numel() for o in pytree.tree_leaves(out)
                 if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs]
        self.ops.append((str(func.overloadpacket).removeprefix("aten."), max(fresh, default=0)))
        return out


SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "item"}  # ops that wait for the device's result


def one_step(model, S, ctx, cap=1100, temperature=0.8, top_p=0.9):
    """Ops of one decode_step of S slots whose rows are all at position ctx -> list of (op, largest allocation)."""
    cache = torch.randn(kv_shape(model, S, cap))  # (layers, 2, S, cap, Hkv, D)
    st = SlotState.empty(S, S, torch.device("cpu"))
    st.tok.copy_(torch.randint(3, 300, (S,)))
    st.pos.fill_(ctx)
    st.row.copy_(torch.arange(S))
    st.last.fill_(7)  # the rows' last column: out_tokens' last
    out_tokens, out_logprobs = torch.zeros(S + 1, 8, dtype=torch.long), torch.zeros(S + 1, 8)
    is_stop = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    with torch.no_grad(), slots_attention(model), OpLog() as log:
        decode_step(model, cache, st, out_tokens, out_logprobs, S, -(-(ctx + 1) // 64) * 64, temperature, top_p,
                    is_stop)
    assert (st.pos == ctx + 1).all() and (out_tokens[:S, 0] > 0).all()  # it decoded
    return log.ops


def test_decode_step_has_no_host_sync_and_no_cache_copy(tokenizer):
    """One decode step (8 slots, T=0.8, top_p=0.9) under a TorchDispatchMode, at context 64 and 1024: no host-sync op,
    no allocation as large as half of one layer's live K (8 x ctx x 2 heads x 16 dims / 2: cat, index, clone of the
    cache would be), and the same op sequence at both contexts. The detector is shown to catch HF's DynamicCache
    decode (torch.cat of K and V in every layer), which grows with the context."""
    model = make_model(tokenizer).eval()
    S, (L, _, _, _, Hkv, D) = 8, kv_shape(model, 1, 1)
    big = lambda ctx: S * ctx * Hkv * D // 2
    steps = {ctx: one_step(model, S, ctx) for ctx in (64, 1024)}
    for ctx, ops in steps.items():
        assert not [op for op, _ in ops if op in SYNCS], ctx
        assert not [(op, size) for op, size in ops if size >= big(ctx)], ctx
    assert [op for op, _ in steps[64]] == [op for op, _ in steps[1024]]
    print(f"\nslots decode step: {len(steps[64])} aten ops at context 64 and 1024, 0 host syncs, largest allocation "
          f"{max(s for _, s in steps[1024])} elements at 1024 (logits: {S * model.config.vocab_size})")
    with torch.no_grad():  # control: HF's own decode step over a DynamicCache holding ctx tokens
        ids = torch.randint(3, 300, (S, 1025))
        cache = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values":
                 DynamicCache(config=model.config)}  # (transformers 5.24 renamed past_key_values)
        model(input_ids=ids[:, :1024], use_cache=True, **cache)
        with OpLog() as log:
            model(input_ids=ids[:, 1024:], use_cache=True, **cache)
    copies = [op for op, size in log.ops if size >= big(1024)]
    assert copies.count("cat") >= 2 * L, copies
    print(f"HF DynamicCache decode step at 1024: {len(log.ops)} aten ops, {len(copies)} cache-sized copies {copies}, "
          f"{sum(op in SYNCS for op, _ in log.ops)} host syncs")


def test_decode_step_compiles_without_graph_breaks(tokenizer):
    """torch.compile(fullgraph=True) traces the whole decode step (model, attention, sampling, state updates) in one
    graph (it raises on a graph break), and the compiled greedy step decodes what the eager one does."""
    model = make_model(tokenizer).eval()
    S, cap = 4, 96
    cache = torch.randn(kv_shape(model, S, cap))
    outs = []
    for step in (decode_step, torch.compile(decode_step, fullgraph=True, backend="eager")):
        st = SlotState.empty(S, S, torch.device("cpu"))
        st.tok.copy_(torch.tensor([5, 6, 7, 8]))
        st.pos.copy_(torch.tensor([10, 20, 30, 40]))
        st.row.copy_(torch.arange(S))
        st.last.fill_(7)
        out_tokens, out_logprobs = torch.zeros(S + 1, 8, dtype=torch.long), torch.zeros(S + 1, 8)
        with torch.no_grad(), slots_attention(model):
            step(model, cache.clone(), st, out_tokens, out_logprobs, S, 64, 0, 1.0,
                 torch.zeros(model.config.vocab_size, dtype=torch.bool))
        outs.append((out_tokens, out_logprobs, st.pos))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_batched_prefill_equals_one_prompt_at_a_time(tokenizer, monkeypatch):
    """All 4 prompts admitted at once are prefilled in ONE packed forward (each attends to itself only); with
    PREFILL_TOKENS = 1 each prompt gets a forward of its own. Greedy tokens, and sampled tokens (T=0.8, top_p=0.9,
    same seed: the draws come in the same order) with their decode log-probs, are the same either way."""
    model = make_model(tokenizer).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    for T in (0, 0.8):
        args = dict(n=3, max_new_tokens=10, temperature=T, top_p=0.9, stop_ids=[0], return_logprobs=True, slots=12)
        packed, alone = {}, {}
        a = run(model, prompts, "slots", stats=packed, **args)
        monkeypatch.setitem(rollout.PREFILL_TOKENS, "cpu", 1)
        b = run(model, prompts, "slots", stats=alone, **args)
        monkeypatch.undo()
        assert (packed["prefill_forwards"], packed["refills"], alone["prefill_forwards"], alone["refills"]) == \
            (1, 1, 4, 1)
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.lengths, b.lengths), T
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5), T


def test_decode_roofline_s_by_hand(tokenizer):
    """decode_roofline_s on two forwards, one bandwidth-bound, one compute-bound; roofline_terms of the tiny model,
    untied and tied (a tied embedding is read once, as the output layer)."""
    # forward 1: (1000 + 2 * 100) B / 100 B/s = 12 s > (10 * 4 + 3 * 100) / 50 = 6.8 s; forward 2: 10 s < 1000 / 50
    assert rollout.decode_roofline_s([(4, 100), (100, 0)], 1000, 10, 2, 3, hbm=100, peak=50) == 12 + 20
    model = make_model(tokenizer)
    total, V = sum(p.numel() for p in model.parameters()), model.config.vocab_size
    L, Hq, Hkv, D = 2, 4, 2, 16  # conftest's model, fp32
    assert rollout.roofline_terms(model, torch.float32) == (4 * (total - V * 64), 2 * (total - V * 64),
                                                            2 * L * Hkv * D * 4, 4 * L * Hq * D)
    assert rollout.roofline_terms(model, torch.bfloat16, tp=2)[2:] == (2 * L * 1 * D * 2, 4 * L * 2 * D)
    tied = make_model(tokenizer, tie_word_embeddings=True)
    assert rollout.roofline_terms(tied, torch.float32)[1] == 2 * sum(p.numel() for p in tied.parameters())


def test_sliding_window_models_are_refused(tokenizer):
    """A Mistral config has sliding_window set and no layer_types: refused when the window is shorter than a slot
    (prompt + max_new_tokens), decoded when it is not."""
    from transformers import MistralConfig, MistralForCausalLM
    for window, fails in [(8, True), (4096, False)]:
        model = MistralForCausalLM(MistralConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=window)).eval()
        assert getattr(model.config, "layer_types", None) is None
        args = dict(n=2, max_new_tokens=6, temperature=0, top_p=1.0, stop_ids=[0], pad_id=0)
        if fails:
            with pytest.raises(ValueError, match="sliding window"):
                generate(model, [[5, 6, 7]], **args)
        else:
            assert generate(model, [[5, 6, 7]], **args).response_ids.shape == (2, 6)


def test_compiled_decode_step_decodes_the_same(tokenizer):
    """compile_step (torch.compile(fullgraph=True, dynamic=True) of the decode step; backend aot_eager here: inductor's
    C++ compile is minutes on 2 cores, the GPU bench measures inductor): the same greedy tokens and log-probs as eager,
    over steps of several batch sizes (rows end at different steps) with one trace."""
    torch._dynamo.reset()
    model = sharp_model(tokenizer)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    args = dict(n=2, max_new_tokens=12, temperature=0, top_p=1.0, stop_ids=[0], return_logprobs=True)
    eager = run(model, prompts, "slots", compile_step=False, **args)
    compiled = run(model, prompts, "slots", compile_step="aot_eager", **args)
    assert torch.equal(eager.response_ids, compiled.response_ids)
    assert torch.allclose(eager.logprobs, compiled.logprobs, atol=1e-5)
