"""torchrun --nproc_per_node N tests/ddp_grads.py {ddp,zero3_mixed} OUT: gradients of one mini-batch split over N ranks.
  ddp: {case: (full gradients, response tokens in the stats of all ranks)} for each of test_math.RANK_CASES (Config
    fields: a --loss_agg, a --shard, a loss variant; the responses kept), and "adv": each rank's REINFORCE++-baseline
    advantages of its half of test_math.ADV_REWARDS -> OUT (torch.save). Used by test_math.py's
    test_rank_split_invariance and test_reinforce_pp_baseline_whitens_over_all_ranks.
  zero3_mixed: zero3 with the GPU's precision policy (bf16 compute, fp32 reduce; distributed.shard_model(cuda=True)) next
    to plain fp32 zero3 -> OUT (json: relative gradient gaps, dtypes). Used by test_shard.py.
Not a test itself."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_model, make_tokenizer  # noqa: E402
from test_math import ADV_LENGTHS, ADV_REWARDS, RANK_CASES, make_samples  # noqa: E402
from distributed import shard_model  # noqa: E402
from model import Policy  # noqa: E402
from train import Config, accumulate_gradients, group_advantages, mini_batch_weights, plan_micro_batches  # noqa: E402

mode, out = sys.argv[1:]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tokenizer = make_tokenizer()
mine = list(range(rank, 6, world))  # this rank's samples


def grads(cfg, keep=None, mixed=False):
    """-> (full gradients, dtypes of the parameters and their gradients, tokens in the stats of all ranks)."""
    s, cpu = make_samples(tokenizer, B=6, keep=keep), torch.device("cpu")
    w = mini_batch_weights(s, mine, cfg, cpu)  # (6,) the normaliser counted on all ranks
    plan = plan_micro_batches(mine, [len(x) for x in s.seqs], budget=30, world=world, keep=s.keep)  # 2-3 each
    policy = shard_model(Policy(make_model(tokenizer)), cfg, cuda=mixed, local_rank=0, world=world)
    tokens = torch.tensor(accumulate_gradients(policy, s, plan, w, world, cfg, cpu)["tokens"])
    dist.all_reduce(tokens)
    full = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()  # (DDP: views of buckets)
            for p in policy.parameters()]
    dtypes = sorted({str(t.dtype) for p in policy.parameters() for t in (p, p.grad)})
    del policy  # a DDP reducer left for interpreter shutdown aborts the process now and then (gloo, torch 2.13)
    return full, dtypes, tokens.item()


if mode == "ddp":
    full = {case: grads(Config(kl_coef=1e-3, temperature=0.9, **fields), keep)[::2]
            for case, (fields, keep) in RANK_CASES.items()}
    # the REINFORCE++-baseline advantages of ADV_REWARDS, this rank's half (whole groups of 4), whitened over both
    half = slice(rank * 12, (rank + 1) * 12)
    adv = group_advantages(ADV_REWARDS[half], 4, "reinforce_pp_baseline", lengths=ADV_LENGTHS[half])
    full["adv"] = [None] * world
    dist.all_gather_object(full["adv"], adv)
    if rank == 0:
        torch.save(full, out)
else:
    cfg = Config(shard="zero3", kl_coef=1e-3, temperature=0.9)
    (fp32, _, _), (mixed, dtypes, _) = grads(cfg), grads(cfg, mixed=True)
    if rank == 0:
        json.dump(dict(gaps=[((a - b).norm() / a.norm()).item() for a, b in zip(fp32, mixed)], dtypes=dtypes),
                  open(out, "w"))
dist.destroy_process_group()
