"""Throughput of reward.score on realistic responses: python bench/reward.py [--n 8192] [--workers default]

Builds n responses of ~3 KB of step-by-step reasoning (LaTeX, numbers) ending in a boxed answer: 1024 prompts x 8
samples (so each gold repeats 8 times, as in a GRPO step), answers of mixed kinds (integers, fractions, surds,
intervals, tuples, text, decimals), half right (often in another form: \\dfrac vs decimal, 1,000 vs 1000) and half
wrong. Warms the pool first (creation is once per process), then times one score() call.
Prints one JSON line: {"responses_per_s", "cores", "n", "seconds", "accuracy", "timeouts"}.
"""
import argparse
import json
import os
import random
import sys
import time
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402

# (gold, [right answers in other forms], [wrong answers])
KINDS = [
    (lambda r: str(r.randint(2, 2000)), lambda g, r: [g, f"{int(g):,}", f"{g}.0"],
     lambda g, r: [str(int(g) + r.choice([-1, 1, 10]))]),
    (lambda r: f"\\frac{{{r.randint(1, 9)}}}{{{r.choice([2, 4, 5, 8])}}}",
     lambda g, r: [g.replace("\\frac", "\\dfrac"), str(float(Fraction(g[6:].replace("}{", "/").strip("{}"))))],
     lambda g, r: [g.replace("}{", "}{1")]),
    (lambda r: f"{r.randint(2, 9)}\\sqrt{{{r.choice([2, 3, 5])}}}",
     lambda g, r: [g, g.replace("{", "").replace("}", "")],
     lambda g, r: [g.split("\\")[0], f"\\sqrt{{{r.randint(2, 30)}}}"]),
    (lambda r: f"({r.randint(-5, 0)}, {r.randint(1, 9)}]",
     lambda g, r: [g, "\\left" + g[0] + g[1:-1] + "\\right]"],
     lambda g, r: ["[" + g[1:], g[:-1] + ")"]),
    (lambda r: f"({r.randint(1, 9)}, {r.randint(1, 9)})", lambda g, r: [g],
     lambda g, r: ["(" + ", ".join(reversed(g[1:-1].split(", "))) + ")"]),
    (lambda r: r.choice(["\\text{(A)}", "\\text{(C)}", "\\text{even}", "\\text{Monday}"]),
     lambda g, r: [g, g[6:-1]], lambda g, r: ["\\text{(B)}", "\\text{odd}"]),
    (lambda r: f"{r.randint(1, 99)}.{r.randint(1, 9)}", lambda g, r: [g, g + "0"], lambda g, r: [g + "1"]),
    (lambda r: f"x^2+{r.randint(2, 9)}x", lambda g, r: [g, "x(x+" + g.split("+")[1][:-1] + ")"],
     lambda g, r: [g + "+1"]),
]
WEIGHTS = [50, 12, 8, 5, 5, 5, 5, 10]
WORDS = ("we note that the sum of the terms is so let us compute the value of each side then substitute back into "
         "the original equation and simplify to obtain").split()


def reasoning(r: random.Random, chars: int) -> str:
    parts = []
    while sum(map(len, parts)) < chars:
        a, b = r.randint(1, 999), r.randint(1, 99)
        parts.append(" ".join(r.choices(WORDS, k=12)) + f" ${a} + {b} = {a + b}$, and $\\frac{{{a}}}{{{b}}}"
                     f" \\approx {a / b:.3f}$.\n")
    return "".join(parts)


def make(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    r = random.Random(seed)
    responses, golds = [], []
    for _ in range(n // 8):
        make_gold, rights, wrongs = r.choices(KINDS, WEIGHTS)[0]
        gold = make_gold(r)
        for _ in range(8):
            answer = r.choice(rights(gold, r) if r.random() < 0.5 else wrongs(gold, r))
            responses.append(reasoning(r, 3000) + f"Therefore, the final answer is $\\boxed{{{answer}}}$.<|im_end|>")
            golds.append(gold)
    return responses, golds


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    args = ap.parse_args()
    responses, golds = make(args.n)
    reward.score(responses[:64], golds[:64])            # start the pool (once per process)
    t0 = time.perf_counter()
    grades = reward.score(responses, golds)
    seconds = time.perf_counter() - t0
    print(json.dumps({"responses_per_s": round(len(grades) / seconds, 1), "cores": os.cpu_count(), "n": len(grades),
                      "seconds": round(seconds, 2), "accuracy": round(sum(g.correct for g in grades) / len(grades), 4),
                      "timeouts": sum(g.status == "timeout" for g in grades)}))
