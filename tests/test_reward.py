"""reward.py: grading rules (a table written from the rules), robustness against hostile inputs, the process pool."""
import json
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reward  # noqa: E402
from reward import Grade, cut_response, extract_answer, grade_one, normalize, score, shaped_rewards  # noqa: E402

HANG = r"\boxed{\dfrac{5^{\left(5^{\left(5^{\left(5^5\right)}\right)} - 4\right)} - 5}{16}}"  # Math-Verify issue #65

# (response, gold, expected reward). Written from the rules in the reward.py docstring / issue #3.
CASES = [
    # 1. only the response is graded: cut at the first stop string
    (r"\boxed{5}<|im_end|>\boxed{6}", "5", 1.0),
    (r"\boxed{5}<|im_end|>\boxed{6}", "6", 0.0),
    (r"\boxed{5}<|endoftext|>\boxed{6}", "6", 0.0),
    (r"so \boxed{7}</s>\boxed{8}", "7", 1.0),
    (r"<|im_end|>\boxed{5}", "5", 0.0),
    # 2. the LAST box, brace-matched; \fbox; \boxed without braces
    (r"First \boxed{3}, but that was wrong, so \boxed{5}", "5", 1.0),
    (r"First \boxed{3}, but that was wrong, so \boxed{5}", "3", 0.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"The set is \boxed{\{1, 2\}}.", r"\{1,2\}", 1.0),
    (r"\boxed{x^{2}+1}", "x^2+1", 1.0),
    (r"\fbox{12}", "12", 1.0),
    (r"hence the value is \boxed 5.", "5", 1.0),
    (r"the answer is \boxed{4}. Earlier I said the answer is 5", "4", 1.0),
    (r"\boxed{}", "5", 0.0),
    # ... else the text after "the answer is" / "final answer is"
    ("So the answer is 42.", "42", 1.0),
    ("The answer is: 17", "17", 1.0),
    (r"The final answer is $\frac{3}{4}$. I hope it is correct.", "0.75", 1.0),
    ("The answer is 3, since 3 + 4 = 7", "3", 1.0),
    (r"So the answer is (-\infty, 0].", r"(-\infty, 0]", 1.0),          # a comma inside an interval or a list
    ("The answer is 3, 4.", "3,4", 1.0),
    (r"The answer is $\$18$.", "18", 1.0),                            # an escaped dollar does not close the span
    ("The answer is: **18**", "18", 1.0),                              # markdown bold
    # ... else the last number
    ("4 + 5 = 9", "9", 1.0),
    ("4 + 5 = 9", "4", 0.0),
    ("We can make 1,000 widgets", "1000", 1.0),
    ("x = -3.5 is the root", "-3.5", 1.0),
    ("no digits here", "5", 0.0),
    ("", "5", 0.0),
    # 3. normalisation
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\tfrac{3}{4}}", r"\frac34", 1.0),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)", 1.0),
    (r"\boxed{10\text{ cm}}", "10", 1.0),
    (r"\boxed{15 \text{ cm}^{2}}", r"15\mbox{ cm}^2", 1.0),             # a unit with an exponent (MATH500)
    (r"\boxed{-1/3}", "-1./3", 1.0),                                   # Minerva golds' "1." decimals
    (r"\boxed{\{1\} \cup (-\infty, 0)}", r"(-\infty, 0) \cup\{1\}.", 1.0),  # raw gold unreadable: normalised
    (r"\boxed{5 \text{ dollars}}", "5", 1.0),
    (r"\boxed{30^\circ}", "30", 1.0),
    (r"\boxed{30^{\circ}}", r"30^\circ", 1.0),
    (r"\boxed{25\%}", "25", 1.0),
    (r"\boxed{\$18.90}", "18.90", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{1{,}000}", "1000", 1.0),
    (r"\boxed{1\,000}", "1000", 1.0),
    (r"\boxed{1000}", "1,000", 1.0),
    (r"\boxed{7.}", "7", 1.0),
    (r"\boxed{ 2 x + 1 }", "2x+1", 1.0),
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{3}", "x=3", 1.0),
    (r"\boxed{5}", "$5$", 1.0),
    # 4. equivalence by math-verify
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.25}", r"\frac{1}{3}", 0.0),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{3/4}", r"\frac{3}{4}", 1.0),
    (r"\boxed{7.0}", "7", 1.0),
    (r"\boxed{10^5}", "100000", 1.0),
    (r"\boxed{12}", "13", 0.0),
    (r"\boxed{-5}", "5", 0.0),
    (r"\boxed{0.5}", r"50\%", 1.0),
    (r"\boxed{2\sqrt{2}}", r"2\sqrt{2}", 1.0),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    (r"\boxed{2}", r"2\sqrt{2}", 0.0),           # the gold must not be read as 2
    # a gold with inner $ delimiters (Minerva) is one expression, not its last piece
    (r"\boxed{x_0\cos(\omega t)+\dot{x}_0\sin(\omega t)/\omega}", r"x_{0} \cos (\omega t)+$ $\dot{x}_{0} \sin (\omega t) / \omega", 1.0),
    (r"\boxed{\dot{x}_0 \sin(\omega t)/\omega}", r"x_{0} \cos (\omega t)+$ $\dot{x}_{0} \sin (\omega t) / \omega", 0.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{b + a}", "a+b", 1.0),
    (r"\boxed{2\pi}", r"2\pi", 1.0),
    (r"\boxed{(1, 2)}", "(1,2)", 1.0),
    (r"\boxed{[1, 2]}", "(1,2)", 0.0),          # open vs closed matters
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", 1.0),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3]", 0.0),
    (r"\boxed{2, 1}", "1,2", 1.0),              # unordered list of solutions
    (r"\boxed{x=2, x=1}", "1, 2", 1.0),
    (r"\boxed{1}", "1, 2", 0.0),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix} 1 \\ 3 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 0.0),
    (r"\boxed{\begin{bmatrix}1&2\\3&4\end{bmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 1.0),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", 1.0),
    (r"\boxed{C}", r"\text{(C)}", 1.0),
    (r"\boxed{(C)}", "C", 1.0),
    (r"\boxed{D}", r"\text{(C)}", 0.0),
    (r"\boxed{\text{Monday}}", r"\text{Monday}", 1.0),
    (r"\boxed{\text{Tuesday}}", r"\text{Monday}", 0.0),
]


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_grade_one_table(response, gold, expected):
    g = grade_one(response, gold)
    assert (g.reward, g.correct, g.status) == (expected, expected == 1.0, "ok"), g


def test_score_matches_the_table_in_order():
    grades = score([c[0] for c in CASES], [c[1] for c in CASES])
    assert [g.reward for g in grades] == [c[2] for c in CASES]
    assert [g.correct for g in grades] == [c[2] == 1.0 for c in CASES]  # (a bool through the worker's pipe too)
    assert all(isinstance(g, Grade) and g.status == "ok" and type(g.correct) is bool for g in grades)


def test_cut_response():
    assert cut_response("a<|im_end|>b</s>c") == "a"
    assert cut_response("a</s>b<|im_end|>c") == "a"
    assert cut_response("a<|endoftext|>b") == "a"
    assert cut_response("no stop") == "no stop"


def test_extract_answer():
    assert extract_answer(r"first \boxed{1} then \fbox{2}") == ("2", True)
    assert extract_answer(r"\boxed{\frac{1}{\sqrt{2}}} and more text 7") == (r"\frac{1}{\sqrt{2}}", True)
    assert extract_answer(r"\boxed 5") == ("5", True)
    assert extract_answer(r"\boxed{\left\{ x > 0 \right.} and 5") == (r"\left\{ x > 0 \right.", True)  # \{ is no brace
    assert extract_answer(r"the result: \boxed{12") == ("12", False)     # unclosed box: fall back to the last number
    assert extract_answer("The answer is $x^2$.") == ("x^2", False)
    assert extract_answer("There are 1,234,567 ways, not 3") == ("3", False)
    assert extract_answer("There are 1,234,567 ways") == ("1234567", False)
    assert extract_answer("nothing") == ("", False)


@pytest.mark.parametrize("raw,clean", [
    (r"\left( 1, 2 \right]", "(1,2]"), (r"\dfrac{1}{2}", r"\frac{1}{2}"), (r"\tfrac12", r"\frac12"),
    (r"12\text{ cm}", "12"), (r"\text{(C)}", "C"), (r"\text{Monday}", "Monday"), ("3.", "3"), (r"90^\circ", "90"),
    (r"90^{\circ}", "90"), (r"15\%", "15"), (r"\$5", "5"), ("1,000,000", "1000000"), (r"1{,}000", "1000"),
    (r"1\,000", "1000"), ("x = 3", "3"), ("(B)", "B"), (r"a \cdot b", r"a\cdot b"), ("1, 2", "1,2"),
])
def test_normalize(raw, clean):
    assert normalize(raw) == clean


def test_grade_fields():
    assert grade_one(r"so \boxed{5}", "5") == Grade(1.0, "5", True, "ok", True)
    assert grade_one("so 5", "5") == Grade(1.0, "5", False, "ok", True)
    assert grade_one(r"\boxed{4}", "5") == Grade(0.0, "4", True, "ok", False)
    assert score(["so 5", r"\boxed{4}"], ["5"] * 2) == [Grade(1.0, "5", False, "ok", True),
                                                          Grade(0.0, "4", True, "ok", False)]


def verl_dapo_overlong(score, valid_response_length, max_resp_len, overlong_buffer_len, overlong_penalty_factor):
    """The reference, verl's DAPO reward manager as written: verl-project/verl verl/workers/reward_manager/dapo.py,
    lines 119-127 at 1dda039 (2026-08), the same code at lines 100-108 in 4f80e46 (the DAPO reproduction commit)."""
    reward = score
    expected_len = max_resp_len - overlong_buffer_len
    exceed_len = valid_response_length - expected_len
    overlong_reward = min(-exceed_len / overlong_buffer_len * overlong_penalty_factor, 0)
    reward += overlong_reward
    return reward


def test_shaping_off_gives_the_grades_rewards_bit_for_bit():
    """The Zoo (every shaping flag at its default): the rewards trained on are the grader's, the same floats."""
    grades = [Grade(r, "", b, "ok", r == 1.0) for r in (1.0, 0.0, 0.1 + 0.2, 1 / 3, -0.0) for b in (True, False)]
    lengths = [0, 1, 7, 99, 100, 100, 3, 50, 64, 100]
    bits = lambda xs: [struct.pack("<d", x) for x in xs]  # (-0.0 + 0.0 would be 0.0: a different float)
    assert bits(shaped_rewards(grades, lengths, 100)) == bits(g.reward for g in grades)


def test_overlong_shaping_is_verls_dapo_penalty():
    max_len, buffer, factor = 64, 16, 0.7
    grades = [Grade(r, "", True, "ok", r == 1.0) for r in (0.0, 1.0)]
    for length in range(max_len + 1):
        got = shaped_rewards(grades, [length] * 2, max_len, buffer, factor)
        assert got == [verl_dapo_overlong(g.reward, length, max_len, buffer, factor) for g in grades], length
    # what it means: nothing up to max_len - buffer, then linear down to -factor at max_len
    at = lambda n: shaped_rewards(grades[:1], [n], max_len, buffer, factor)[0]
    assert at(max_len - buffer) == 0 and at(max_len) == pytest.approx(-factor)
    assert at(max_len - buffer // 2) == pytest.approx(-factor / 2)


def test_format_reward_adds_a_bonus_to_boxed_or_a_penalty_to_unboxed():
    grades = [Grade(1.0, "5", True, "ok", True), Grade(1.0, "5", False, "ok", True), Grade(0.0, "4", True, "ok", False),
              Grade(0.0, "", False, "ok", False)]
    assert shaped_rewards(grades, [5] * 4, 10, format_reward=0.25) == [1.25, 1.0, 0.25, 0.0]
    assert shaped_rewards(grades, [5] * 4, 10, format_reward=-1.0) == [1.0, 0.0, 0.0, -1.0]
    both = shaped_rewards(grades, [10] * 4, 10, overlong_buffer=5, format_reward=-1.0)  # the two add up
    assert both == [0.0, -1.0, -1.0, -2.0]
    assert [g.correct for g in grades] == [True, True, False, False]  # shaping never touches a grade


def test_hostile_inputs_return_within_the_limit():
    big = "x" * (2 << 20)
    hostile = [
        (HANG, "1", {"timeout"}),                                    # never returns inside math-verify
        (r"\boxed{9^{9^{9^{9}}}}", "1", {"timeout", "ok"}),          # huge power: time or memory
        ("Let me think. " + big + r" so \boxed{7}", "7", {"ok"}),     # 2 MB response
        ("The answer is " + "9" * 100_000, "9", {"ok"}),             # 100,000-digit number
        (r"\boxed{" + "1" * 100_000 + "}", "1" * 100_000, {"ok"}),
        ("\x00\x01\x1b[31m\x7f" * 1000 + "\\boxed{4\x00\x08}", "4", {"ok"}),  # control bytes
        (r"\boxed{" + "{" * 200_000, "1", {"ok"}),                   # unbalanced braces
        ("}" * 200_000 + r"\boxed{3}", "3", {"ok"}),
        (r"\boxed{\frac{1}{2}", "0.5", {"ok"}),
    ]
    t0 = time.monotonic()
    grades = score([h[0] for h in hostile], [h[1] for h in hostile], timeout=2.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 20, elapsed
    for (_, _, statuses), g in zip(hostile, grades):
        assert g.status in statuses, g.status
    assert [g.reward for g in grades] == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert grades[0].boxed and grades[0].pred.startswith(r"\dfrac{5^")


def test_hanging_input_does_not_lose_or_reorder_others():
    n = 40
    responses = [rf"\boxed{{{i if i % 3 else i + 1}}}" for i in range(n)]   # every third one is wrong
    golds = [str(i) for i in range(n)]
    responses[5] = responses[17] = HANG
    t0 = time.monotonic()
    grades = score(responses, golds, timeout=1.5)
    assert time.monotonic() - t0 < 15
    expected = [0.0 if i in (5, 17) or i % 3 == 0 else 1.0 for i in range(n)]
    assert [g.reward for g in grades] == expected and [g.correct for g in grades] == [e == 1.0 for e in expected]
    assert [g.status for g in grades] == ["timeout" if i in (5, 17) else "ok" for i in range(n)]
    assert [g.pred for i, g in enumerate(grades) if i not in (5, 17)] == [
        str(i if i % 3 else i + 1) for i in range(n) if i not in (5, 17)]


def _runnable(pid):
    """Is the process running or waiting for a CPU (state R), rather than blocked (an idle worker in recv: S)?"""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "R"


def test_worker_killed_mid_task_loses_only_its_item():
    score([r"\boxed{1}"], ["1"])                                  # make sure the pool is up
    while not all(reward._pool.ready):                            # and every worker is past its imports (busy)
        score([r"\boxed{1}"] * 16, ["1"] * 16)
        time.sleep(0.1)
    pids = [p.pid for p in reward._pool.procs]
    n = 40
    responses, golds = [rf"\boxed{{{i}}}" for i in range(n)], [str(i) for i in range(n)]
    responses[0] = HANG                                           # keeps one worker busy for the whole timeout
    box = []
    thread = threading.Thread(target=lambda: box.append(score(responses, golds, timeout=120)))
    thread.start()
    # the worker that holds HANG is the one that stays runnable: the others settle their items in milliseconds of CPU
    # and wait idle. Which worker got it is up to map() (the first that was free), and under load how much CPU it
    # gets is up to the machine, so find it by its state (2 s runnable in a row), then kill it
    stuck, streak, give_up = None, {}, time.monotonic() + 100
    while stuck is None:
        time.sleep(0.2)
        streak = {pid: streak.get(pid, 0) + 1 for pid in pids if _runnable(pid)}
        stuck = next((pid for pid, k in streak.items() if k >= 10), None)
        assert time.monotonic() < give_up and thread.is_alive()
    os.kill(stuck, 9)                                             # a worker this test's pool started
    thread.join(timeout=60)
    assert not thread.is_alive()
    grades = box[0]
    assert grades[0].status == "error" and grades[0].reward == 0.0
    assert [g.reward for g in grades[1:]] == [1.0] * (n - 1)
    assert [g.pred for g in grades[1:]] == [str(i) for i in range(1, n)]
    assert stuck not in [p.pid for p in reward._pool.procs]       # replaced


def test_dead_idle_worker_is_replaced():
    score([r"\boxed{1}"], ["1"])
    victim = reward._pool.procs[0]
    os.kill(victim.pid, 9)
    victim.wait()
    grades = score([rf"\boxed{{{i}}}" for i in range(30)], [str(i) for i in range(30)])
    assert [g.reward for g in grades] == [1.0] * 30 and {g.status for g in grades} == {"ok"}


def test_grading_from_a_non_main_thread():
    box = []

    def work():
        box.append(grade_one(r"\boxed{\frac{1}{2}}", "0.5"))     # math-verify's signal.alarm would raise here
        box.append(score([r"\boxed{(x+1)^2}", r"\boxed{3}"], ["x^2+2x+1", "4"]))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert box[0].reward == 1.0 and box[0].status == "ok"
    assert [g.reward for g in box[1]] == [1.0, 0.0]


def test_concurrent_calls_from_threads():
    boxes = [[] for _ in range(3)]
    threads = [threading.Thread(target=lambda b=b, k=k: b.append(
        score([rf"\boxed{{{k * 100 + i}}}" for i in range(50)], [str(k * 100 + i) for i in range(50)])))
        for k, b in enumerate(boxes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for k, b in enumerate(boxes):
        assert [g.pred for g in b[0]] == [str(k * 100 + i) for i in range(50)]
        assert all(g.reward == 1.0 for g in b[0])


CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import reward
grades = reward.score([r"\\boxed{{%d}}" % i for i in range(200)], [str(i if i % 2 else i + 1) for i in range(200)])
print(json.dumps({{"rewards": [g.reward for g in grades], "pids": [p.pid for p in reward._pool.procs]}}))
"""


def test_two_processes_at_once_and_clean_exit():
    env = dict(os.environ, LOCAL_WORLD_SIZE="2")                  # like two torchrun ranks on this machine
    procs = [subprocess.Popen([sys.executable, "-c", CHILD.format(root=ROOT)], stdout=subprocess.PIPE, env=env,
                              text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outs:
        assert out["rewards"] == [float(i % 2 == 1) for i in range(200)]
        assert len(out["pids"]) == max(1, os.cpu_count() // 2)
        for pid in out["pids"]:                                  # workers are gone after the parent exits
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/cmdline").read().find("reward") < 0


def test_shutdown_reaps_workers_and_pool_comes_back():
    score([r"\boxed{1}"], ["1"])
    pids = [p.pid for p in reward._pool.procs]
    reward.shutdown()
    assert reward._pool is None
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")                 # reaped, not a zombie
    assert score([r"\boxed{2}"], ["2"])[0].reward == 1.0


def test_cli_round_trip(tmp_path):
    rows = [{"response": r"so \boxed{4}", "gold": "4", "id": 1},
            {"response": "The answer is 5.", "gold": "6", "id": 2},
            {"response": r"\boxed{\frac{1}{2}}", "gold": "0.5", "extra": [1, 2]}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "reward.py"), str(src), "--out", str(dst)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [{k: v for k, v in o.items() if k not in ("reward", "correct", "pred")} for o in out] == rows
    assert [o["reward"] for o in out] == [1.0, 0.0, 1.0] and [o["correct"] for o in out] == [True, False, True]
    assert [o["pred"] for o in out] == ["4", "5", r"\frac{1}{2}"]
    assert "accuracy 0.6667" in run.stderr and "timeouts 0" in run.stderr and "responses/s" in run.stderr


@pytest.mark.parametrize("content,where", [(None, "in.jsonl"), ('{"response": "x"}\n', "in.jsonl:1"),
                                           ("not json\n", "in.jsonl:1"),
                                           ('{"response": "x", "gold": "1"}\n{"response": "y", "gold"\n', "in.jsonl:2")])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, content, where):
    """One line that names the file and, for a bad row, its line number (the second of two, not JSON's "line 1")."""
    src = tmp_path / "in.jsonl"
    if content is not None:
        src.write_text(content)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "reward.py"), str(src), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "error" in run.stderr and where in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()
