"""DAPO dynamic sampling (--dynamic_sampling): which groups a step trains and on which rank (train.pick_groups), how
their rows travel (rollout.group_rows, cat_rollouts, deal_groups), and a 2-rank run that refills and resumes exactly."""
import json
import os
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import rollout
import train
from rollout import Rollout
from reward import Grade
from test_train import flags, run


def test_pick_groups_by_hand():
    """2 ranks, 4 prompts a batch: rank r's group j is prompt j * 2 + r of its batch (the sampler's deal)."""
    F, T = False, True
    # batch 0 keeps 1 group (prompt 0), batch 1 keeps 3 (prompts 0, 2, 3): 4 = enough; rank 0 holds 3 of them
    plan = train.pick_groups([[[T, F], [F, F]], [[T, T], [F, T]]], 4, 2)
    assert plan == [[(0, 0, 0), (1, 0, 0)], [(1, 1, 1), (1, 0, 1)]]  # rank 0's third goes to rank 1, after its own
    # batch 1 keeps all 4: 5 informative groups, truncated to the first 4 in generation order (verl's batch[:traj_bsz])
    plan = train.pick_groups([[[T, F], [F, F]], [[T, T], [T, T]]], 4, 2)
    assert plan == [[(0, 0, 0), (1, 0, 0)], [(1, 1, 0), (1, 0, 1)]]  # (1, 1, 1): prompt 3 of batch 1, left out
    # every group informative in the first batch: each rank trains its own groups, nothing moves
    assert train.pick_groups([[[T, T], [T, T]]], 4, 2) == [[(0, 0, 0), (0, 0, 1)], [(0, 1, 0), (0, 1, 1)]]
    with pytest.raises(AssertionError, match="3 informative groups for a batch of 4"):
        train.pick_groups([[[T, F], [T, T]]], 4, 2)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_pick_groups_invariants(world):
    """Random informative patterns: the trained groups are exactly the first prompts_per_step informative prompts of
    the generation stream (read off a flat list of prompts, not through pick_groups' indexing), each once, as many on
    every rank, and only the surplus of a rank over its share moves."""
    rng = random.Random(world)
    for _ in range(200):
        P = world * rng.randint(1, 4)
        stream = []  # (batch, position in the batch, informative) of every prompt generated
        while sum(f for _, _, f in stream) < P:
            b = len(stream) // P
            stream += [(b, p, rng.random() < 0.4) for p in range(P)]
        informative = [[[f for bb, p, f in stream if bb == b and p % world == r] for r in range(world)]
                       for b in range(stream[-1][0] + 1)]
        plan = train.pick_groups(informative, P, world)
        first = [(b, p) for b, p, f in stream if f][:P]
        trained = [(b, j * world + r) for groups in plan for b, r, j in groups]
        assert sorted(trained) == sorted(first) and len(set(trained)) == P
        assert all(len(groups) == P // world for groups in plan)
        for k, groups in enumerate(plan):  # own groups first, then received ones, each in generation order
            own = [g for g in groups if g[1] == k]
            assert groups[:len(own)] == own == sorted(own, key=lambda g: (g[0], g[2]))
        held = [sum(p % world == r for _, p in first) for r in range(world)]
        moved = sum(g[1] != k for k, groups in enumerate(plan) for g in groups)
        assert moved == sum(max(0, h - P // world) for h in held)


def random_rollout(n_groups, G, logprobs=True, seed=0):
    """A Rollout shaped like rollout.generate's: right-padded, R = the longest response, logprobs 0 on padding."""
    g = torch.Generator().manual_seed(seed)
    B = n_groups * G
    lengths = torch.randint(1, 9, (B,), generator=g)  # (B,)
    R = int(lengths.max())
    mask = torch.arange(R)[None] < lengths[:, None]  # (B, R)
    ids = torch.randint(5, 100, (B, R), generator=g).masked_fill(~mask, 0)  # (B, R)
    lp = -torch.rand(B, R, generator=g) * mask if logprobs else None  # (B, R)
    prompts = [list(range(i // G + 1)) for i in range(B)]
    return Rollout(prompts, ids, mask, lengths, ["stop" if x % 2 else "length" for x in lengths.tolist()], lp)


def same_rollout(a, b):
    return (a.prompt_ids == b.prompt_ids and torch.equal(a.response_ids, b.response_ids) and
            torch.equal(a.response_mask, b.response_mask) and torch.equal(a.lengths, b.lengths) and
            a.finish_reason == b.finish_reason and
            (a.logprobs is None and b.logprobs is None or torch.equal(a.logprobs, b.logprobs)))


@pytest.mark.parametrize("logprobs", [True, False])
def test_group_rows_then_cat_rollouts_is_the_rollout(logprobs):
    """Cut into groups (each copied, cut to its own longest response) and joined again: the same Rollout."""
    ro, G = random_rollout(5, 3, logprobs), 3
    parts = [rollout.group_rows(ro, j, G) for j in range(5)]
    assert all(p.response_ids.shape[1] == int(p.lengths.max()) for p in parts)
    assert all(p.response_ids.untyped_storage().nbytes() == p.response_ids.numel() * 8 for p in parts)  # copies
    assert same_rollout(rollout.cat_rollouts(parts, 0), ro)
    # another order: each group's rows as they were, padded to the new batch's longest response
    back = rollout.cat_rollouts(parts[::-1], 0)
    for j in range(5):
        rows = back.rows(slice((4 - j) * G, (5 - j) * G))
        R = parts[j].response_ids.shape[1]
        assert same_rollout(Rollout(rows.prompt_ids, rows.response_ids[:, :R], rows.response_mask[:, :R],
                                    rows.lengths, rows.finish_reason, None if not logprobs else rows.logprobs[:, :R]),
                            parts[j])
        assert not rows.response_mask[:, R:].any() and (rows.response_ids[:, R:] == 0).all()


def test_deal_groups_one_rank():
    """One rank: the planned groups of several generation batches, in plan order, with their texts, grades, golds."""
    G = 2
    gens = []
    for b in range(3):
        ro = random_rollout(4, G, seed=b)
        gens.append((ro, [f"t{b}.{i}" for i in range(8)], [f"g{b}.{i}" for i in range(8)],
                     [f"a{b}.{i}" for i in range(8)]))
    plan = [[(2, 0, 1), (0, 0, 3), (0, 0, 0), (1, 0, 2)]]
    ro, texts, grades, golds = train.deal_groups(gens, plan, G, 0, rank=0, world=1)
    assert same_rollout(ro, rollout.cat_rollouts([rollout.group_rows(gens[b][0], j, G) for b, _, j in plan[0]], 0))
    rows = [(b, j * G + i) for b, _, j in plan[0] for i in range(G)]
    assert texts == [f"t{b}.{i}" for b, i in rows] and grades == [f"g{b}.{i}" for b, i in rows]
    assert golds == [f"a{b}.{i}" for b, i in rows]


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_two_rank_dynamic_sampling_refills_and_resumes_exactly(model_dir, data_file, tmp_path):
    """2 ranks, 4 prompts a batch, a reward under which half the prompts (even golds) always give all-equal groups:
    steps refill (more than one generation batch), train only on groups whose rewards differ, the sampler moves on by
    every prompt generated, and a run killed after step 3's log but before its checkpoint resumes from step 2 and
    replays step 3 bit for bit."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    launcher = ("torchrun", "--standalone", "--nproc_per_node=2", "tests/dynsample_train.py")
    args = dict(steps=3, save_every=2, dynamic_sampling="true", max_gen_batches=0)
    r = run(flags(model_dir, data_file, a, **args), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    ma = metrics(a)
    assert [m["step"] for m in ma] == [1, 2, 3]
    assert all(m["zero_var_groups"] == 0 and m["gen_kept_groups"] >= 4 for m in ma), ma  # trained: informative only
    assert all(m["gen_prompts"] == 4 * m["gen_batches"] for m in ma) and any(m["gen_batches"] > 1 for m in ma), ma
    assert re.search(r"step 3/3 \|.*\| refill \d+ batches: \d+/\d+ groups differ \|", r.stdout), r.stdout[-2000:]
    received = [int(n) for n in re.findall(r"deal_groups checked on rank \d: (\d+) groups received", r.stdout)]
    assert len(received) == 2 * 3 and sum(received) > 0, r.stdout[-2000:]  # every step, and groups moved
    state = torch.load(os.path.join(a, "step_000003", "state.pt"), weights_only=True)
    assert state["sampler"]["pos"] == sum(m["gen_prompts"] for m in ma)  # every generation batch consumed

    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "step_000003"))  # killed before its step-3 checkpoint: resumes from step 2
    r = run(flags(model_dir, data_file, b, **args), launcher=launcher)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    mb = metrics(b)
    volatile = ("t_", "gen_tok_s", "train_tok_s", "peak_mem")
    assert [m["step"] for m in mb] == [1, 2, 3]
    assert [{k: v for k, v in m.items() if not k.startswith(volatile)} for m in ma] == \
           [{k: v for k, v in m.items() if not k.startswith(volatile)} for m in mb]
    wa, wb = (load_file(os.path.join(d, "step_000003", "model", "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.load(os.path.join(b, "step_000003", "state.pt"), weights_only=True)["sampler"] == state["sampler"]


@pytest.mark.slow
def test_dynamic_sampling_with_every_group_informative_is_the_plain_run(model_dir, data_file, tmp_path):
    """Rewards that differ in every group: one generation batch a step, each rank trains its own groups, and the run
    equals the one without --dynamic_sampling (same metrics, samples and weights) but for the gen_* metrics."""
    alternate = lambda responses, golds: [Grade(float(i % 2), "", False, "ok") for i in range(len(responses))]
    plain, dyn = str(tmp_path / "plain"), str(tmp_path / "dyn")
    train.main(flags(model_dir, data_file, plain, save_every=2), score=alternate)
    train.main(flags(model_dir, data_file, dyn, save_every=2, dynamic_sampling="true"), score=alternate)
    volatile = ("t_", "gen_tok_s", "train_tok_s", "peak_mem")
    mp, md = metrics(plain), metrics(dyn)
    assert [(m["gen_batches"], m["gen_prompts"], m["gen_kept_groups"], m["gen_reward"]) for m in md] == \
           [(1, 4, 4, 0.5)] * 2
    assert [{k: v for k, v in m.items() if not k.startswith(volatile)} for m in mp] == \
           [{k: v for k, v in m.items() if not k.startswith(volatile + ("gen_",))} for m in md]
    assert open(os.path.join(plain, "samples.jsonl")).read() == open(os.path.join(dyn, "samples.jsonl")).read()
    wp, wd = (load_file(os.path.join(d, "step_000002", "model", "model.safetensors")) for d in (plain, dyn))
    assert all(torch.equal(wp[k], wd[k]) for k in wp)


def test_max_gen_batches_stops_the_run(model_dir, data_file, tmp_path):
    """No group ever informative: after --max_gen_batches generation batches the run stops with one line (verl raises
    there), having trained nothing."""
    zeros = lambda responses, golds: [Grade(0.0, "", False, "ok") for _ in responses]
    out = str(tmp_path / "stuck")
    with pytest.raises(SystemExit, match=r"^error: step 1: 0 of the 12 prompts of --max_gen_batches=3 generation "
                                         r"batches had rewards that differ.*raise --max_gen_batches \(0 = no limit\)"):
        train.main(flags(model_dir, data_file, out, dynamic_sampling="true", max_gen_batches=3), score=zeros)
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
