"""torchrun --standalone --nproc_per_node 2 tests/tp_gen.py {ddp,zero3} OUT.json: the rollout's tensor-parallel copy
(distributed.inference_copy + copy_weights) against the unsharded policy. Used by test_shard.py; writes its checks."""
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
rank = dist.get_rank()
shard, out = sys.argv[1], sys.argv[2]
tok = make_tokenizer()
plain = make_model(tok).eval()  # the same weights on both ranks (seeded)
policy = shard_model(Policy(make_model(tok)), Config(shard=shard), cuda=False, local_rank=0, world=2)
gen, group = inference_copy(plain.config, torch.device("cpu"), torch.float32, tp=2)
texts = ["What is 3 + 5?", "0 1 2 3 4 5 6", "Let's think step by step."]
every = [tok(t)["input_ids"][:3] for t in texts]
mine = every[rank * 2:rank * 2 + 2]  # 2 prompts on rank 0, 1 on rank 1
args = dict(n=3, max_new_tokens=12, top_p=1.0, stop_ids=[len(tok)], pad_id=0, return_logprobs=True)  # never stops


def forward_logprobs(model, ro):
    """Log-probs of the sampled tokens by one full forward of the unsharded model (what training computes)."""
    ids = torch.cat([torch.tensor([p for p in ro.prompt_ids]), ro.response_ids], 1)  # prompts have equal length here
    with torch.no_grad():
        z = model(ids).logits[:, len(ro.prompt_ids[0]) - 1:-1].float()  # (B, R, V)
    return z.log_softmax(-1).gather(-1, ro.response_ids[..., None]).squeeze(-1)  # (B, R)


checks = {}
for phase in ("initial", "after_update"):
    copy_weights(policy, gen, group)
    want = generate(plain, mine, temperature=0, **args)
    got = generate(gen, mine, temperature=0, tp_group=group, **args)  # the group decodes all 3 prompts at once
    checks[f"{phase}_own_rows"] = got.prompt_ids == want.prompt_ids  # each rank got its own prompts' rows back
    checks[f"{phase}_greedy_equal"] = torch.equal(want.response_ids, got.response_ids)
    checks[f"{phase}_greedy"] = want.response_ids.tolist()
    torch.manual_seed(rank)  # different seeds: the group still samples once, on its first rank
    ro = generate(gen, mine, temperature=1.0, tp_group=group, **args)
    checks[f"{phase}_logprob_err"] = (ro.logprobs - forward_logprobs(plain, ro)).abs().max().item()
    # engine "slots" on the same copy: 6 slots for the group's 9 rows (each rank its heads' KV), so slots refill
    got = generate(gen, mine, temperature=0, tp_group=group, engine="slots", slots=6, **args)
    checks[f"{phase}_slots_own_rows"] = got.prompt_ids == want.prompt_ids
    checks[f"{phase}_slots_greedy_equal"] = torch.equal(want.response_ids, got.response_ids)
    torch.manual_seed(rank)
    ro = generate(gen, mine, temperature=1.0, tp_group=group, engine="slots", slots=6, **args)
    checks[f"{phase}_slots_logprob_err"] = (ro.logprobs - forward_logprobs(plain, ro)).abs().max().item()
    # one AdamW step on the policy (the same batch on both ranks), the same on `plain`: the copy must follow
    for model in (policy, Policy(plain)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        logp, _ = model(torch.tensor(every), torch.ones(3, 3, dtype=torch.bool), 1.0)  # (9,)
        (-logp.sum()).backward()
        opt.step()
        opt.zero_grad()
# eval.evaluate on the tp copy (the group splits each batch) == on the plain model (each rank its own share)
from eval import evaluate  # noqa: E402
copy_weights(policy, gen, group)
bench = os.path.join(os.path.dirname(out), "bench")
if rank == 0:  # one writer, then a barrier: a rank must not read the file while another truncates it
    os.makedirs(os.path.join(bench, "math500"), exist_ok=True)
    with open(os.path.join(bench, "math500", "test.jsonl"), "w") as f:
        f.writelines(json.dumps(dict(problem=f"What is {a} + 1?", answer=str(a + 1))) + "\n" for a in range(5))
dist.barrier()
kw = dict(benchmarks=["math500"], data_dir=bench, template="chatml-short", max_new_tokens=6, batch_size=2, rank=rank,
          world=2)
want, _ = evaluate(plain, tok, **kw)
got, _ = evaluate(gen, tok, tp_group=group, **kw)
if rank == 0:
    checks["eval_rows"] = len(got)
    checks["eval_equal"] = [r["responses"] for r in got] == [r["responses"] for r in want]
both = [None, None]
dist.all_gather_object(both, checks)
if rank == 0:
    json.dump(both, open(out, "w"))
dist.destroy_process_group()
