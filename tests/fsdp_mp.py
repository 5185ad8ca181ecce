"""torchrun --standalone --nproc_per_node 2 tests/fsdp_mp.py OUT.json: one mini-batch's gradients under zero3 with
the GPU's precision policy (bf16 compute, fp32 reduce; train.shard_model(cuda=True)) next to plain fp32 zero3, on
gloo. Used by test_shard.py."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_model, make_tokenizer  # noqa: E402
from test_math import make_samples  # noqa: E402
from train import Config, Policy, accumulate_gradients, plan_micro_batches, shard_model  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tokenizer = make_tokenizer()
s = make_samples(tokenizer, B=6)
cfg = Config(shard="zero3", kl_coef=1e-3, temperature=0.9)
mine = list(range(rank, 6, world))  # this rank's samples
n_tokens = torch.tensor(float(sum(s.response_len(i) for i in mine)))
dist.all_reduce(n_tokens)
grads, dtypes = {}, {}
for mixed in (False, True):
    policy = shard_model(Policy(make_model(tokenizer)), cfg, cuda=mixed, local_rank=0, world=world)
    plan = plan_micro_batches(mine, [len(x) for x in s.seqs], budget=40, world=world)
    accumulate_gradients(policy, s, plan, n_tokens.item(), world, cfg, torch.device("cpu"))
    grads[mixed] = [p.grad.full_tensor() for p in policy.parameters()]
    dtypes[mixed] = sorted({str(t.dtype) for p in policy.parameters() for t in (p, p.grad)})
gaps = [((a - b).norm() / a.norm()).item() for a, b in zip(grads[False], grads[True])]
if rank == 0:
    json.dump(dict(gaps=gaps, dtypes=dtypes[True]), open(sys.argv[1], "w"))
dist.destroy_process_group()
