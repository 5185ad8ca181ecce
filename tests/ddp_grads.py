"""torchrun --nproc_per_node N tests/ddp_grads.py {ddp,zero3_mixed} OUT: gradients of one mini-batch split over N ranks.
  ddp: the DDP gradients -> OUT (torch.save). Used by test_math.py::test_rank_split_invariance.
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
from test_math import make_samples  # noqa: E402
from distributed import shard_model  # noqa: E402
from model import Policy  # noqa: E402
from train import Config, accumulate_gradients, plan_micro_batches  # noqa: E402

mode, out = sys.argv[1:]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tokenizer = make_tokenizer()
s = make_samples(tokenizer, B=6)
mine = list(range(rank, 6, world))  # this rank's samples
n_tokens = torch.tensor(float(sum(s.response_len(i) for i in mine)))
dist.all_reduce(n_tokens)  # the global normaliser
plan = plan_micro_batches(mine, [len(x) for x in s.seqs], budget=40, world=world)  # several micro-batches
cfg = Config(shard="ddp" if mode == "ddp" else "zero3", kl_coef=1e-3, temperature=0.9)


def grads(mixed):
    """-> (full gradients, dtypes of the parameters and their gradients)."""
    policy = shard_model(Policy(make_model(tokenizer)), cfg, cuda=mixed, local_rank=0, world=world)
    accumulate_gradients(policy, s, plan, n_tokens.item(), world, cfg, torch.device("cpu"))
    full = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in policy.parameters()]
    dtypes = sorted({str(t.dtype) for p in policy.parameters() for t in (p, p.grad)})
    del policy  # a DDP reducer left for interpreter shutdown aborts the process now and then (gloo, torch 2.13)
    return full, dtypes


if mode == "ddp":
    full, _ = grads(mixed=False)
    if rank == 0:
        torch.save(full, out)
else:
    (fp32, _), (mixed, dtypes) = grads(mixed=False), grads(mixed=True)
    if rank == 0:
        json.dump(dict(gaps=[((a - b).norm() / a.norm()).item() for a, b in zip(fp32, mixed)], dtypes=dtypes),
                  open(out, "w"))
dist.destroy_process_group()
