"""train.py with a reward under which some groups are all-equal, for test_dynsample.py's torchrun runs: prompts with
an even gold get 0 for every response (always left out by --dynamic_sampling), the others the parity of the
response's length (mixed groups, mostly)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from reward import Grade  # noqa: E402


def odd_gold_parity(responses, golds):
    return [Grade(float(int(gold) % 2 and len(r) % 2), "", False, "ok") for r, gold in zip(responses, golds)]


if __name__ == "__main__":
    train.main(sys.argv[1:], score=odd_gold_parity)
