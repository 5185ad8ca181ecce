"""eval.py: gold extraction per benchmark layout, pass@k, summary stats, regrade, tiny-model runs (1 and 2 ranks,
--checkpoints with curves), and one-line errors on bad input."""
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
import flags
import logs
import reward
from conftest import make_llama_tokenizer, make_model
from data import TEMPLATES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture
def bench_dir(tmp_path):
    """Two small benchmarks in the gsm8k and math500 layouts."""
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl",
                [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>\n#### {a + b}"}
                 for a in range(3) for b in range(2)])
    write_jsonl(tmp_path / "math500" / "test.jsonl",
                [{"problem": f"Compute ${a} \\times 2$.", "answer": str(2 * a), "level": 1} for a in range(5)])
    return str(tmp_path)


def test_gold_extraction_per_benchmark_layout(tmp_path):
    rows = {
        "gsm8k": [{"question": "Q1", "answer": "3 * 6 = <<3*6=18>>18\n#### 18"},
                  {"question": "Q2", "answer": "a\n####1,000 "}],
        "math500": [{"problem": "P", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "solution": "\\boxed{x}"}],
        "minerva_math": [{"problem": "M", "solution": "first \\boxed{1} then $\\boxed{\\frac{1}{2}}$ \\mathrm{~cm}"}],
        "olympiadbench": [{"question": "O1", "context": None, "final_answer": ["$\\frac{1}{2 n+2}$"]},
                          {"question": "O2", "context": "Let $f(x)=x$.", "final_answer": ["$69$,$84$", "x"]},
                          {"question": "O3", "context": "", "final_answer": ["2"]}],
        "aime24": [{"problem": "A", "question": "A", "answer": "025"}],
        "amc23": [{"question": "C", "problem": "C", "answer": 27.0}],
    }
    for name, rs in rows.items():
        write_jsonl(tmp_path / name / "test.jsonl", rs)
    got = {name: [(p["question"], p["gold"], p["idx"]) for p in ev.load_benchmark(str(tmp_path), name)]
           for name in rows}
    assert got == {
        "gsm8k": [("Q1", "18", 0), ("Q2", "1,000", 1)],
        "math500": [("P", "\\left( 3, \\frac{\\pi}{2} \\right)", 0)],
        "minerva_math": [("M", "\\frac{1}{2}", 0)],  # the LAST box, brace-matched
        "olympiadbench": [("O1", "\\frac{1}{2 n+2}", 0), ("Let $f(x)=x$.\nO2", "69,84", 1), ("O3", "2", 2)],
        "aime24": [("A", "025", 0)],
        "amc23": [("C", "27.0", 0)],
    }
    assert [p["gold"] for p in ev.load_benchmark(str(tmp_path), "gsm8k", limit=1)] == ["18"]
    write_jsonl(tmp_path / "minerva_math" / "test.jsonl", [{"problem": "M", "solution": "no box, answer 3"}])
    with pytest.raises(ev.DataError, match="row 1 does not have the minerva_math layout"):
        ev.load_benchmark(str(tmp_path), "minerva_math")
    write_jsonl(tmp_path / "math500" / "test.jsonl", [{"problem": "P", "answer": "1"}, {"question": "P"}])
    with pytest.raises(ev.DataError, match="row 2 does not have the math500 layout"):
        ev.load_benchmark(str(tmp_path), "math500")
    with pytest.raises(ev.DataError, match="unknown benchmark 'gsm8'"):
        ev.load_benchmark(str(tmp_path), "gsm8")
    with pytest.raises(ev.DataError, match="no such file"):
        ev.load_benchmark(str(tmp_path / "nowhere"), "aime24")


def test_pass_at_k_equals_brute_force_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert ev.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    # large n: no overflow, agrees with the closed form
    assert ev.pass_at_k(1024, 3, 256) == pytest.approx(1 - math.comb(1021, 256) / math.comb(1024, 256), rel=1e-12)
    assert ev.pass_at_k(100, 0, 64) == 0.0 and ev.pass_at_k(100, 37, 1) == pytest.approx(0.37)


def test_summarize_and_table_on_hand_made_rows():
    rows = [
        dict(benchmark="b1", correct=[1, 0, 0, 0], boxed=[1, 1, 0, 0], responses=["Wait, 2", "x", "HOWEVER", "y"],
             finish_reasons=["stop", "stop", "length", "stop"], lengths=[10, 20, 100, 30]),
        dict(benchmark="b1", correct=[1, 1, 1, 1], boxed=[1, 1, 1, 1], responses=["a", "b", "c", "d"],
             finish_reasons=["stop"] * 4, lengths=[5, 5, 5, 5]),
        dict(benchmark="b2", correct=[0], boxed=[0], responses=["try again"], finish_reasons=["length"], lengths=[7]),
    ]
    s = ev.summarize(rows)
    assert list(s) == ["b1", "b2", "average"]
    b1 = s["b1"]
    assert b1["acc"] == pytest.approx(100 * (0.25 + 1) / 2) == b1["pass@1"]
    assert b1["pass@2"] == pytest.approx(100 * (0.5 + 1) / 2) and b1["pass@4"] == pytest.approx(100.0)
    assert "pass@8" not in b1 and "pass@3" not in b1
    assert (b1["clip_ratio"], b1["stop_len"], b1["box_ratio"], b1["reflection_ratio"], b1["count"], b1["n"]) == \
        (1 / 8, pytest.approx((10 + 20 + 30 + 20) / 7), 6 / 8, 2 / 8, 2, 4)
    assert (s["b2"]["acc"], s["b2"]["clip_ratio"], s["b2"]["stop_len"], s["b2"]["reflection_ratio"]) == (0, 1, None, 1)
    assert s["average"] == pytest.approx((62.5 + 0) / 2)
    md = ev.table(s).splitlines()
    assert md[0].startswith("| benchmark | acc | pass@2 | pass@4 | clip % |") and len(md) == 5
    assert md[2].startswith("| b1 | 62.5 | 75.0 | 100.0 | 12.5 | 11.4 | 75.0 | 25.0 | 2 x 4 |")
    assert "| b2 | 0.0 | - | - | 100.0 | - |" in md[3] and "**31.2**" in md[4]


def test_regrade_gives_the_known_accuracy(tmp_path, capsys):
    rows = [dict(benchmark="gsm8k", idx=0, gold="18", responses=["so \\boxed{18}<|im_end|>", "it is 17"],
                 preds=["stale", "stale"], correct=[0, 0], finish_reasons=["stop", "stop"], lengths=[9, 4]),
            dict(benchmark="amc23", idx=0, gold=27.0, responses=["Wait... the answer is 27."]),  # no lengths: fine
            dict(benchmark="amc23", idx=1, gold="\\frac{1}{2}", responses=["\\boxed{0.5}", "\\boxed{1/3}"])]
    path = write_jsonl(tmp_path / "gen.jsonl", rows)
    ev.main([f"--regrade={path}", f"--out={tmp_path / 'out'}"])
    s = json.load(open(tmp_path / "out" / "summary.json"))
    assert s["gsm8k"]["acc"] == 50.0 and s["gsm8k"]["pass@2"] == 100.0 and s["gsm8k"]["box_ratio"] == 0.5
    assert s["amc23"]["acc"] == pytest.approx((100 + 50) / 2) and s["amc23"]["n"] == 1 and s["amc23"]["count"] == 2
    assert s["amc23"]["clip_ratio"] is None and s["amc23"]["reflection_ratio"] == pytest.approx(1 / 3)
    assert s["average"] == pytest.approx((50 + 75) / 2)
    out = [json.loads(l) for l in open(tmp_path / "out" / "generations.jsonl")]
    assert [r["correct"] for r in out] == [[1, 0], [1], [1, 0]] and out[0]["preds"] == ["18", "17"]
    assert "| gsm8k | 50.0 | 100.0 |" in capsys.readouterr().out
    assert (tmp_path / "out" / "summary.md").read_text().startswith("| benchmark |")


def test_accuracy_never_moves_with_reward_shaping(monkeypatch):
    """correct, acc and pass@k read each grade's `correct`, not its reward: the same responses graded with and without
    shaped rewards (reward.shaped_rewards' overlong and format penalties folded into the grades) score the same."""
    responses = [r"so \boxed{18}", "it is 18", r"\boxed{17}", "no idea"]  # right (boxed, not), wrong (boxed, not)
    rows = lambda: [dict(benchmark="gsm8k", idx=0, gold="18", responses=responses[:2]),
                    dict(benchmark="gsm8k", idx=1, gold="18", responses=responses[2:])]
    plain, score, rewards = ev.grade(rows()), reward.score, {}

    def shaped_score(texts, golds):  # characters stand in for tokens
        grades = score(texts, golds)
        rewards["off"], rewards["on"] = [g.reward for g in grades], reward.shaped_rewards(
            grades, [len(t) for t in texts], 12, overlong_buffer=6, format_reward=-0.5)
        return [dataclasses.replace(g, reward=r) for g, r in zip(grades, rewards["on"])]

    monkeypatch.setattr(reward, "score", shaped_score)
    shaped = ev.grade(rows())
    assert rewards["on"] != rewards["off"] and rewards["off"] == [1.0, 1.0, 0.0, 0.0]  # shaping moved the rewards
    assert [r["correct"] for r in shaped] == [r["correct"] for r in plain] == [[1, 1], [0, 0]]
    assert ev.summarize(shaped) == ev.summarize(plain)


def test_arith_benchmark_grades_a_right_and_a_wrong_answer(tmp_path, capsys):
    """The built-in "arith" benchmark (data.arith_split("test"), no file) through eval.py's grading: a right answer
    counts, a wrong one does not."""
    problems = ev.load_benchmark(str(tmp_path / "nowhere"), "arith")
    assert len(problems) == 100 and ev.load_benchmark("", "arith", limit=3) == problems[:3]
    assert problems[1] == dict(benchmark="arith", idx=1, question="What is 23 + 77?", gold="100")
    rows = [dict(p, responses=[f"{p['question'][8:-1]} = {answer}<|im_end|>"])  # 37 + 54 = 81: the carry dropped
            for p, answer in zip(problems[1:3], ["100", "81"])]
    ev.main([f"--regrade={write_jsonl(tmp_path / 'gen.jsonl', rows)}", f"--out={tmp_path / 'out'}"])
    graded = [json.loads(l) for l in open(tmp_path / "out" / "generations.jsonl")]
    assert [(r["gold"], r["preds"], r["correct"]) for r in graded] == [("100", ["100"], [1]), ("91", ["81"], [0])]
    assert json.load(open(tmp_path / "out" / "summary.json"))["arith"]["acc"] == 50.0


@pytest.mark.slow
def test_tiny_model_end_to_end(model_dir, tokenizer, bench_dir, tmp_path):
    out = str(tmp_path / "out")
    ev.main([f"--model={model_dir}", "--benchmarks=gsm8k,math500", f"--data_dir={bench_dir}", "--limit=4",
             "--max_new_tokens=12", "--n=2", "--temperature=1.0", "--batch_size=3", f"--out={out}"])
    rows = [json.loads(l) for l in open(os.path.join(out, "generations.jsonl"))]
    assert [(r["benchmark"], r["idx"]) for r in rows] == [(b, i) for b in ("gsm8k", "math500") for i in range(4)]
    assert rows[0]["question"] == "What is 0 + 0?" and rows[0]["gold"] == "0" and rows[4]["gold"] == "0"
    for r in rows:
        assert all(len(r[k]) == 2 for k in ("responses", "preds", "correct", "boxed", "finish_reasons", "lengths"))
        assert all(0 < n <= 12 for n in r["lengths"]) and set(r["finish_reasons"]) <= {"stop", "length"}
        assert all(l == 12 for l, f in zip(r["lengths"], r["finish_reasons"]) if f == "length")
    s = json.load(open(os.path.join(out, "summary.json")))
    assert list(s) == ["gsm8k", "math500", "average"] and s["gsm8k"]["count"] == 4 and s["gsm8k"]["n"] == 2
    assert set(s["gsm8k"]) == {"acc", "pass@1", "pass@2", "clip_ratio", "stop_len", "box_ratio", "reflection_ratio",
                               "count", "n"}
    assert open(os.path.join(out, "summary.md")).read().count("\n") == 5
    assert json.load(open(os.path.join(out, "config.json")))["n"] == 2

    # accuracy end to end: greedy twice on the same prompts, the second time with the first run's predictions as gold
    model = make_model(tokenizer).train()
    w0, rng = [p.clone() for p in model.parameters()], torch.get_rng_state()
    kw = dict(benchmarks=["gsm8k", "math500"], data_dir=bench_dir, template="qwen-boxed", max_new_tokens=24)
    rows, _ = ev.evaluate(model, tokenizer, **kw)
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # train mode restored, caller's RNG untouched
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    hits = [bool(r["preds"][0]) for r in rows]
    assert 0 < sum(hits) < len(rows), [r["preds"] for r in rows]  # some (not all) responses have a number in them
    for name in ("gsm8k", "math500"):
        path = os.path.join(bench_dir, name, "test.jsonl")
        new = [json.loads(l) for l in open(path)]
        for line, r in zip(new, (r for r in rows if r["benchmark"] == name)):
            line["answer"] = f"#### {r['preds'][0] or 'nothing'}" if name == "gsm8k" else (r["preds"][0] or "nothing")
        write_jsonl(path, new)
    rows2, s2 = ev.evaluate(model, tokenizer, **kw)
    assert [r["correct"] for r in rows2] == [[int(h)] for h in hits]
    assert s2["average"] == pytest.approx(sum(100 * sum(h for h, r in zip(hits, rows) if r["benchmark"] == b) /
                                              sum(r["benchmark"] == b for r in rows) for b in ("gsm8k", "math500")) / 2)


def test_responses_stop_at_the_model_context(tokenizer, bench_dir):
    """As in vLLM, prompt + response never run past the model's positions (here 80), whatever --max_new_tokens says."""
    model = make_model(tokenizer, max_position_embeddings=80)
    rows, _ = ev.evaluate(model, tokenizer, ["gsm8k"], bench_dir, "chatml-short", max_new_tokens=200, limit=3,
                          batch_size=1)
    for r in rows:
        P = len(tokenizer(TEMPLATES["chatml-short"].replace("{question}", r["question"]))["input_ids"])
        assert P < 60 and r["lengths"][0] <= 80 - P
        assert r["finish_reasons"][0] == "stop" or r["lengths"][0] == 80 - P
    assert "length" in {r["finish_reasons"][0] for r in rows}  # the random model does run into the context


def test_each_prompt_gets_its_own_room_in_the_context(tokenizer, tmp_path):
    """As in vLLM, within one batch each prompt + response may fill the model's positions (here 80): a short prompt's
    response is not cut at the room the batch's longest prompt leaves."""
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl",
                [{"question": "What is 1 + 1?" + " Think." * k, "answer": "#### 2"} for k in (0, 1, 3)])
    model = make_model(tokenizer, max_position_embeddings=80)
    rows, _ = ev.evaluate(model, tokenizer, ["gsm8k"], str(tmp_path), "chatml-short", max_new_tokens=200,
                          batch_size=3)
    P = [len(tokenizer(TEMPLATES["chatml-short"].replace("{question}", r["question"]))["input_ids"]) for r in rows]
    assert P[0] < P[1] < P[2] < 60  # one batch of three prompt lengths
    for r, p in zip(rows, P):
        assert r["finish_reasons"][0] == "stop" or r["lengths"][0] == 80 - p
    assert [r["finish_reasons"][0] for r in rows].count("length") >= 2, rows  # runs into the context, each its own


def test_chat_template_on_a_llama_tokenizer(tmp_path, monkeypatch):
    """A Llama tokenizer without ChatML tokens: eval.py refuses the ChatML template before the weights load, and
    evaluates under --template=chat with the prompts of apply_chat_template (one BOS)."""
    llama = make_llama_tokenizer()
    folder = str(tmp_path / "llama")
    make_model(llama, eos_token_id=llama.eos_token_id).save_pretrained(folder)
    llama.save_pretrained(folder)
    monkeypatch.setattr(ev, "load_lm", lambda *a, **k: pytest.fail("the weights load before the template check"))
    with pytest.raises(SystemExit, match="<\\|im_start\\|>, which is .* --template=chat"):
        ev.main([f"--model={folder}", "--benchmarks=arith", "--template=chatml-short", f"--out={tmp_path / 'o'}"])
    model = make_model(llama)
    rows, summary = ev.evaluate(model, llama, ["arith"], "", "chat", max_new_tokens=4, limit=3)
    assert summary["arith"]["count"] == 3 and all(len(r["responses"]) == 1 for r in rows)
    prompt = llama.apply_chat_template([{"role": "user", "content": rows[0]["question"]}], add_generation_prompt=True,
                                       return_tensors="pt")
    assert prompt["input_ids"][0].tolist().count(llama.bos_token_id) == 1
    with torch.no_grad():  # greedy: the first response token is the argmax after apply_chat_template's prompt
        first = int(model(**prompt).logits[0, -1].argmax())
    assert llama(rows[0]["responses"][0], add_special_tokens=False)["input_ids"][:1] == [first] or \
        first == llama.eos_token_id


def test_generation_config_eos_stops_responses(tokenizer, bench_dir):
    """A token that is EOS only in the model's generation_config (as Llama-3's <|eot_id|>) ends responses there."""
    model = make_model(tokenizer)
    rows, _ = ev.evaluate(model, tokenizer, ["gsm8k"], bench_dir, "chatml-short", max_new_tokens=6, limit=2)
    prompt = tokenizer(TEMPLATES["chatml-short"].replace("{question}", rows[0]["question"]), return_tensors="pt")
    with torch.no_grad():
        first = int(model(**prompt).logits[0, -1].argmax())  # the greedy first token of problem 0
    assert rows[0]["lengths"][0] > 1 and first != tokenizer.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    rows2, _ = ev.evaluate(model, tokenizer, ["gsm8k"], bench_dir, "chatml-short", max_new_tokens=6, limit=2)
    assert rows2[0]["lengths"][0] == 1 and rows2[0]["finish_reasons"][0] == "stop"


@pytest.mark.slow
def test_two_ranks_give_the_same_results_as_one(model_dir, bench_dir, tmp_path):
    args = [f"--model={model_dir}", "--benchmarks=gsm8k,math500", f"--data_dir={bench_dir}", "--max_new_tokens=16",
            "--batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "eval.py", *args, f"--out={tmp_path / 'one'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--nproc_per_node=2", "eval.py", *args, f"--out={tmp_path / 'two'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 ranks" in two.stdout and two.stdout.count("| **average** |") == 1  # rank 0 alone writes and prints
    for name in ("generations.jsonl", "summary.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert len((tmp_path / "two" / "generations.jsonl").read_text().splitlines()) == 11


@pytest.mark.slow
def test_checkpoints_of_a_run_curves_and_skip(tokenizer, bench_dir, tmp_path, capsys):
    run = tmp_path / "run"

    def save(step):
        make_model(tokenizer, seed=step).save_pretrained(run / f"step_{step:06d}" / "model")
        tokenizer.save_pretrained(run / f"step_{step:06d}" / "model")

    save(2), save(4)
    os.makedirs(run / "step_000006.tmp")  # an unfinished checkpoint is ignored
    write_jsonl(run / "metrics.jsonl", [dict(step=s, len_mean=30 - s, clip_ratio=0.5 / s) for s in range(1, 5)])
    json.dump(dict(config=dict(template="chatml-short")), open(run / "config.json", "w"))
    args = [f"--checkpoints={run}", "--benchmarks=gsm8k", f"--data_dir={bench_dir}", "--limit=2", "--max_new_tokens=6"]
    ev.main(args)
    assert "eval 2 model(s)" in capsys.readouterr().out
    for step in (2, 4):
        d = run / "eval" / f"step_{step:06d}"
        assert json.load(open(d / "summary.json"))["gsm8k"]["count"] == 2
        assert json.load(open(d / "config.json"))["template"] == "chatml-short"  # the run's template
    assert (run / "eval" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = {s: os.stat(run / "eval" / f"step_{s:06d}" / "summary.json").st_mtime_ns for s in (2, 4)}
    save(6)
    ev.main(args + ["--template=qwen-boxed"])
    assert "eval 1 model(s)" in capsys.readouterr().out  # steps 2 and 4 are skipped
    assert {s: os.stat(run / "eval" / f"step_{s:06d}" / "summary.json").st_mtime_ns for s in (2, 4)} == done
    assert json.load(open(run / "eval" / "step_000006" / "config.json"))["template"] == "qwen-boxed"


def test_help_prints_every_flag_and_the_presets_and_exits_0():
    r = subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    comments = flags.field_comments(ev.Config)
    for f in dataclasses.fields(ev.Config):
        default = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        assert comments[f.name] and f"--{f.name}={default}" in r.stdout and comments[f.name] in r.stdout, f.name
    assert "\n  base     temperature=0.0 top_p=1.0\n  rl       temperature=1.0 top_p=0.95" in r.stdout


def test_checkpoint_curves_are_drawn_by_the_training_curves_function(tmp_path, monkeypatch):
    """eval.py --checkpoints' curves.png comes from logs.plot_curves, the function that draws a training run's."""
    run = tmp_path / "run"
    for step, acc in [(2, 10.0), (4, 30.0)]:
        os.makedirs(run / "eval" / f"step_{step:06d}")
        json.dump(dict(math500=dict(acc=acc), average=acc), open(run / "eval" / f"step_{step:06d}" / "summary.json", "w"))
    write_jsonl(run / "metrics.jsonl", [dict(step=s, len_mean=30 - s, clip_ratio=0.5 / s) for s in range(1, 5)])
    calls, real = [], logs.plot_curves
    monkeypatch.setattr(logs, "plot_curves", lambda path, panels, title: calls.append((path, panels)) or
                        real(path, panels, title))
    titles = ev.plot_curves(str(run))
    assert titles == ["eval accuracy (%)", "training rollouts: response length (tokens)", "training rollouts: clip ratio"]
    (path, panels), = calls
    assert path == str(run / "eval" / "curves.png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert panels[0][1] == {"math500": ([2, 4], [10.0, 30.0]), "average": ([2, 4], [10.0, 30.0])}
    assert panels[2][1] == {"clip ratio": ([1, 2, 3, 4], [0.5, 0.25, 0.5 / 3, 0.125])}
@pytest.mark.slow
def test_checkpoints_start_at_the_run_initial_model_in_one_table(model_dir, tokenizer, tmp_path, capsys):
    """--checkpoints: step 0 is the run's --model (RUN_DIR/config.json), in RUN_DIR/eval/step_000000 unless done;
    one table across the steps (printed and RUN_DIR/eval/summary.md), none per checkpoint; train.py's step-0 row of
    metrics.jsonl (evals only) does not break the curves."""
    run = tmp_path / "run"
    make_model(tokenizer, seed=2).save_pretrained(run / "step_000002" / "model")
    tokenizer.save_pretrained(run / "step_000002" / "model")
    json.dump(dict(config=dict(model=model_dir, template="chatml-short")), open(run / "config.json", "w"))
    write_jsonl(run / "metrics.jsonl", [dict(step=0, eval_arith=0.0, t_eval=1.0),
                                        *(dict(step=s, len_mean=9.0, clip_ratio=0.5) for s in (1, 2))])
    args = [f"--checkpoints={run}", "--benchmarks=arith", "--limit=2", "--max_new_tokens=6"]
    ev.main(args)
    out = capsys.readouterr().out
    assert "eval 2 model(s)" in out and out.count("| benchmark |") == 1  # one table, not one per checkpoint
    assert json.load(open(run / "eval" / "step_000000" / "config.json"))["model"] == model_dir
    assert json.load(open(run / "eval" / "step_000000" / "summary.json"))["arith"]["count"] == 2
    table = (run / "eval" / "summary.md").read_text().splitlines()
    assert table[0].startswith("| step | benchmark | acc | clip % | stop len | box % |") and len(table) == 4
    assert [l.split(" | ")[:2] for l in table[2:]] == [["| 0", "arith"], ["| 2", "arith"]]
    assert "\n".join(table) in out and (run / "eval" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    ev.main(args)  # both done: nothing evaluated, the same table
    out = capsys.readouterr().out
    assert "eval 0 model(s)" in out and "\n".join(table) in out


def test_bad_input_is_one_error_line(model_dir, bench_dir, tmp_path):
    cases = [(["--modle=x"], "did you mean --model"), (["--model=x", "--n=two"], "--n=two is not a valid int"),
             (["--benchmarks=gsm8k"], "exactly one of"), ([f"--model={model_dir}", "--regrade=g.jsonl"], "exactly one"),
             ([f"--model={model_dir}", "--template=Solve it."], "holds no {question}"),
             ([f"--model={model_dir}", "--benchmarks=arith", "--template=chat"], "has none; use --template=abel"),
             (["--preset=sft"], "unknown --preset"),
             ([f"--model={model_dir}", f"--data_dir={bench_dir}", "--benchmarks=gsm8k,aime"], "unknown benchmark"),
             ([f"--model={model_dir}", f"--data_dir={bench_dir}", "--benchmarks=aime24"], "aime24/test.jsonl"),
             ([f"--regrade={tmp_path / 'none.jsonl'}"], "No such file"),
             ([f"--checkpoints={tmp_path}", f"--data_dir={bench_dir}", "--benchmarks=gsm8k"], "no step_"),
             ([f"--model={tmp_path / 'no_model'}", f"--data_dir={bench_dir}", "--benchmarks=gsm8k"], "no_model"),
             ([f"--model={model_dir}", "--max_new_tokens=0"], "--max_new_tokens >= 1"),
             ([f"--model={model_dir}", "--n=4"], "--n > 1 needs --temperature > 0"),
             ([f"--model={model_dir}", "--benchmarks=gsm8k,math500,gsm8k"], "names a benchmark twice")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            ev.main(argv)
    write_jsonl(tmp_path / "bad.jsonl", [dict(benchmark="gsm8k", gold="1", responses=[])])
    with pytest.raises(SystemExit, match="row 1 is not a JSON object with benchmark, gold and a non-empty"):
        ev.main([f"--regrade={tmp_path / 'bad.jsonl'}"])
    r = subprocess.run([sys.executable, "eval.py", f"--model={model_dir}", f"--data_dir={tmp_path / 'nowhere'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stdout == "" and "Loading weights" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: no such file: {tmp_path / 'nowhere' / 'gsm8k' / 'test.jsonl'}; "
                                             f"pass --data_dir=DIR where DIR/gsm8k/test.jsonl exists (the Zoo's "
                                             "files: README, Data and benchmarks)"]
