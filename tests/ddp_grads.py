"""torchrun --nproc_per_node N tests/ddp_grads.py OUT.pt: gradients of one mini-batch split over N DDP ranks.
Used by test_math.py::test_rank_split_invariance (not a test itself)."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_model, make_tokenizer  # noqa: E402
from test_math import make_samples  # noqa: E402
from train import Config, Policy, accumulate_gradients, plan_micro_batches  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tokenizer = make_tokenizer()
s = make_samples(tokenizer, B=6)
mine = list(range(rank, 6, world))  # this rank's samples
policy = torch.nn.parallel.DistributedDataParallel(Policy(make_model(tokenizer)))
n_tokens = torch.tensor(float(sum(s.response_len(i) for i in mine)))
dist.all_reduce(n_tokens)  # the global normaliser
plan = plan_micro_batches(mine, [len(x) for x in s.seqs], budget=40, world=world)  # several micro-batches
accumulate_gradients(policy, s, plan, n_tokens.item(), world, Config(kl_coef=1e-3, temperature=0.9),
                     torch.device("cpu"))
if rank == 0:
    torch.save([p.grad for p in policy.module.parameters()], sys.argv[1])
del policy  # a DDP reducer left for interpreter shutdown aborts the process now and then (gloo, torch 2.13)
dist.destroy_process_group()
