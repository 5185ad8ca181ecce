"""The pure math of train.py against the recipe (README) and the variants' papers, and the micro-batch and rank split
invariance of the update in every --loss_agg mode."""
import os
import subprocess

import pytest
import torch

from conftest import make_llama_tokenizer, make_model
from model import Policy, token_logprobs
from train import (Config, Samples, accumulate_gradients, batch_logprobs, group_advantages, grpo_loss,
                   kept_responses, loss_weights, mini_batch_weights, plan_micro_batches, sequence_logprobs, update)

LOSS_AGGS = ["token", "seq", "seq_sum_norm"]
# make_samples(B=6) over 2 ranks: rank 0 takes samples 0, 2, 4, rank 1 takes 1, 3, 5 and keeps none (ddp_grads.py:
# rank 0 trains 2 micro-batches, rank 1 runs 2 filler passes)
KEEP_NONE_ON_RANK_1 = [True, False, False, False, True, False]
# test_rank_split_invariance's cases: tests/ddp_grads.py computes each on 2 ranks, name -> (loss_agg, shard, keep)
RANK_CASES = {f"{agg}-{shard}-{kept}": (agg, shard, keep) for agg in LOSS_AGGS for shard, kept, keep in
              [("ddp", "all", None), ("ddp", "rank1_none", KEEP_NONE_ON_RANK_1),
               ("zero3", "rank1_none", KEEP_NONE_ON_RANK_1)]}


def test_group_advantages_zero_mean_unbiased_std():
    torch.manual_seed(0)
    r = torch.randint(0, 2, (6 * 8,)).float()
    r[:8] = 1.0  # an all-correct group
    a = group_advantages(r, 8).view(6, 8)
    assert torch.allclose(a.sum(1), torch.zeros(6), atol=1e-5)
    assert torch.equal(a[0], torch.zeros(8))  # equal rewards -> advantage 0, the group is kept
    g = r.view(6, 8)[1]
    expected = (g - g.mean()) / (torch.tensor(g.tolist()).std(unbiased=True) + 1e-6)
    assert torch.allclose(a[1], expected)
    # one correct of 8: mean 1/8, unbiased std sqrt(1/8 * 7/8 * 8/7) = sqrt(1/8)
    one = torch.tensor([1.0] + [0.0] * 7)
    assert abs(group_advantages(one, 8)[0].item() - (7 / 8) / (1 / 8) ** 0.5) < 1e-4
    # Dr. GRPO (--adv_std=false): r - mean, not divided by the std
    assert torch.allclose(group_advantages(one, 8, std=False), torch.tensor([7 / 8] + [-1 / 8] * 7))
    assert torch.allclose(group_advantages(r, 8, std=False).view(6, 8), r.view(6, 8) - r.view(6, 8).mean(1, True))


def test_loss_matches_recipe_transcription():
    torch.manual_seed(0)
    N = 1000
    logp, old, ref = -torch.rand(N) * 3, -torch.rand(N) * 3, -torch.rand(N) * 3
    ent, adv = torch.rand(N) * 5, torch.randn(N)
    eps, beta, c_ent = 0.2, 1e-3, 1e-3
    totals = []
    for eps_high in (eps, 0.28):  # the Zoo's symmetric clip, DAPO's clip-higher
        loss, st = grpo_loss(logp, old, ref, ent, adv, eps, eps_high, beta, c_ent)
        expected = 0.0
        for i in range(N):  # the recipe, one token at a time
            rho = float(torch.exp(logp[i] - old[i]))
            A = float(adv[i])
            pg = max(-A * rho, -A * min(max(rho, 1 - eps), 1 + eps_high))
            x = float(ref[i] - logp[i])
            kl = min(max(torch.exp(torch.tensor(x)).item() - x - 1, -10), 10)
            expected += pg - c_ent * float(ent[i]) + beta * kl
        assert loss.shape == (N,) and abs(loss.sum().item() - expected) < 1e-3 * max(1.0, abs(expected))
        assert 0 < st["clipped"].mean() < 1
        totals.append(expected)
    assert abs(totals[0] - totals[1]) > 1.0  # the upper bound mattered
    # kl clamp at 10 and no reference -> no kl
    big, _ = grpo_loss(torch.zeros(1), torch.zeros(1), torch.full((1,), 30.0), torch.zeros(1), torch.zeros(1), 0.2, 0.2,
                       1.0, 0)
    assert big.item() == 10.0
    none, st = grpo_loss(logp, old, None, ent, adv, eps, eps, beta, c_ent)
    assert torch.equal(st["kl"], torch.zeros(N))


def test_token_logprobs_equals_full_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    h = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    logp, ent = token_logprobs(h, head, y, temperature=0.7, chunk=8)  # 5 chunks
    full = (head(h) / 0.7).log_softmax(-1)
    assert torch.allclose(logp, full.gather(-1, y[:, None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-5)
    g1 = torch.autograd.grad((logp + ent).sum(), h)[0]
    g2 = torch.autograd.grad((full.gather(-1, y[:, None]).squeeze(-1) - (full.exp() * full).sum(-1)).sum(), h)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_kept_responses_by_hand():
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0])  # G = 4: all correct, one correct, none
    truncated = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0]).bool()
    T, F = True, False
    assert kept_responses(rewards, truncated, 4, False, False).all()  # the Zoo keeps everything
    assert kept_responses(rewards, truncated, 4, True, False).tolist() == [F] * 4 + [T] * 4 + [F] * 4
    assert kept_responses(rewards, truncated, 4, False, True).tolist() == (~truncated).tolist()
    assert kept_responses(rewards, truncated, 4, True, True).tolist() == [F] * 4 + [T, T, F, T] + [F] * 4


def test_loss_weights_by_hand():
    """3 responses of 2, 3 and 5 tokens on this rank, the last one left out; another rank holds 1 kept response of 4
    tokens, so the mini-batch has 9 kept tokens in 3 kept responses; max_response_len 8."""
    lens, keep = torch.tensor([2, 3, 5]), torch.tensor([True, True, False])
    w = {agg: loss_weights(lens, keep, agg, 8, n_tokens=9, n_responses=3).tolist() for agg in LOSS_AGGS}
    assert w["token"] == pytest.approx([1 / 9, 1 / 9, 0])  # sum_i sum_t loss / 9
    assert w["seq"] == pytest.approx([1 / (2 * 3), 1 / (3 * 3), 0])  # (mean_t loss_1 + mean_t loss_2 + ...) / 3
    assert w["seq_sum_norm"] == pytest.approx([1 / (3 * 8), 1 / (3 * 8), 0])  # sum_i sum_t loss / (3 * 8)
    nothing = torch.tensor([False, False, False])  # nothing kept on any rank: no loss, and no division by 0
    assert all(loss_weights(lens, nothing, agg, 8, 0, 0).tolist() == [0, 0, 0] for agg in LOSS_AGGS)


def make_samples(tokenizer, B=6, seed=0, keep=None):
    g = torch.Generator().manual_seed(seed)
    V = len(tokenizer)
    seqs, plens = [], []
    for b in range(B):
        p, r = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        seqs.append(torch.randint(3, V, (p + r,), generator=g))
        plens.append(p)
    rl = [len(x) - p for x, p in zip(seqs, plens)]
    old = [-torch.rand(n, generator=g) * 4 for n in rl]
    ref = [-torch.rand(n, generator=g) * 4 for n in rl]
    keep = torch.ones(B, dtype=torch.bool) if keep is None else torch.tensor(keep)
    return Samples(seqs=seqs, prompt_lens=plens, adv=torch.randn(B, generator=g), keep=keep, old_logp=old,
                   ref_logp=ref, pad_id=tokenizer.pad_token_id)


def grads_for(policy, s, plan, cfg):
    """Gradients of one mini-batch, all of s's samples, run as the micro-batches of plan."""
    policy.zero_grad()
    w = mini_batch_weights(s, list(range(len(s.seqs))), cfg, torch.device("cpu"))  # (B,)
    accumulate_gradients(policy, s, plan, w, 1, cfg, torch.device("cpu"))
    return [p.grad.clone() for p in policy.parameters()]


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("keep", [None, [True, False, True, True, False, True]], ids=["all", "filtered"])
def test_loss_agg_gradient_by_hand(tokenizer, loss_agg, keep):
    """The gradient of each --loss_agg, the responses left out by keep, in 1 or several micro-batches, equals the
    gradient of the issue's formula written out over one forward per response: token: all kept tokens' mean; seq:
    the mean over kept responses of each one's token mean; seq_sum_norm: the kept tokens' sum / (responses x 16).
    Old log-probs put the ratios on both sides of the clip range [0.8, 1.28] and in DAPO's clip-higher band."""
    cfg = Config(kl_coef=1e-3, entropy_coef=1e-3, temperature=0.9, loss_agg=loss_agg, max_response_len=16,
                 clip_eps_high=0.28)
    policy, s, cpu = Policy(make_model(tokenizer)), make_samples(tokenizer, keep=keep), torch.device("cpu")
    ratios = torch.tensor([0.7, 0.9, 1.1, 1.24, 1.4])  # 1.24: clipped at 1.2, not at 1.28
    with torch.no_grad():
        s.old_logp = [lp - ratios.log().repeat(4)[:len(lp)] for lp in batch_logprobs(
            policy, s, [[[i] for i in range(6)]], cfg.temperature, cpu)]
    kept = [i for i in range(6) if s.keep[i]]
    policy.zero_grad()
    per_response = []  # (len_i,) per-token losses of each kept response, each from its own forward
    for i in kept:
        logp, ent = sequence_logprobs(policy, s, [i], cfg.temperature, cpu)
        loss, _ = grpo_loss(logp, s.old_logp[i], s.ref_logp[i], ent, s.adv[i].expand(len(logp)), 0.2, 0.28,
                            cfg.kl_coef, cfg.entropy_coef)
        per_response.append(loss)
    if loss_agg == "token":
        total = torch.cat(per_response).sum() / sum(len(x) for x in per_response)
    elif loss_agg == "seq":
        total = sum(x.mean() for x in per_response) / len(per_response)
    else:
        total = sum(x.sum() for x in per_response) / (len(per_response) * 16)
    total.backward()
    expected = [p.grad.clone() for p in policy.parameters()]
    seq_lens = [len(x) for x in s.seqs]
    for budget in (10_000, max(seq_lens)):  # 1 micro-batch, then one or two samples per micro-batch
        plan = plan_micro_batches(list(range(6)), seq_lens, budget, world=1, keep=s.keep)
        assert (len(plan) == 1) == (budget == 10_000) and sorted(i for mb in plan for i in mb) == kept
        for a, b in zip(expected, grads_for(policy, s, plan, cfg)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_agg,arch", [(agg, "qwen2") for agg in LOSS_AGGS] + [("token", "llama")])
def test_micro_batch_split_invariance(tokenizer, loss_agg, arch):
    """Also on a Llama, whose input and output embeddings are one tied parameter: its gradient sums both uses."""
    cfg = Config(kl_coef=1e-3, entropy_coef=1e-3, temperature=0.9, loss_agg=loss_agg)
    tokenizer = make_llama_tokenizer() if arch == "llama" else tokenizer
    policy = Policy(make_model(tokenizer, arch=arch))
    s = make_samples(tokenizer)
    seq_lens = [len(x) for x in s.seqs]
    one = plan_micro_batches(list(range(6)), seq_lens, budget=10_000, world=1)
    three = plan_micro_batches(list(range(6)), seq_lens, budget=2 * max(seq_lens), world=1)
    assert len(one) == 1 and len(three) == 3
    assert sorted(i for mb in three for i in mb) == list(range(6))
    for a, b in zip(grads_for(policy, s, one, cfg), grads_for(policy, s, three, cfg)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_for(policy, s, one, cfg))


def test_micro_batch_plan_respects_budget():
    lens = [50, 10, 40, 30, 20, 60]
    plan = plan_micro_batches(list(range(6)), lens, budget=100, world=1)
    assert all(len(mb) * max(lens[i] for i in mb) <= 100 for mb in plan)
    assert sorted(i for mb in plan for i in mb) == list(range(6))
    assert len(plan_micro_batches([0, 1], [500, 500], budget=100, world=1)) == 2  # a sample over budget runs alone


@pytest.fixture(scope="module")
def two_rank_grads(tmp_path_factory):
    """tests/ddp_grads.py's gradients of every RANK_CASES case on 2 gloo ranks (one torchrun for all of them)."""
    out = tmp_path_factory.mktemp("ranks") / "grads.pt"
    r = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", os.path.join(os.path.dirname(__file__), "ddp_grads.py"),
                        "ddp", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("case", RANK_CASES)
def test_rank_split_invariance(tokenizer, two_rank_grads, case):
    """The same 6 samples give the same gradient on 1 process as split over 2 ranks (gloo), in every --loss_agg mode;
    rank1_none: responses left out (--skip_zero_var / --mask_truncated) leave rank 1 nothing to train, so it runs
    filler passes only, as many as rank 0 runs (DDP and zero3, whose forwards gather weights)."""
    loss_agg, _, keep = RANK_CASES[case]
    cfg = Config(kl_coef=1e-3, temperature=0.9, loss_agg=loss_agg)
    policy, s = Policy(make_model(tokenizer)), make_samples(tokenizer, B=6, keep=keep)
    single = grads_for(policy, s, plan_micro_batches(list(range(6)), [len(x) for x in s.seqs], 10_000, 1,
                                                      keep=s.keep), cfg)
    assert any(g.abs().sum() > 0 for g in single)
    grads, tokens = two_rank_grads[case]
    for a, b in zip(single, grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert tokens == sum(s.response_len(i) for i in range(6) if s.keep[i])  # the stats leave the fillers out


def test_update_with_nothing_kept(tokenizer):
    """Every response left out (e.g. all groups solved): no forward, no gradient, no change, and no division by 0."""
    cfg = Config(kl_coef=1e-3, temperature=0.9, skip_zero_var=True)
    policy, s = Policy(make_model(tokenizer)), make_samples(tokenizer, B=6, keep=[False] * 6)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in policy.parameters()]
    plans = [plan_micro_batches(list(range(6)), [len(x) for x in s.seqs], 10_000, 1, keep=s.keep)]
    sums, grad_norms, skipped = update(policy, optimizer, s, [list(range(6))], plans, cfg, 1, torch.device("cpu"))
    assert plans == [[]] and sums["tokens"] == 0 and grad_norms == [0.0] and skipped == 0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_bf16_autocast_update_matches_fp32(tokenizer):
    """The GPU update runs under bf16 autocast on fp32 weights; here on CPU autocast: fp32 log-probs and gradients,
    within bf16 rounding of the fp32 ones (a dtype slip, e.g. a bf16 ratio or loss, shows up as a larger gap)."""
    cfg = Config(kl_coef=1e-3, entropy_coef=1e-3, temperature=0.9)
    policy, s = Policy(make_model(tokenizer)), make_samples(tokenizer)
    fp32 = grads_for(policy, s, [list(range(6))], cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = grads_for(policy, s, [list(range(6))], cfg)
        logp = batch_logprobs(policy, s, [[list(range(6))]], cfg.temperature, torch.device("cpu"))
    assert logp[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in bf16)
    gaps = [((a - b).norm() / a.norm()).item() for a, b in zip(fp32, bf16)]
    assert 0 < max(gaps) < 3e-2, gaps  # 0: autocast did nothing


def test_packed_equals_padded(tokenizer):
    """Back-to-back sequences with restarting position_ids give the padded forward's log-probs and gradients."""
    cfg = Config(kl_coef=1e-3, temperature=0.9)
    policy = Policy(make_model(tokenizer))
    s = make_samples(tokenizer, B=5, seed=3)
    plan = [[0, 1, 2], [3, 4]]
    padded = grads_for(policy, s, plan, cfg)
    with torch.no_grad():
        lp_pad, _ = sequence_logprobs(policy, s, [0, 1, 2, 3, 4], 0.9, torch.device("cpu"))
    s.packed = True
    with torch.no_grad():
        lp_pack, _ = sequence_logprobs(policy, s, [0, 1, 2, 3, 4], 0.9, torch.device("cpu"))
    assert torch.allclose(lp_pack, lp_pad, atol=1e-5)
    for a, b in zip(padded, grads_for(policy, s, plan, cfg)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    lens = [len(x) for x in s.seqs]
    assert all(sum(lens[i] for i in mb) <= 30 for mb in plan_micro_batches(list(range(5)), lens, 30, 1, packed=True))
