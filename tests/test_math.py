"""The pure math of train.py against the recipe (README) and the variants' papers, and the micro-batch and rank split
invariance of the update in every --loss_agg mode."""
import math
import os
import subprocess

import pytest
import torch

from conftest import make_llama_tokenizer, make_model
from model import Policy, checkpoint_layers, token_logprobs
from train import (Config, Samples, accumulate_gradients, batch_logprobs, group_advantages, grpo_loss,
                   kept_responses, loss_weights, mini_batch_weights, mismatch_metrics, plan_micro_batches,
                   sequence_logprobs, update)

LOSS_AGGS = ["token", "seq", "seq_sum_norm"]
# make_samples(B=6) over 2 ranks: rank 0 takes samples 0, 2, 4, rank 1 takes 1, 3, 5 and keeps none (ddp_grads.py:
# rank 0 trains 2 micro-batches, rank 1 runs 2 filler passes)
KEEP_NONE_ON_RANK_1 = [True, False, False, False, True, False]
# test_rank_split_invariance's cases: tests/ddp_grads.py computes each on 2 ranks, name -> (loss_agg, shard, keep)
# the loss variants (a covering set of combinations, not the product), name -> Config fields
VARIANTS = {"gspo": dict(ratio_level="seq", loss_agg="seq"),
            "gspo-tokenagg-tis": dict(ratio_level="seq", is_correction="tis"),
            "cispo-mis": dict(pg_loss="cispo", clip_eps_high=0.28, is_correction="mis"),
            "dualclip-tis_seq": dict(clip_ratio_c=3.0, is_correction="tis", is_level="seq", loss_agg="seq_sum_norm"),
            "cispo_seq-mis_seq": dict(pg_loss="cispo", ratio_level="seq", is_correction="mis", is_level="seq")}
# test_rank_split_invariance's cases: tests/ddp_grads.py computes each on 2 ranks, name -> (Config fields, keep)
RANK_CASES = {**{f"{agg}-{shard}-{kept}": (dict(loss_agg=agg, shard=shard), keep) for agg in LOSS_AGGS
                 for shard, kept, keep in [("ddp", "all", None), ("ddp", "rank1_none", KEEP_NONE_ON_RANK_1),
                                           ("zero3", "rank1_none", KEEP_NONE_ON_RANK_1)]},
              **{f"{name}-ddp-rank1_none": (dict(v, shard="ddp"), KEEP_NONE_ON_RANK_1)
                 for name, v in list(VARIANTS.items())[:3]},
              **{f"{name}-zero3-all": (dict(v, shard="zero3"), None) for name, v in list(VARIANTS.items())[3:]}}

# test_reinforce_pp_baseline_whitens_over_all_ranks: 6 groups of 4 rewards and their response lengths; ddp_grads.py's
# rank r takes rows 12r .. 12r + 11 (the two halves' token means and variances differ)
ADV_REWARDS = (torch.arange(24) * 7 % 5).float() / 4 + (torch.arange(24) >= 12) * 0.5
ADV_LENGTHS = torch.arange(24) * 5 % 17 + 1


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


def loss_cfg(**kw):
    """A Config with only the loss terms asked for (no entropy bonus, no KL) unless kw sets them."""
    return Config(**{"entropy_coef": 0.0, "kl_coef": 0.0, **kw})


def test_loss_matches_recipe_transcription():
    torch.manual_seed(0)
    N = 1000
    logp, old, ref = -torch.rand(N) * 3, -torch.rand(N) * 3, -torch.rand(N) * 3
    ent, adv, lengths = torch.rand(N) * 5, torch.randn(N), torch.tensor([400, 600])
    eps, beta, c_ent = 0.2, 1e-3, 1e-3
    totals = []
    for eps_high in (eps, 0.28):  # the Zoo's symmetric clip, DAPO's clip-higher
        cfg = Config(clip_eps=eps, clip_eps_high=eps_high, kl_coef=beta, entropy_coef=c_ent)
        loss, st = grpo_loss(logp, old, ref, ent, adv, lengths, cfg)
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
    big, _ = grpo_loss(torch.zeros(1), torch.zeros(1), torch.full((1,), 30.0), torch.zeros(1), torch.zeros(1),
                       torch.tensor([1]), loss_cfg(kl_coef=1.0))
    assert big.item() == 10.0
    none, st = grpo_loss(logp, old, None, ent, adv, lengths, Config(kl_coef=beta, entropy_coef=c_ent))
    assert torch.equal(st["kl"], torch.zeros(N))


def zoo_loss_before_variants(logp, old_logp, ref_logp, entropy, adv, clip_eps, clip_eps_high, kl_coef, entropy_coef):
    """train.grpo_loss as it was before the variants (commit 72bee76, train.py:178-190), verbatim."""
    ratio = (logp - old_logp).exp()  # (N,)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps_high)  # (N,)
    pg = torch.maximum(pg1, pg2)  # (N,)
    kl = torch.zeros_like(logp)  # (N,)
    if ref_logp is not None:
        d = ref_logp - logp  # (N,)
        kl = (d.exp() - d - 1).clamp(-10, 10)  # low_var_kl (k3), clamped as in verl
    loss = pg - entropy_coef * entropy + kl_coef * kl  # (N,)
    return loss


def test_zoo_defaults_bit_identical_to_the_loss_before_variants():
    """The default Config (and clip-higher) gives the old loss and gradient bit for bit, the +-20 log-ratio clamps
    included (|logp - old| and |ref - logp| up to 19 here), with or without the rollout's log-probs; at logp - old = 90
    (and ref - logp = 90) the old formula gives inf / NaN, the clamped one a finite loss and gradient."""
    torch.manual_seed(1)
    N = 500
    old, ref = -torch.rand(N) * 10, -torch.rand(N) * 10
    ent, adv, rollout = torch.rand(N) * 5, torch.randn(N), -torch.rand(N) * 10
    base = torch.cat([-torch.rand(N - 4) * 10, torch.tensor([-19.0, -0.5, -1e-3, -9.0])])
    old[-4:], ref[-4:] = torch.tensor([-0.5, -19.5, -1e-3, -9.0]), torch.tensor([-0.5, -0.5, -19.0, -9.0])
    for eps_high in (None, 0.28):  # None: the Zoo's symmetric clip
        cfg = Config(kl_coef=1e-3, entropy_coef=1e-3, clip_eps_high=eps_high)
        grads = []
        for f in (lambda lp: zoo_loss_before_variants(lp, old, ref, ent, adv, 0.2, eps_high or 0.2, 1e-3, 1e-3),
                  lambda lp: grpo_loss(lp, old, ref, ent, adv, torch.tensor([N]), cfg)[0],
                  lambda lp: grpo_loss(lp, old, ref, ent, adv, torch.tensor([200, 300]), cfg, rollout)[0]):
            lp = base.clone().requires_grad_()
            loss = f(lp)
            (loss * torch.linspace(0.1, 1, N)).sum().backward()
            grads.append((loss.detach(), lp.grad))
        assert all(torch.equal(a, b) for (a, b) in zip(grads[0], grads[1])) and torch.equal(grads[1][0], grads[2][0])
        assert torch.equal(grads[1][1], grads[2][1])
    far = dict(logp=torch.tensor([0.0, 0.0]), old=torch.tensor([-90.0, -90.0]), adv=torch.tensor([1.0, -1.0]))
    for kl_coef, ref in [(0.0, None), (1.0, torch.tensor([90.0, 90.0]))]:
        old_lp, new_lp = far["logp"].clone().requires_grad_(), far["logp"].clone().requires_grad_()
        old_loss = zoo_loss_before_variants(old_lp, far["old"], ref, torch.zeros(2), far["adv"], 0.2, 0.2, kl_coef, 0)
        old_loss.sum().backward()
        assert not (torch.isfinite(old_loss).all() and torch.isfinite(old_lp.grad).all())
        for cfg in (loss_cfg(kl_coef=kl_coef), loss_cfg(kl_coef=kl_coef, clip_ratio_c=3.0),
                    loss_cfg(kl_coef=kl_coef, ratio_level="seq"), loss_cfg(kl_coef=kl_coef, pg_loss="cispo")):
            new_lp.grad = None
            loss, _ = grpo_loss(new_lp, far["old"], ref, torch.zeros(2), far["adv"], torch.tensor([1, 1]), cfg)
            loss.sum().backward()
            assert torch.isfinite(loss).all() and torch.isfinite(new_lp.grad).all(), cfg


# -----------------------------------------------------------------------------
# References, transcribed line by line from verl (verl-project/verl at 1dda039b, verl/trainer/ppo/core_algos.py,
# verl/trainer/ppo/rollout_corr_helper.py, verl/utils/torch_functional.py) and TRL (huggingface/trl at f2cd5771,
# trl/trainer/grpo_trainer.py). Tensors are (B, T) padded with a response mask, as there; configs become arguments.


def verl_masked_sum(values, mask, axis=None):  # torch_functional.py:273-291
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):  # torch_functional.py:294-308
    s = verl_masked_sum(values, mask, axis)
    return s / (mask.sum(axis=axis) + 1e-8)


def verl_masked_whiten(values, mask):  # torch_functional.py:311-345 (masked_var unbiased, shift_mean=True)
    mean = verl_masked_mean(values, mask)
    variance = verl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def verl_vanilla(old_log_prob, log_prob, advantages, clip_ratio_low, clip_ratio_high, clip_ratio_c,
                 rollout_is_weights=None):  # core_algos.py:1336-1369, compute_policy_loss_vanilla -> pg_losses
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return pg_losses


def verl_gspo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high):
    # core_algos.py:1578-1600, compute_policy_loss_gspo -> pg_losses (aggregated as seq-mean-token-mean there)
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    return torch.maximum(pg_losses1, pg_losses2)


def verl_cispo(old_log_prob, log_prob, advantages, clip_ratio_low, clip_ratio_high):
    # core_algos.py:2067-2083, compute_policy_loss_cispo -> pg_losses
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clipped_ratio_sg = clipped_ratio.detach()
    return -clipped_ratio_sg * advantages * log_prob


def verl_low_var_kl(logprob, ref_logprob):  # core_algos.py:2238-2245, kl_penalty_forward "low_var_kl"
    kl = ref_logprob - logprob
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = (ratio - kl - 1).contiguous()
    return torch.clamp(kld, min=-10, max=10)


def verl_rollout_is_weights(log_ratio, response_mask, rollout_is, rollout_is_threshold):
    # rollout_corr_helper.py:571-596 + 632, compute_rollout_correction_weights, TIS (one upper threshold)
    SAFETY_BOUND = 20.0
    if rollout_is == "token":
        log_ratio_safe = torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)
        raw_rollout_is_weights = torch.exp(log_ratio_safe)
    else:  # "sequence"
        log_ratio_sum = verl_masked_sum(log_ratio, response_mask, axis=-1).unsqueeze(-1)
        log_ratio_sum_safe = torch.clamp(log_ratio_sum, min=-SAFETY_BOUND, max=SAFETY_BOUND)
        raw_rollout_is_weights = torch.exp(log_ratio_sum_safe).expand_as(log_ratio)
    raw_rollout_is_weights = raw_rollout_is_weights * response_mask
    rollout_is_weights = raw_rollout_is_weights.clamp(max=rollout_is_threshold)
    return rollout_is_weights.detach()


def verl_rloo(scores, index):  # core_algos.py:616-635, compute_rloo_outcome_advantage (outcome scores (bs,))
    id2score, id2mean = {}, {}
    scores = scores.clone()
    for i in range(scores.shape[0]):
        id2score.setdefault(index[i], []).append(scores[i])
    for idx in id2score:
        id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
    for i in range(scores.shape[0]):
        response_num = len(id2score[index[i]])
        scores[i] = scores[i] * response_num / (response_num - 1) - id2mean[index[i]] * response_num / (
            response_num - 1)
    return scores


def verl_reinforce_pp_baseline(scores, response_mask, index):  # core_algos.py:565-584 -> (bs, T) advantages
    response_length = response_mask.shape[-1]
    id2score, id2mean = {}, {}
    scores = scores.clone()
    for i in range(scores.shape[0]):
        id2score.setdefault(index[i], []).append(scores[i])
    for idx in id2score:
        id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - id2mean[index[i]]
    scores = scores.unsqueeze(-1).tile([1, response_length]) * response_mask
    return verl_masked_whiten(scores, response_mask) * response_mask


def trl_per_token_loss(per_token_logps, old_per_token_logps, advantages, mask, importance_sampling_level, loss_type,
                       epsilon_low, epsilon_high):
    # grpo_trainer.py:3054-3089, GRPOTrainer._compute_loss (delta None, no KL) -> per_token_loss (B, T) or (B, 1)
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:  # "sequence"
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    else:  # "grpo", "dapo", ...
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    return per_token_loss


def trl_vllm_is_ratio(old_per_token_logps, sampling_per_token_logps, mask, vllm_importance_sampling_mode, clip_max):
    # grpo_trainer.py:2580-2619 (vllm_importance_sampling_clip_min None) -> (B, T) or (B, 1)
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    if vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=None, max=clip_max)
    else:
        invalid_mis_mask = (ratio < -math.inf) | (ratio > clip_max)
        ratio = ratio.masked_fill(invalid_mis_mask, value=0.0)
    return ratio


def padded_batch(seed, B=6, T=12):
    """Random (B, T) log-probs with responses of 1..T tokens: -> dict of (B, T) tensors, mask, lengths, adv (B,)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.3  # ratios on both sides of every clip range
    rollout = old + torch.randn(B, T, generator=g) * 0.6
    ref = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    return dict(logp=logp, old=old, rollout=rollout, ref=ref, adv=adv, mask=mask, lengths=lengths)


def ours(b, cfg, **loss_agg_kw):
    """grpo_loss on b's response tokens, flat; -> (per-token loss (B, T) zero-padded, gradient of the loss_agg
    aggregate wrt the padded logp, the aggregate)."""
    P = b["logp"].clone().requires_grad_()
    m = b["mask"]
    loss, _ = grpo_loss(P[m], b["old"][m], b["ref"][m] if cfg.kl_coef else None, torch.zeros(int(m.sum())),
                        b["adv"][:, None].expand_as(m)[m], b["lengths"], cfg, b["rollout"][m])
    w = loss_weights(b["lengths"], torch.ones(len(m), dtype=torch.bool), cfg.loss_agg, m.shape[1], int(m.sum()),
                     len(m)).float()  # (B,)
    total = (loss * w[:, None].expand_as(m)[m]).sum()
    total.backward()
    out = torch.zeros(m.shape)
    out[m] = loss.detach()
    return out, P.grad, total.detach()


def reference(b, f, agg):
    """f(P) -> (B, T) per-token loss from a reference; -> (it masked, gradient of agg, agg) as ours()."""
    P = b["logp"].clone().requires_grad_()
    m = b["mask"].float()
    loss = f(P) * m  # (B, T) or (B, 1) -> (B, T)
    if agg == "token":  # verl token-mean / TRL dapo (one process): masked mean over all tokens
        total = (loss * m).sum() / m.sum()
    else:  # verl seq-mean-token-mean / TRL grpo
        total = ((loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    total.backward()
    return loss.detach(), P.grad, total.detach()


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6), (x - y).abs().max()
    assert b[1].abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_variants_equal_verl_and_trl(seed):
    """Each variant's per-token loss, its aggregate and the aggregate's gradient equal verl's and TRL's (above)."""
    b = padded_batch(seed)
    m, A = b["mask"], b["adv"][:, None].expand_as(b["mask"])
    # Zoo / DAPO clip-higher, and dual-clip c = 3 (verl: clip_ratio_c = 3 always on; c = 1e9 leaves it out)
    for eps_high, c in [(0.2, 0.0), (0.28, 0.0), (0.28, 3.0), (0.2, 1.5)]:
        cfg = loss_cfg(clip_eps_high=eps_high, clip_ratio_c=c)
        verl = reference(b, lambda P: verl_vanilla(b["old"], P, A, 0.2, eps_high, c or 1e9), "token")
        assert_same(ours(b, cfg), verl)
        if not c:
            assert_same(ours(b, cfg), reference(b, lambda P: trl_per_token_loss(
                P, b["old"], b["adv"], m, "token", "dapo", 0.2, eps_high), "token"))
    # the dual clip bit somewhere: the c = 1.5 loss differs from the plain clip
    assert not torch.equal(ours(b, loss_cfg(clip_ratio_c=1.5))[0], ours(b, loss_cfg())[0])
    # GSPO: verl's token form and TRL's importance_sampling_level="sequence" (loss_type grpo: a mean of means)
    cfg = loss_cfg(ratio_level="seq", loss_agg="seq", clip_eps_high=0.28)
    assert_same(ours(b, cfg), reference(b, lambda P: verl_gspo(b["old"], P, A, m.float(), 0.2, 0.28), "seq"))
    assert_same(ours(b, cfg)[1:], reference(b, lambda P: trl_per_token_loss(
        P, b["old"], b["adv"], m.float(), "sequence", "grpo", 0.2, 0.28), "seq")[1:])
    assert not torch.allclose(ours(b, cfg)[1], ours(b, loss_cfg(loss_agg="seq", clip_eps_high=0.28))[1])
    # CISPO: verl's clip(ratio, 1 - eps, 1 + eps_high); TRL's clamp(ratio, max=eps_max) = ours with eps = 1
    cfg = loss_cfg(pg_loss="cispo", clip_eps_high=0.28)
    assert_same(ours(b, cfg), reference(b, lambda P: verl_cispo(b["old"], P, A, 0.2, 0.28), "token"))
    cfg = loss_cfg(pg_loss="cispo", clip_eps=1.0, clip_eps_high=0.1)
    assert_same(ours(b, cfg), reference(b, lambda P: trl_per_token_loss(
        P, b["old"], b["adv"], m.float(), "token", "cispo", 0.0, 1.1), "token"))
    # low_var_kl: verl's kl_penalty
    cfg = loss_cfg(kl_coef=0.5, clip_eps_high=0.28)
    assert_same(ours(b, cfg), reference(b, lambda P: verl_vanilla(b["old"], P, A, 0.2, 0.28, 1e9) + 0.5 *
                                        verl_low_var_kl(P, b["ref"]), "token"))
    # rollout correction: TIS = verl's rollout_is weights (token, sequence); TIS and MIS = TRL's vllm IS modes
    for level, verl_level in [("token", "token"), ("seq", "sequence")]:
        w = verl_rollout_is_weights(b["old"] - b["rollout"], m.float(), verl_level, 2.0)
        assert_same(ours(b, loss_cfg(is_correction="tis", is_level=level, clip_ratio_c=3.0)), reference(
            b, lambda P: verl_vanilla(b["old"], P, A, 0.2, 0.2, 3.0, rollout_is_weights=w), "token"))
        for mode in ("truncate", "mask"):
            r = trl_vllm_is_ratio(b["old"], b["rollout"], m.float(), f"{level.replace('seq', 'sequence')}_{mode}", 2.0)
            assert 0 < (r * m == 0).sum() - (~m).sum() or mode == "truncate"  # MIS masked something
            assert_same(ours(b, loss_cfg(is_correction=dict(truncate="tis", mask="mis")[mode], is_level=level)),
                        reference(b, lambda P: trl_per_token_loss(P, b["old"], b["adv"], m.float(), "token", "dapo",
                                                                  0.2, 0.2) * r, "token"))


def test_advantage_estimators_equal_verl():
    torch.manual_seed(0)
    G, B = 4, 24
    rewards = torch.randint(0, 2, (B,)).float() + torch.rand(B) * 0.1
    index = [i // G for i in range(B)]
    assert torch.allclose(group_advantages(rewards, G, "rloo"), verl_rloo(rewards, index), atol=1e-6)
    lengths = torch.randint(1, 20, (B,))
    mask = (torch.arange(20)[None] < lengths[:, None]).float()  # (B, 20)
    expected = verl_reinforce_pp_baseline(rewards, mask, index)  # (B, 20): each response's value on its tokens
    ours_ = group_advantages(rewards, G, "reinforce_pp_baseline", lengths=lengths)
    assert torch.allclose(ours_[:, None] * mask, expected, atol=1e-6)
    # whitened over tokens: a token-weighted mean 0 and unbiased variance 1
    assert abs((ours_ * lengths).sum().item()) < 1e-4
    assert abs((ours_ ** 2 * lengths).sum().item() / (lengths.sum().item() - 1) - 1) < 1e-4
    assert torch.equal(group_advantages(rewards, G, "grpo"), group_advantages(rewards, G))  # the default


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
    adv = torch.randn(B, generator=g)
    rollout = [x + torch.randn(len(x), generator=g) * 0.5 for x in old]  # TIS/MIS weights on both sides of 2
    return Samples(seqs=seqs, prompt_lens=plens, adv=adv, keep=keep, old_logp=old, ref_logp=ref,
                   pad_id=tokenizer.pad_token_id, rollout_logp=rollout)


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
        loss, _ = grpo_loss(logp, s.old_logp[i], s.ref_logp[i], ent, s.adv[i].expand(len(logp)),
                            torch.tensor([len(logp)]), cfg)
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


SPLIT_CASES = [(dict(loss_agg=agg), "qwen2") for agg in LOSS_AGGS] + [(v, "qwen2") for v in VARIANTS.values()] \
    + [(dict(loss_agg="token"), "llama")]


@pytest.mark.parametrize("variant,arch", SPLIT_CASES, ids=LOSS_AGGS + list(VARIANTS) + ["token-llama"])
def test_micro_batch_split_invariance(tokenizer, variant, arch):
    """Every --loss_agg and loss variant (sequence ratios, rollout weights per response) gives the same gradient in one
    micro-batch as in three; also on a Llama, whose input and output embeddings are one tied parameter (its gradient
    sums both uses)."""
    cfg = Config(kl_coef=1e-3, entropy_coef=1e-3, temperature=0.9, **variant)
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
    """The same 6 samples give the same gradient on 1 process as split over 2 ranks (gloo), in every --loss_agg mode
    and loss variant;
    rank1_none: responses left out (--skip_zero_var / --mask_truncated) leave rank 1 nothing to train, so it runs
    filler passes only, as many as rank 0 runs (DDP and zero3, whose forwards gather weights)."""
    fields, keep = RANK_CASES[case]
    cfg = Config(kl_coef=1e-3, temperature=0.9, **fields)
    policy, s = Policy(make_model(tokenizer)), make_samples(tokenizer, B=6, keep=keep)
    single = grads_for(policy, s, plan_micro_batches(list(range(6)), [len(x) for x in s.seqs], 10_000, 1,
                                                      keep=s.keep), cfg)
    assert any(g.abs().sum() > 0 for g in single)
    grads, tokens = two_rank_grads[case]
    for a, b in zip(single, grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert tokens == sum(s.response_len(i) for i in range(6) if s.keep[i])  # the stats leave the fillers out


@pytest.mark.slow
def test_reinforce_pp_baseline_whitens_over_all_ranks(two_rank_grads):
    """--adv_estimator=reinforce_pp_baseline whitens over the tokens of every rank's batch (verl: the whole batch), so
    2 ranks with half the groups each give the 1-process advantages, not each half whitened on its own."""
    full = group_advantages(ADV_REWARDS, 4, "reinforce_pp_baseline", lengths=ADV_LENGTHS)  # (24,)
    assert torch.allclose(torch.cat(two_rank_grads["adv"]), full, atol=1e-6)
    halves = [slice(0, 12), slice(12, 24)]
    alone = torch.cat([group_advantages(ADV_REWARDS[h], 4, "reinforce_pp_baseline", lengths=ADV_LENGTHS[h])
                       for h in halves])
    assert not torch.allclose(alone, full, atol=1e-2)


def test_mismatch_metrics_zero_for_the_slots_engine_in_fp32(tokenizer):
    """On CPU in fp32 the slots engine's decode log-probs equal the training forward's to rounding: through
    Samples.from_rollout, the old log-prob pass (second mini-batch) and the update's own forward (first mini-batch),
    mismatch_abs / _kl are ~0 and the max ratio ~1; a rollout's log-probs one row off would show."""
    from rollout import generate
    cfg = Config(kl_coef=0.0, temperature=0.8, mini_batches=2, micro_batch_tokens=4096, max_response_len=24,
                 is_correction="tis")
    model = make_model(tokenizer).eval()
    policy, cpu = Policy(model), torch.device("cpu")
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 3 + 5?", "Question:\nAnswer:", "0 1 2 3 4 5 6"]]
    torch.manual_seed(0)
    ro = generate(model, prompts, 2, cfg.max_response_len, cfg.temperature, 1.0, list(range(0, len(tokenizer), 40)),
                  tokenizer.pad_token_id, return_logprobs=True, engine="slots")
    B = len(ro.prompt_ids)
    s = Samples.from_rollout(ro, torch.randn(B), torch.ones(B, dtype=torch.bool), tokenizer.pad_token_id, False)
    minis = [list(range(B // 2)), list(range(B // 2, B))]
    plans = [plan_micro_batches(mini, [len(x) for x in s.seqs], 4096, 1) for mini in minis]
    s.old_logp = batch_logprobs(policy, s, plans[1:], cfg.temperature, cpu)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sums, _, _ = update(policy, optimizer, s, minis, plans, cfg, 1, cpu)
    m = mismatch_metrics(sums, cpu)
    assert sums["tokens"] == ro.lengths.sum() and m["mismatch_abs"] < 1e-5 and abs(m["mismatch_kl"]) < 1e-5
    assert abs(m["mismatch_max_ratio"] - 1) < 1e-5
    s.rollout_logp = s.rollout_logp[1:] + s.rollout_logp[:1]  # rows shifted by one (lengths differ: trimmed)
    s.rollout_logp = [x[:s.response_len(i)] if len(x) >= s.response_len(i) else
                      torch.cat([x, x.new_zeros(s.response_len(i) - len(x))]) for i, x in enumerate(s.rollout_logp)]
    sums, _, _ = update(policy, optimizer, s, minis, plans, cfg, 1, cpu)
    assert mismatch_metrics(sums, cpu)["mismatch_abs"] > 0.1
    s.rollout_logp = None  # an engine that gave none: no mismatch metrics
    cfg.is_correction = "none"
    assert mismatch_metrics(update(policy, optimizer, s, minis, plans, cfg, 1, cpu)[0], cpu) == {}


@pytest.mark.slow
def test_loss_variants_train_end_to_end(model_dir, tmp_path):
    """train.main with the new variants at once trains (no skipped update, a gradient), and logs the mismatch
    metrics: ~0 with the fp32 CPU slots engine, whose log-probs are the training forward's."""
    import json
    import train
    from reward import Grade
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    parity = lambda responses, golds: [Grade(float(len(r) % 2), "", False, "ok") for r in responses]  # mixed groups
    out = tmp_path / "run"
    flags = dict(model=model_dir, data=data, template="chatml-short", prompts_per_step=4, samples_per_prompt=4,
                 max_prompt_len=256, max_response_len=10, lr=1e-3, kl_coef=1e-3, mini_batches=2,
                 micro_batch_tokens=400, grad_ckpt="false", steps=2, save_every=0, out=out, shard="ddp",
                 ratio_level="seq", loss_agg="seq", pg_loss="cispo", adv_estimator="reinforce_pp_baseline",
                 is_correction="mis", is_level="seq")
    train.main([f"--{k}={v}" for k, v in flags.items()], score=parity)
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [x["step"] for x in m] == [1, 2] and all(x["skipped_updates"] == 0 for x in m)
    assert any(x["grad_norm"] > 0 for x in m)
    assert all(x["mismatch_abs"] < 1e-5 and abs(x["mismatch_max_ratio"] - 1) < 1e-5 for x in m), m


def test_variant_flags_checked():
    from train import parse_config
    for bad in ["--ratio_level=sequence", "--adv_estimator=reinforce++", "--pg_loss=gspo", "--is_correction=icepop",
                "--is_level=tok", "--clip_ratio_c=0.5", "--clip_ratio_c=3 --pg_loss=cispo", "--is_cap=0",
                "--is_correction=tis --engine=pad"]:
        with pytest.raises(SystemExit) as e:
            parse_config(bad.split())
        assert bad.split("=")[0] in str(e.value.code), e.value.code  # the one line names the flag
    parse_config("--is_correction=tis --engine=slots --clip_ratio_c=10".split())
    cfg = parse_config("--ratio_level=seq --pg_loss=cispo --adv_estimator=rloo --is_correction=mis".split())
    assert (cfg.ratio_level, cfg.pg_loss, cfg.adv_estimator, cfg.is_correction) == ("seq", "cispo", "rloo", "mis")


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


def test_grad_ckpt_takes_effect_on_an_eval_mode_model(tokenizer):
    """--grad_ckpt (model.checkpoint_layers) on a model in eval mode, as from_pretrained returns it: each decoder
    layer is recomputed in backward (its MLP runs twice per micro-batch; HF's gradient_checkpointing_enable alone
    checkpoints only in training mode, so under --shard=ddp the update kept every layer's activations: 93.7 GiB on an
    H200 for Qwen2.5-1.5B), not in the no-grad passes; what holds dropout stays in eval mode; and the gradients are
    those without checkpointing, bit for bit."""
    cfg, cpu = Config(kl_coef=1e-3, entropy_coef=1e-3, temperature=0.9), torch.device("cpu")
    s = make_samples(tokenizer)
    plain = grads_for(Policy(make_model(tokenizer).eval()), s, [list(range(6))], cfg)
    lm = make_model(tokenizer).eval()
    checkpoint_layers(lm)
    calls = []
    for layer in lm.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *args: calls.append(1))  # (pre: recompute stops early)
    policy = Policy(lm)
    batch_logprobs(policy, s, [[list(range(6))]], cfg.temperature, cpu)
    assert len(calls) == 2  # no grad: each of the 2 layers once
    ckpt = grads_for(policy, s, [list(range(6))], cfg)
    assert len(calls) == 2 + 2 * 2  # forward + recompute in backward
    assert not any(layer.self_attn.training or layer.mlp.training for layer in lm.model.layers)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
