"""train.py with a reward under which some groups are all-equal, for test_dynsample.py's torchrun runs: prompts with
an even gold get 0 for every response (always left out by --dynamic_sampling), the others the parity of the
response's length (mixed groups, mostly). Each rank checks what train.deal_groups hands it (the real one, called
as train.main calls it): its share of groups, each with rewards that differ, and rows whose prompt, response text,
gold and grade still belong together after travelling between ranks; it prints one line per step checked."""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from reward import Grade  # noqa: E402


def odd_gold_parity(responses, golds):
    return [Grade(float(int(gold) % 2 and len(r) % 2), "", False, "ok") for r, gold in zip(responses, golds)]


def checked_deal_groups(gens, plan, G, pad_id, rank, world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--model=")))
    ro, texts, grades, golds = deal_groups(gens, plan, G, pad_id, rank, world)
    assert len(texts) == len(grades) == len(golds) == len(ro.prompt_ids) == len(plan[rank]) * G
    assert texts == tok.batch_decode([r[k].tolist() for r, k in zip(ro.response_ids, ro.response_mask)])
    assert grades == odd_gold_parity(texts, golds)
    for prompt, gold in zip(ro.prompt_ids, golds):
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", tok.decode(prompt)).groups())
        assert gold == str(a + b)
    rewards = [g.reward for g in grades]
    assert all(len(set(rewards[i:i + G])) > 1 for i in range(0, len(rewards), G))
    print(f"deal_groups checked on rank {rank}: {sum(r != rank for _, r, _ in plan[rank])} groups received",
          flush=True)
    return ro, texts, grades, golds


if __name__ == "__main__":
    deal_groups, train.deal_groups = train.deal_groups, checked_deal_groups
    train.main(sys.argv[1:], score=odd_gold_parity)
