"""The pure math of train.py against RECIPE.md, and the micro-batch split invariance of the update."""
import os
import subprocess

import pytest
import torch

from conftest import make_model
from model import Policy, token_logprobs
from train import (Config, Samples, accumulate_gradients, batch_logprobs, group_advantages, grpo_loss,
                   plan_micro_batches, sequence_logprobs)


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


def test_loss_matches_recipe_transcription():
    torch.manual_seed(0)
    N = 1000
    logp, old, ref = -torch.rand(N) * 3, -torch.rand(N) * 3, -torch.rand(N) * 3
    ent, adv = torch.rand(N) * 5, torch.randn(N)
    eps, beta, c_ent = 0.2, 1e-3, 1e-3
    loss, st = grpo_loss(logp, old, ref, ent, adv, eps, beta, c_ent)
    expected = 0.0
    for i in range(N):  # RECIPE.md, one token at a time
        rho = float(torch.exp(logp[i] - old[i]))
        A = float(adv[i])
        pg = max(-A * rho, -A * min(max(rho, 1 - eps), 1 + eps))
        x = float(ref[i] - logp[i])
        kl = min(max(torch.exp(torch.tensor(x)).item() - x - 1, -10), 10)
        expected += pg - c_ent * float(ent[i]) + beta * kl
    assert abs(loss.item() - expected) < 1e-3 * max(1.0, abs(expected))
    assert 0 < st["clipped"].mean() < 1
    # kl clamp at 10 and no reference -> no kl
    big, _ = grpo_loss(torch.zeros(1), torch.zeros(1), torch.full((1,), 30.0), torch.zeros(1), torch.zeros(1), 0.2, 1.0, 0)
    assert big.item() == 10.0
    none, st = grpo_loss(logp, old, None, ent, adv, eps, beta, c_ent)
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


def make_samples(tokenizer, B=6, seed=0):
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
    return Samples(seqs=seqs, prompt_lens=plens, adv=torch.randn(B, generator=g), old_logp=old, ref_logp=ref,
                   pad_id=tokenizer.pad_token_id)


def grads_for(policy, s, plan, cfg):
    policy.zero_grad()
    n_tokens = sum(s.response_len(i) for mb in plan for i in mb)
    accumulate_gradients(policy, s, plan, n_tokens, 1, cfg, torch.device("cpu"))
    return [p.grad.clone() for p in policy.parameters()]


def test_micro_batch_split_invariance(tokenizer):
    cfg = Config(kl_coef=1e-3, entropy_coef=1e-3, temperature=0.9)
    policy = Policy(make_model(tokenizer))
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


@pytest.mark.slow
def test_rank_split_invariance(tokenizer, tmp_path):
    """The same 6 samples give the same gradient on 1 process as split over 2 DDP ranks (gloo)."""
    out = tmp_path / "grads.pt"
    r = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", os.path.join(os.path.dirname(__file__), "ddp_grads.py"),
                        "ddp", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    policy = Policy(make_model(tokenizer))
    s = make_samples(tokenizer, B=6)
    single = grads_for(policy, s, [list(range(6))], Config(kl_coef=1e-3, temperature=0.9))
    for a, b in zip(single, torch.load(out)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


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
