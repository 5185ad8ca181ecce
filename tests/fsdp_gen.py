"""torchrun --standalone --nproc_per_node 2 tests/fsdp_gen.py OUT.json: count FSDP all-gathers during a zero3
rollout on the inference copy (distributed.copy_weights, then generate on the copy) and on the sharded policy itself,
and check its samples equal an unsharded model's (engines "pad" and "slots"). Used by test_shard.py."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_model, make_tokenizer  # noqa: E402
from rollout import generate  # noqa: E402
from distributed import copy_weights, inference_copy, shard_model  # noqa: E402
from model import Policy  # noqa: E402
from train import Config  # noqa: E402

dist.init_process_group("gloo")
calls = [0]


def counting(real):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)
    return wrapper


for name in ("all_gather_single", "all_gather_into_tensor"):  # what FSDP2's DefaultAllGather calls (by version)
    if hasattr(dist, name):
        setattr(dist, name, counting(getattr(dist, name)))
tok = make_tokenizer()
prompts = [tok("What is 3 + 5?")["input_ids"], tok("1 2")["input_ids"]]
args = dict(n=2, max_new_tokens=16, temperature=1.0, top_p=1.0, stop_ids=[len(tok)], pad_id=0)  # never stops
plain_model = make_model(tok).eval()
cfg = Config(shard="zero3")
policy = shard_model(Policy(make_model(tok)), cfg, cuda=False, local_rank=0, world=2)
copy, _ = inference_copy(plain_model.config, torch.device("cpu"), torch.float32)
torch.manual_seed(0)
plain = generate(plain_model, prompts, engine="pad", **args)
policy.eval()
counts = {}
for use in (True, False):
    calls[0] = 0
    torch.manual_seed(0)
    if use:  # each FSDP unit gathered once, into the copy, which then generates
        copy_weights(policy, copy)
        ro = generate(copy, prompts, engine="pad", **args)
    else:  # naive: only the root (embeddings, lm_head) gathered; each layer all-gathers at every forward
        policy.unshard()
        ro = generate(policy.lm, prompts, engine="pad", **args)
        policy.reshard()
    counts["gathered" if use else "per_token"] = calls[0]
    assert torch.equal(ro.response_ids, plain.response_ids)
# engine "slots" on the copy (2 slots for 4 rows): greedy == plain
greedy = dict(args, temperature=0.0)
calls[0] = 0
copy_weights(policy, copy)
slots = generate(copy, prompts, engine="slots", slots=2, **greedy)
counts["slots_gathered"] = calls[0]
assert torch.equal(slots.response_ids, generate(plain_model, prompts, **greedy).response_ids)
if dist.get_rank() == 0:
    json.dump(dict(counts, layers=len(policy.lm.get_decoder().layers), new_tokens=16), open(sys.argv[1], "w"))
dist.destroy_process_group()
