"""The KV-slot count must not shrink from step 2 (MEMORY.md, risk 1): the CUDA allocator's settings that train.py
sets before torch loads, AdamW's states created before the first rollout (bit-identical updates), and
rollout.slots_that_fit on the byte counts of a Qwen2.5-7B zero3 step (bench/memory.py)."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from bench import memory
from rollout import slots_that_fit
from train import create_adam_states

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_sets_expandable_segments_before_torch_loads_unless_the_user_set_one():
    """torch >= 2.9 reads the allocator's settings when it is imported: the value must be in the environment then."""
    script = """
import builtins, importlib, os, sys
seen, real = [], builtins.__import__
def spy(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        seen.append((os.environ.get("PYTORCH_ALLOC_CONF"), os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))
    return real(name, *args, **kwargs)
builtins.__import__ = spy
import train
builtins.__import__ = real
print(seen[0], train.ALLOC_CONF)
os.environ.pop("PYTORCH_ALLOC_CONF")
os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:256"
print(importlib.reload(train).ALLOC_CONF, os.environ.get("PYTORCH_ALLOC_CONF"))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    default, user = r.stdout.strip().splitlines()[-2:]
    expandable = "expandable_segments:True"
    assert default == f"('{expandable}', '{expandable}') PYTORCH_ALLOC_CONF={expandable}"
    assert user == "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:256 None"  # the user's, under the old name, untouched


def _two_steps(model, optimizer, precreate):
    """Two AdamW steps of a fixed loss; with precreate, AdamW's states are created first. -> the states right after
    creation (None without precreate)."""
    created = None
    if precreate:
        create_adam_states(optimizer)
        created = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()
                   if p in optimizer.state}
    torch.manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 8)
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return created


@pytest.mark.parametrize("fused, foreach, amsgrad", [(False, False, False), (False, True, False), (True, None, False),
                                                      (False, False, True)])
def test_precreated_adam_states_leave_the_updates_bit_identical(fused, foreach, amsgrad):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    base[2].bias.requires_grad_(False)  # never gets a gradient: AdamW never creates its state
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused, foreach=foreach, amsgrad=amsgrad)
            for m in models]
    _two_steps(models[0], opts[0], precreate=False)
    created = _two_steps(models[1], opts[1], precreate=True)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
        assert not torch.equal(a, dict(base.named_parameters())[name]) or not a.requires_grad  # they moved
    # what we created is what AdamW creates itself: same keys, dtypes, devices, shapes; all zeros
    assert set(created) == {n for n, p in models[0].named_parameters() if p.requires_grad}
    for name, p in models[0].named_parameters():
        lazy = opts[0].state.get(p, {})
        assert list(lazy) == list(created.get(name, {})), name
        for k, v in lazy.items():
            c = created[name][k]
            assert (c.dtype, c.device, c.shape) == (v.dtype, v.device, v.shape), (name, k)
            assert not c.any()
    sa, sb = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


FSDP_SCRIPT = """
import copy, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from train import create_adam_states
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
out = []
for precreate in (False, True):
    model = copy.deepcopy(base)
    fully_shard(model[0]); fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if precreate:
        create_adam_states(opt)
        assert all(type(opt.state[p]["exp_avg"]).__name__ == "DTensor" for p in model.parameters())
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out.append([p.full_tensor() for p in model.parameters()])
assert all(torch.equal(a, b) for a, b in zip(*out)), "differ"
assert not torch.equal(out[0][0], base[0].weight)
print("ok")
dist.destroy_process_group()
"""


def test_precreated_adam_states_under_fsdp2_leave_the_updates_bit_identical():
    """The zero2/zero3 case: DTensor parameters (FSDP2 on one gloo rank), their states DTensors too."""
    r = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_slot_count_holds_from_step_2_on_a_7b_zero3_step():
    """Qwen2.5-7B, zero3 on 8 x 80 GB, the Zoo's 1024 rows per rank, slots of 1024 + 8192 tokens; bench/memory.py's
    byte counts. The allocator as NOTES.md describes it; CUDA context and NCCL: 1.5 GiB outside it.
    Old (no expandable segments, Adam created by the first optimizer.step()): step 1's cache is one segment of ~90% of
    the free memory; the update carves Adam's states from it once it is freed, so the whole segment stays reserved and
    step 2 sees only what the cache left. New (expandable segments, Adam created before the first rollout): empty_cache
    unmaps the freed cache's pages whatever else lives in the segment, and both steps start from the same memory."""
    m, G = memory.MODELS["7b"], 8
    gpu, outside = memory.GPU, 1.5 * memory.GIB
    resident = sum(memory.resident(m, "zero3", 8, "gen").values())  # params, Adam shards, reference, inference copy
    adam = memory.adam_states(m, "zero3", 8)
    per_slot, prefill, rows = memory.slot_bytes(m, 1024 + 8192), memory.prefill_bytes(m), 1024 // 8 * G

    # old: step 1 without Adam; its cache (one segment) then holds Adam's states at step 2
    reserved = resident - adam
    S1, fit1 = slots_that_fit(gpu - outside - reserved, per_slot, prefill, rows)
    cache = S1 * per_slot
    reserved_2 = resident - adam + cache  # the cache's segment cannot be released: Adam lives in it
    S2, fit2 = slots_that_fit(gpu - outside - reserved_2, per_slot, prefill, rows)
    assert S1 == fit1 > 100 and S2 < 0.2 * S1  # the collapse: ~108 -> ~10 slots
    # (counting reserved - allocated as free, as before 2026-11-29, would give S2 ~ S1 and an OOM: one tensor
    # cannot use a segment's fragments)

    # new: Adam resident before step 1; step 2's empty_cache gives the cache's pages back (what stays reserved beyond
    # the live tensors is page remainders, 2 MiB pages: allow 64 of them)
    S1n, _ = slots_that_fit(gpu - outside - resident, per_slot, prefill, rows)
    S2n, _ = slots_that_fit(gpu - outside - resident - 64 * 2**21, per_slot, prefill, rows)
    assert S2n >= 0.95 * S1n and S2n >= G
    assert S1n < S1  # step 1 now counts Adam's 7.1 GiB: ~14 fewer slots than the old step 1, every step
    assert slots_that_fit(gpu - outside - resident, per_slot, prefill, 64)[0] == 64  # at most the rows


def test_slots_that_fit_is_90_percent_of_free_less_a_prefill():
    assert slots_that_fit(free=1000, per_slot=100, prefill=50, rows=99) == (8, 8)  # (900 - 50) // 100
    assert slots_that_fit(free=1000, per_slot=100, prefill=50, rows=3) == (3, 8)
    assert slots_that_fit(free=10, per_slot=100, prefill=50, rows=3) == (0, 0)


def test_train_step_slot_check_compares_the_fit_with_step_1(capsys):
    """bench/train_step.py --min_slot_ratio: the uncapped capacity (rollout_slots_fit), since S = rows hides a
    collapse; rollout_slots with a warning where the fit is missing; one error line where both are."""
    from bench.train_step import slot_check
    collapse = [dict(step=s, rollout_slots=64, rollout_slots_fit=f) for s, f in [(1, 105), (2, 11), (3, 11)]]
    assert slot_check(collapse, 0.95) == ("rollout_slots_fit", [105, 11, 11], [2, 3])
    stable = [dict(step=s, rollout_slots=64, rollout_slots_fit=f) for s, f in [(1, 93), (2, 92), (3, 93)]]
    assert slot_check(stable, 0.95) == ("rollout_slots_fit", [93, 92, 93], [])
    capped = [dict(step=s, rollout_slots=64, rollout_slots_fit=None) for s in (1, 2, 3)]
    assert slot_check(capped, 0.95) == ("rollout_slots", [64, 64, 64], []) and "warning" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither rollout_slots_fit nor rollout_slots"):
        slot_check([dict(step=1), dict(step=2)], 0.95)
