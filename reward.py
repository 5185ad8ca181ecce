r"""Rule-based math reward for zero-RL: 1.0 if the response's final answer equals the gold answer, else 0.0.

    grades = score(responses, golds)   # [Grade(reward, pred, boxed, status, correct)] in order; 5 s per response
    rewards = shaped_rewards(grades, lengths, max_len, overlong_buffer=4096)   # train.py: the rewards it trains on
    python reward.py IN.jsonl --out OUT.jsonl   # rows {"response", "gold", ...} -> + "reward", "correct", "pred"

Correctness and reward are two fields: `correct` (the answer equals the gold) is what eval.py's accuracy, pass@k and
train.py's `accuracy` metric count; `reward` is what the policy is trained on. The grader's reward is float(correct);
shaping (training only) is one pure function, shaped_rewards, which moves rewards and never `correct`:
  - overlong (DAPO, --overlong_buffer B, --overlong_penalty f): a response of L tokens longer than max_len - B gets
    r += min(-(L - (max_len - B)) / B * f, 0), from 0 at max_len - B down to -f at max_len (verl's DAPO reward
    manager, verl/workers/reward_manager/dapo.py:121-127 at 1dda039; L counts the stop token, as verl's does).
  - format (--format_reward x): x > 0 is added to the reward of each response with a boxed answer (a bonus), x < 0
    to each without one (a penalty). Both off by default (the Zoo: rewards are exactly 0/1).

Grading one response (grade_one, in-process, no timeout):
  1. cut_response: the text before the first of STOP_STRINGS (<|im_end|>, <|endoftext|>, </s>), the strings the
     rollouts of train.py and eval.py stop on too (with EOS and the template's stop words, which a response keeps).
  2. extract_answer: the LAST \boxed{..} or \fbox{..} (brace-matched; `\boxed 5` takes the next token), else the
     text after the last "the answer is"/"final answer is" ($..$ span, else one sentence; a comma ends it only
     before a word), else the last number.
  3. normalize (Qwen2.5-Math harness style): \left/\right, \dfrac/\tfrac, a trailing \text{unit} (or unit^2),
     \text{} wrappers, degrees, \%, $, thin spaces, dots after a digit ("7.", "-1./3"), trailing dots, thousands
     separators, "x=", "(C)" -> "C". Equal strings, or two plain numbers (12, -0.5, 3/4, \frac{3}{4}) that settle
     it exactly, decide without sympy; else
  4. math-verify: verify(parse("$gold$"), parse("$normalized pred$")). The gold is always parsed as LaTeX (so
     `2\sqrt{2}` stays 2*sqrt(2)), with every $ removed, normalised only if sympy cannot read it raw; once per
     distinct gold per worker. Model text is never eval'd.
score() runs grade_one in worker processes: one pool per process (so per torchrun rank), made on first use, size
max(1, cpu_count // LOCAL_WORLD_SIZE), stopped at exit; concurrent calls from threads take turns. Workers are fresh
interpreters (spawn semantics, minus re-importing the caller's __main__: no torch in them). Each response gets
`timeout` s of wall clock; a worker that overruns (math-verify cannot interrupt `5^{5^{5^{5^5}}}`, Math-Verify
issue #65) is killed and replaced, that response scores 0 with status "timeout", the others are re-sent (never lost
or reordered). Workers have an address-space cap and a CPU-time backstop. Answers over MAX_ANSWER_CHARS chars are
compared as strings only.

Departures from SimpleRL-Zoo's grader (Qwen2.5-Math extract_answer + strip_string, then math-verify, 10 s timeout):
  - \boxed before "the answer is" (Qwen tries the Minerva "final answer is $..$. I hope" form first); an unclosed
    last \boxed{ is no box (Qwen took the rest of the text); \fbox is a box too.
  - "the answer is" takes a $..$ span or one sentence, not the whole rest of the text.
  - normalize is a subset of strip_string (no word-number or unit-word lists; a space between letters is kept so
    `\cdot b` survives); the gold is parsed raw, so gold "50\%" accepts 50 and 0.5 (math-verify's percent rule).
  - a worker past its time is killed (no signal.alarm); default 5 s, not 10 s.
Speed: `python bench/reward.py` (8192 responses of ~3 KB, 1024 distinct golds), 2026-11-24, 2 cores / 2 workers:
972 responses/s (runs of 972, 994, 947 at 23:33; ~485/s per core). Projected, not measured: 16 cores should give
several thousand/s (goal 2,000/s). Most answers settle on the exact fast path; sympy runs for the rest.
"""
import argparse
import atexit
import contextlib
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection, wait

# The end-of-turn strings, the one list of them: cut_response cuts at the first, and train.py and eval.py stop on
# each that is one token of the vocabulary (rollout.stop_token_ids).
STOP_STRINGS = ("<|im_end|>", "<|endoftext|>", "</s>")
MAX_ANSWER_CHARS = 1000            # longer predictions/golds skip sympy (string compare only)
MAX_BOX_CHARS = 20_000             # brace matching looks this far after the last \boxed
WORKER_MEMORY_BYTES = 2 << 30      # RLIMIT_AS per worker (an idle one uses ~60 MB)
CHUNK = 8                          # responses sent to a worker at a time (each still has its own deadline)
STARTUP_SECONDS = 60               # a worker that is not ready by then means the pool is broken


@dataclass
class Grade:
    reward: float      # the grader's: float(correct); a custom score() may give any reward (train.py trains on it)
    pred: str          # extracted prediction ("" if none)
    boxed: bool        # a \boxed{}/\fbox{} answer was found
    status: str        # "ok" | "timeout" | "error"
    correct: bool = False  # the prediction equals the gold (math-verify): accuracy counts this, never the reward


# ---------------------------------------------------------------- extraction (pure functions)

def cut_response(text: str) -> str:
    """The response up to the first stop string."""
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text


_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])(\s*)")
_BRACE = re.compile(r"(?<!\\)[{}]")                     # escaped braces \{ \} do not count
_ANSWER_IS = re.compile(r"(?:the|final) answer is", re.IGNORECASE)
_MATH_SPAN = re.compile(r"\$\$?(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)  # `\$` is a dollar sign
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n|,\s+(?=[a-zA-Z]{2})")  # ", which ..." ends it; "(-\infty, 0]" does not
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}/\\fbox{...} (or the token after `\\boxed `), None if absent or unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    m = _BOX.match(text, start) if start >= 0 else None
    if m is None:
        return None
    tail = text[m.end():m.end() + MAX_BOX_CHARS]
    if not tail.startswith("{"):
        token = re.match(r"[^\s$]+", tail) if m.group(1) else None
        return token.group() if token else None
    depth = 0
    for b in _BRACE.finditer(tail):
        depth += 1 if b.group() == "{" else -1
        if depth == 0:
            return tail[1:b.start()]
    return None


def extract_answer(text: str) -> tuple[str, bool]:
    """(prediction, boxed): the last box, else what follows "the answer is", else the last number; "" if none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip(), True
    last = max(_ANSWER_IS.finditer(text), key=lambda m: m.start(), default=None)
    if last is not None:
        tail = text[last.end():last.end() + 500].lstrip(" :\t\n*")
        span = _MATH_SPAN.match(tail)             # a $..$ span, else up to the end of the sentence
        pred = next(g for g in span.groups() if g) if span else _SENTENCE_END.split(tail, maxsplit=1)[0]
        if pred.strip(" *"):                      # (markdown bold: **18**)
            return pred.strip(" *"), False
    numbers = _NUMBER.findall(text)
    return (numbers[-1].replace(",", "") if numbers else ""), False


# ---------------------------------------------------------------- comparison (pure functions)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$")     # 5\text{ cm}, 15\mbox{ cm}^2
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_SPACE = re.compile(r"(?<![a-zA-Z])\s+|\s+(?![a-zA-Z])")   # keep a space between letters: `\cdot b`


def normalize(s: str) -> str:
    """Qwen2.5-Math-style cleanup of an answer string, so that cosmetic differences compare equal."""
    s = _CONTROL.sub("", s).replace("\n", " ").strip()
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"(?<!\\)\\[,;:! ]", "", s).replace("{,}", ",")               # thin spaces, 1{,}000
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°", "", s)                   # degrees
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    without_unit = _UNIT.sub("", s).strip()
    s = without_unit if without_unit else s                                  # 5\text{ cm} -> 5, \text{(C)} stays
    s = re.sub(r"(\d)\.(?!\d)", r"\1", _SPACE.sub("", _TEXT.sub(r"\1", s))).rstrip(".")  # 7. -> 7, -1./3 -> -1/3
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")                                               # 1,000 -> 1000
    m = re.fullmatch(r"\(?([A-E])\)?|[a-zA-Z]=([^=]+)", s)                   # (C) -> C, x=3 -> 3
    return m.group(m.lastindex) if m else s


def _number(s: str) -> Fraction | None:
    """Exact value of a plain number: 12, -0.5, 3/4, \\frac{3}{4}; None for anything else."""
    s = re.sub(r"^(-?)\\frac\{(\d+)\}\{(\d+)\}$", r"\1\2/\3", s)
    return Fraction(s) if len(s) <= 40 and re.fullmatch(r"-?\d+(?:\.\d+|/0*[1-9]\d*)?", s) else None


def _fast_equal(pred: str, gold: str, percent: bool) -> bool | None:
    """True/False when cheap string/number checks decide, None when math-verify must."""
    if pred == gold:
        return bool(pred)
    a, b = _number(pred), _number(gold)
    if a is None or b is None:
        return None
    if a == b:
        return True
    # Unequal exact numbers are wrong, unless decimals (math-verify rounds) or a percent (50% == 0.5) are involved.
    return None if percent or "." in pred + gold else False


def check_math_verify() -> None:
    """Raises ImportError with one line naming the pip command when math-verify, which grading needs, does not import."""
    try:
        import math_verify  # noqa: F401
    except ImportError as e:
        raise ImportError(f"grading needs the math-verify package ({e}): pip install math-verify") from None


@lru_cache(maxsize=None)
def _math_verify():
    """(parse, verify, gold configs, prediction configs): math-verify, imported on first use (only grading needs it,
    so `import reward` works without it)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    return parse, verify, [LatexExtractionConfig()], [LatexExtractionConfig(), ExprExtractionConfig()]


@lru_cache(maxsize=1 << 14)
def _parse_gold(gold: str) -> list:
    r"""The gold as parsed LaTeX, raw if sympy can read it (so `2\sqrt{2}` stays 2*sqrt(2)), else normalised."""
    parse, _, gold_config, _ = _math_verify()
    gold = re.sub(r"(?<!\\)\$", "", gold).strip()            # every math delimiter: `a+$ $b` is one expression
    raw = parse(f"${gold}$", gold_config, parsing_timeout=None)
    if any(not isinstance(x, str) for x in raw):              # [sympy expr, its string]; a string alone: unread
        return raw
    return parse(f"${normalize(gold)}$", gold_config, parsing_timeout=None) or raw


def is_equiv(pred: str, gold: str) -> bool:
    """Does the extracted prediction equal the gold answer? No timeout: call it where you can kill it."""
    p, g = normalize(pred), normalize(gold)
    decided = _fast_equal(p, g, "%" in pred + gold)
    if decided is not None:
        return decided
    if not p or len(p) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    parse, verify, _, pred_config = _math_verify()
    target = parse(f"${p}$", pred_config, parsing_timeout=None)
    return bool(target) and verify(_parse_gold(gold), target, timeout_seconds=None)


def grade_one(response: str, gold: str) -> Grade:
    """Grade one response in this process and thread (no timeout; score() adds one)."""
    pred, boxed, correct, status = "", False, False, "ok"
    try:
        pred, boxed = extract_answer(cut_response(response))
        correct = bool(pred) and is_equiv(pred, gold)
    except Exception:       # noqa: BLE001 -- a grader bug or MemoryError must not stop training
        status = "error"
    return Grade(float(correct), pred, boxed, status, correct)


# ---------------------------------------------------------------- shaping (a pure function; train.py only)

def shaped_rewards(grades: list[Grade], lengths: list[int], max_len: int, overlong_buffer: int = 0,
                   overlong_penalty: float = 1.0, format_reward: float = 0.0) -> list[float]:
    """The rewards train.py trains on: each grade's reward plus DAPO's overlong penalty (overlong_buffer > 0) and the
    format bonus/penalty (format_reward != 0); see the module docstring. lengths: response tokens (the stop token
    counted), max_len: the rollout's max_response_len. With the defaults: the grades' rewards, unchanged."""
    rewards = []
    for g, length in zip(grades, lengths, strict=True):
        r = g.reward
        if overlong_buffer:   # verl/workers/reward_manager/dapo.py:121-127
            exceed = length - (max_len - overlong_buffer)
            r += min(-exceed / overlong_buffer * overlong_penalty, 0)
        if format_reward > 0 and g.boxed or format_reward < 0 and not g.boxed:
            r += format_reward
        rewards.append(r)
    return rewards


# ---------------------------------------------------------------- process pool

def _cap(kind: int, soft: int) -> None:
    hard = resource.getrlimit(kind)[1]
    resource.setrlimit(kind, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _worker_loop(fd: int) -> None:
    """Worker process: receive (timeout, [(index, response, gold)]), send (index, result) each."""
    conn = Connection(fd)
    _cap(resource.RLIMIT_AS, WORKER_MEMORY_BYTES)
    _cap(resource.RLIMIT_CORE, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)              # Ctrl-C is the parent's business
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": we kill instead
    _math_verify()  # before "ready": its import (sympy, ~1 s) must not count against a response's timeout
    conn.send("ready")
    try:
        while (message := conn.recv()) is not None:
            timeout, batch = message
            for i, response, gold in batch:
                use = resource.getrusage(resource.RUSAGE_SELF)  # backstop if the parent died: SIGXCPU ends us
                _cap(resource.RLIMIT_CPU, int(use.ru_utime + use.ru_stime + 2 * timeout) + 2)
                g = grade_one(response, gold)
                conn.send((i, (g.reward, g.pred, g.boxed, g.status, g.correct)))
    except (EOFError, OSError):                                # the parent went away
        pass


class _Pool:
    """Worker interpreters with a socket each; a worker past its deadline is killed and replaced."""

    def __init__(self, size: int):
        self.pid, self.lock, self.size = os.getpid(), threading.Lock(), size
        self.procs, self.conns, self.ready, self.started = [None] * size, [None] * size, [False] * size, [0.0] * size
        for w in range(size):
            self._start(w)

    def _start(self, w: int) -> None:
        if self.procs[w] is not None:          # replace a hung or dead worker
            self.procs[w].kill()
            self.procs[w].wait()
            self.conns[w].close()
        ours, theirs = socket.socketpair()
        here, module = os.path.split(os.path.abspath(__file__))
        module = os.path.splitext(module)[0]
        code = f"import sys; sys.path.insert(0, {here!r}); import {module}; {module}._worker_loop({theirs.fileno()})"
        self.procs[w] = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL)
        theirs.close()
        self.conns[w], self.ready[w], self.started[w] = Connection(ours.detach()), False, time.monotonic()

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        end = time.monotonic() + 2
        for proc, conn in zip(self.procs, self.conns):
            try:
                proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            conn.close()

    def map(self, items: list[tuple], timeout: float) -> list:
        """A result tuple per item, or "timeout"/"error" where its worker hung/died; in the order of items."""
        out, todo = [None] * len(items), deque(range(len(items)))
        pending, deadline = {}, {}        # worker -> deque of the item indices it holds (oldest first); deadline
        with self.lock:
            while todo or pending:
                for w in range(self.size):
                    if self.ready[w] and w not in pending and todo:
                        chunk = [todo.popleft() for _ in range(min(CHUNK, len(todo)))]
                        try:
                            self.conns[w].send((timeout, [(i, *items[i]) for i in chunk]))
                            pending[w], deadline[w] = deque(chunk), time.monotonic() + timeout
                        except OSError:        # it died while idle: replace it, the chunk goes back
                            todo.extendleft(reversed(chunk))
                            self._start(w)
                starting = [w for w in range(self.size) if not self.ready[w]]
                watched = {self.conns[w]: w for w in [*pending, *starting]}
                due = min([deadline[w] for w in pending] + [self.started[w] + STARTUP_SECONDS for w in starting])
                for conn in wait(list(watched), timeout=max(0.0, due - time.monotonic())):
                    w = watched[conn]
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):  # it died: blame its current item, re-send the rest
                        if not self.ready[w]:
                            raise RuntimeError("a reward worker died while starting (its stderr is above)")
                        out[pending[w].popleft()] = "error"
                        todo.extendleft(reversed(pending.pop(w)))
                        self._start(w)
                        continue
                    if message == "ready":
                        self.ready[w] = True
                        continue
                    i, out[i] = message
                    pending[w].popleft()
                    deadline[w] = time.monotonic() + timeout
                    if not pending[w]:
                        del pending[w]
                now = time.monotonic()
                if any(not self.ready[w] and now > self.started[w] + STARTUP_SECONDS for w in starting):
                    raise RuntimeError(f"a reward worker did not start within {STARTUP_SECONDS} s")
                for w in [w for w in pending if deadline[w] <= now and not self.conns[w].poll()]:
                    out[pending[w].popleft()] = "timeout"   # hung: kill it, re-send the rest of its chunk
                    todo.extendleft(reversed(pending.pop(w)))
                    self._start(w)
        return out


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():   # a forked child must not use its parent's workers
            _pool = _Pool(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        return _pool


@atexit.register
def shutdown(pool: _Pool | None = None) -> None:
    """Stop this process's workers (at exit, or after a failure); the next score() starts a new pool."""
    global _pool
    with _pool_lock:
        pool = pool or _pool
        if _pool is pool:
            _pool = None
    if pool is not None and pool.pid == os.getpid():   # (a forked child leaves its parent's workers alone)
        with contextlib.suppress(Exception):             # it may be broken already
            pool.close()


def score(responses: list[str], golds: list[str], timeout: float = 5.0) -> list[Grade]:
    """Grade responses against golds in worker processes, `timeout` seconds of wall clock each; same order."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    if not responses:
        return []
    check_math_verify()  # in this process: a worker would only report "error" for each response
    items = [(str(r), str(g)) for r, g in zip(responses, golds)]
    for attempt in range(2):           # a pool whose workers cannot start is rebuilt once, then we give up
        pool = _get_pool()
        try:
            results = pool.map(items, timeout)
            break
        except BaseException as e:     # its workers may still hold items of this call: replace it
            shutdown(pool)
            if attempt or not isinstance(e, Exception):
                raise
    for k, result in enumerate(results):
        if isinstance(result, str):    # "timeout"/"error": its worker was lost; extraction is cheap to redo here
            pred, boxed = extract_answer(cut_response(items[k][0]))
            results[k] = (0.0, pred, boxed, result, False)
    return [Grade(*result) for result in results]


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Grade JSONL rows {response, gold}; writes them back + reward, correct, "
                                             "pred.")
    ap.add_argument("input", help="JSONL file, one object per line with 'response' and 'gold'")
    ap.add_argument("--out", required=True, help="output JSONL path")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds of wall clock per response")
    args = ap.parse_args(argv)
    rows = []
    try:
        with open(args.input, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.input}:{lineno} is not valid JSON ({e.msg}); fix or delete that line")
                if not isinstance(row, dict) or "response" not in row or "gold" not in row:
                    raise ValueError(f"{args.input}:{lineno} needs 'response' and 'gold' fields")
                rows.append(row)
    except (OSError, ValueError) as e:           # missing file, bad JSON, missing fields
        print(f"reward.py: error: {e}", file=sys.stderr)
        return 2
    try:
        check_math_verify()
    except ImportError as e:
        print(f"reward.py: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    grades = score([r["response"] for r in rows], [r["gold"] for r in rows], timeout=args.timeout)
    seconds = time.perf_counter() - t0
    with open(args.out, "w", encoding="utf-8") as f:
        for row, g in zip(rows, grades):
            f.write(json.dumps({**row, "reward": g.reward, "correct": g.correct, "pred": g.pred}) + "\n")
    n, timeouts = len(rows), sum(g.status == "timeout" for g in grades)
    accuracy = sum(g.correct for g in grades) / max(n, 1)
    print(f"graded {n} | accuracy {accuracy:.4f} | timeouts {timeouts} | {n / max(seconds, 1e-9):.1f} responses/s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
