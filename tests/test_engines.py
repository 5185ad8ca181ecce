"""rollout.py engines ("pad", "drop", "cb"): identical greedy outputs, decode log-probs == training forward, and the
same sampling distribution, checked against exact next-token probabilities of a tiny model."""
import pytest
import torch
from transformers import GenerationConfig, TopPLogitsWarper

from conftest import make_model
from rollout import generate
from model import Policy
from train import Samples, sequence_logprobs

ENGINES = ["pad", "drop", "cb"]
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
    return generate(model, prompts, pad_id=0, engine=engine, **kw)


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
    rows leave the "drop" and "cb" batches at different times; the outputs must still equal "pad"'s."""
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


@pytest.mark.parametrize("engine,top_p", [("pad", 1.0), ("drop", 1.0), ("cb", 1.0), ("drop", 0.9)])
def test_decode_logprobs_equal_training_forward(tokenizer, engine, top_p):
    """Sampled rows that stop at different steps (1 in 64 tokens is a stop token) and run past cb's 32-token pages:
    the decode log-probs of every row equal a fresh forward's, so the rows kept in the cache after a drop are the
    right ones."""
    model = make_model(tokenizer).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
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
    """cb's log-probs under top_p are of the renormalised nucleus: refused, as is an unknown engine."""
    model = make_model(tokenizer).eval()
    with pytest.raises(ValueError, match="top_p"):
        run(model, [[5, 6]], "cb", n=2, max_new_tokens=4, temperature=1.0, top_p=0.9, stop_ids=[0],
            return_logprobs=True)
    with pytest.raises(ValueError, match="engine"):
        run(model, [[5, 6]], "vllm", n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, stop_ids=[0])


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
