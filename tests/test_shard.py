"""--shard=zero2/zero3 (FSDP2) against --shard=ddp on 2 gloo ranks: same weights, resumable checkpoints."""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model
from test_train import ROOT, flags, metrics, run

TORCHRUN2 = ("torchrun", "--standalone", "--nproc_per_node=2", "train.py")


def weights(out, step):
    """The exported model of a checkpoint (under zero: model-0000k-of-0000n.safetensors + an index)."""
    folder = os.path.join(out, f"step_{step:06d}", "model")
    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


@pytest.mark.slow
def test_zero2_zero3_match_ddp(model_dir, data_file, tmp_path):
    outs = {}
    for shard in ("ddp", "zero2", "zero3"):
        outs[shard] = str(tmp_path / shard)
        r = run(flags(model_dir, data_file, outs[shard], shard=shard, steps=2, lr=1e-2), launcher=TORCHRUN2)
        assert r.returncode == 0, r.stderr[-3000:]
    w0 = load_file(os.path.join(model_dir, "model.safetensors"))
    ref = weights(outs["ddp"], 2)
    assert max((ref[k] - w0[k]).abs().max().item() for k in ref) > 1e-3  # the weights moved
    for shard in ("zero2", "zero3"):
        w = weights(outs[shard], 2)
        assert set(w) == set(ref)
        for k in ref:
            assert torch.allclose(w[k], ref[k], rtol=1e-5, atol=1e-6), (shard, k, (w[k] - ref[k]).abs().max())
        assert os.path.isdir(os.path.join(outs[shard], "step_000002", "shards"))
        assert [m["reward"] for m in metrics(outs[shard])] == [m["reward"] for m in metrics(outs["ddp"])]


@pytest.mark.slow
def test_zero3_export_is_a_loadable_hf_model(model_dir, data_file, tmp_path, monkeypatch):
    """Under zero the export is merged from every rank's slices (never gathered in memory) into files of at most
    EXPORT_FILE_BYTES (5 GB; here ~60 KB, so several files and an index): from_pretrained reads back the weights."""
    import distributed
    import train
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(distributed, "EXPORT_FILE_BYTES", 60_000)
    out = str(tmp_path / "z")
    train.main(flags(model_dir, data_file, out, shard="zero3", steps=1, save_every=1, lr=1e-2))  # 1 process
    folder = os.path.join(out, "step_000001", "model")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert "sharded" not in os.listdir(folder) and "generation_config.json" in os.listdir(folder)
    w, w0 = weights(out, 1), load_file(os.path.join(model_dir, "model.safetensors"))
    assert set(w) == set(w0) and any(not torch.equal(w[k], w0[k]) for k in w)  # all tensors, trained
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[k], w[k]) for k in w)
    import torch.distributed.checkpoint as dcp  # an older torch without that writer: one line before any model loads
    monkeypatch.delattr(dcp, "HuggingFaceStorageWriter")
    with pytest.raises(SystemExit, match="upgrade torch"):
        train.main(flags(model_dir, data_file, str(tmp_path / "old"), shard="zero3"))


@pytest.mark.slow
def test_zero3_tied_embeddings_stay_tied(tokenizer, data_file, tmp_path):
    """zero3 builds the model on the meta device and loads rank 0's weights into the shards: tied input/output
    embeddings (Qwen2.5-0.5B/1.5B, SmolLM2) must remain ONE trained parameter, as under ddp."""
    model_dir = str(tmp_path / "tied")
    make_model(tokenizer, tie_word_embeddings=True).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    outs = {}
    for shard in ("ddp", "zero3"):
        outs[shard] = str(tmp_path / shard)
        r = run(flags(model_dir, data_file, outs[shard], shard=shard, steps=2, lr=1e-2), launcher=TORCHRUN2)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(outs["ddp"], 2), weights(outs["zero3"], 2)
    assert set(a) == set(b) and "lm_head.weight" not in a  # saved once, as a tied model
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, (a[k] - b[k]).abs().max())


def test_inference_copy_of_a_tied_model_is_tied(tokenizer):
    """The rollout copy (distributed.inference_copy + copy_weights) of a model with tied embeddings (SmolLM2,
    Qwen2.5-0.5B/1.5B) generates from the policy's lm_head: its own is the copied embedding, not uninitialised memory
    (which made the smoke preset's rollouts random tokens)."""
    import distributed
    from model import Policy
    lm = make_model(tokenizer, tie_word_embeddings=True)
    copy, _ = distributed.inference_copy(lm.config, torch.device("cpu"), torch.float32)
    distributed.copy_weights(Policy(lm), copy)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    ids = torch.tensor([tokenizer("What is 3 + 5?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, lm(ids).logits)


@pytest.mark.slow
def test_zero3_gpu_precision_policy(tmp_path):
    """zero3 as on GPU (bf16 compute, fp32 master shards and fp32 gradient reduction), run on gloo: the shards and
    their gradients stay fp32, and the gradients are within bf16 rounding of the fp32 run's (0 would mean no bf16)."""
    out = tmp_path / "mp.json"
    r = run([os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_grads.py"), "zero3_mixed", str(out)],
            launcher=("torchrun", "--standalone", "--nproc_per_node=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    c = __import__("json").load(open(out))
    assert c["dtypes"] == ["torch.float32"] and 0 < max(c["gaps"]) < 3e-2, c


@pytest.mark.slow
def test_zero3_generation_gathers_once_per_rollout_not_per_token(tmp_path):
    out = tmp_path / "counts.json"
    here = os.path.dirname(os.path.abspath(__file__))
    r = run([os.path.join(here, "fsdp_gen.py"), str(out)], launcher=("torchrun", "--standalone", "--nproc_per_node=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    c = __import__("json").load(open(out))
    assert c["gathered"] == c["layers"] + 1  # each FSDP unit (layers + root) once for the whole rollout
    assert c["per_token"] >= c["new_tokens"] * c["layers"]  # what plain generate under zero3 would do
    assert c["slots_gathered"] == c["layers"] + 1  # engine "slots" under gathered(): no all-gather per step either


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["ddp", "zero3"])
def test_tensor_parallel_rollout_copy_matches_policy(tmp_path, shard):
    """--gen_tp: the rollout's tensor-parallel copy decodes like the unsharded policy with engine "slots" (all rows at once, and 6 slots refilled)
    (greedy tokens, log-probs of sampled tokens == a full forward's, so its ranks agreed on every token), each rank
    gets its own prompts' rows from the pooled batch, the copy follows the policy's updates, and eval.evaluate on it
    matches the plain model."""
    out = tmp_path / "tp.json"
    here = os.path.dirname(os.path.abspath(__file__))
    r = run([os.path.join(here, "tp_gen.py"), shard, str(out)],
            launcher=("torchrun", "--standalone", "--nproc_per_node=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    checks = __import__("json").load(open(out))
    assert checks[0]["eval_rows"] == 5 and checks[0]["eval_equal"]  # eval.evaluate with tp_group
    for c in checks:  # rank 0 (2 prompts), rank 1 (1 prompt)
        assert c["initial_greedy"] != c["after_update_greedy"]  # the update changed the model's outputs
        for phase in ("initial", "after_update"):
            assert c[f"{phase}_own_rows"] and c[f"{phase}_greedy_equal"]
            assert c[f"{phase}_logprob_err"] < 1e-4
            assert c[f"{phase}_slots_own_rows"] and c[f"{phase}_slots_greedy_equal"]  # engine "slots", 6 slots
            assert c[f"{phase}_slots_logprob_err"] < 1e-4


@pytest.mark.slow
def test_train_with_tensor_parallel_rollout(model_dir, data_file, tmp_path):
    """2 ranks, zero3, --gen_tp=2: both ranks' prompts are decoded by one 2-way tensor-parallel copy; a resumed run
    replays the uninterrupted one (the group's samples come from its first rank's seeded draw)."""
    args = lambda out, steps: flags(model_dir, data_file, out, shard="zero3", gen_tp=2, steps=steps, save_every=1,
                                    lr=1e-2)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "resumed")
    for o, steps in ((ref, 3), (out, 2), (out, 3)):
        r = run(args(o, steps), launcher=TORCHRUN2)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    a, b = weights(ref, 3), weights(out, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["reward"] for m in metrics(ref)] == [m["reward"] for m in metrics(out)]


@pytest.mark.slow
def test_four_ranks_two_tensor_parallel_groups(model_dir, data_file, tmp_path):
    """4 ranks = 2 data-parallel x 2-way tensor-parallel rollout groups (a 2x2 device mesh), zero3."""
    out = str(tmp_path / "dp2tp2")
    r = run(flags(model_dir, data_file, out, shard="zero3", gen_tp=2, mini_batches=1, steps=2),
            launcher=("torchrun", "--standalone", "--nproc_per_node=4", "train.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 ranks x 1 prompts" in r.stdout and [m["step"] for m in metrics(out)] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["update", "save"])
def test_killed_zero3_run_restarts_and_matches_uninterrupted(model_dir, data_file, tmp_path, fault):
    args = lambda out: flags(model_dir, data_file, out, shard="zero3", steps=4, save_every=1, lr=1e-2, keep_last=2)
    ref = str(tmp_path / "ref")
    r = run(args(ref), launcher=TORCHRUN2)
    assert r.returncode == 0, r.stderr[-3000:]
    out, marker = str(tmp_path / "killed"), str(tmp_path / "killed.marker")
    r = run(args(out), env=dict(FAULT=fault, FAULT_MARKER=marker),
            launcher=("torchrun", "--standalone", "--nproc_per_node=2", "--max-restarts=3", "tests/faulty_train.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(marker) and "resuming from" in r.stdout + r.stderr  # it did die, and came back
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    a, b = weights(ref, 4), weights(out, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [d for d in os.listdir(out) if d.endswith(".tmp")]
    kept = {d: sorted(os.listdir(os.path.join(out, d))) for d in os.listdir(out) if d.startswith("step_")}
    assert kept == {"step_000001": ["model"], "step_000002": ["model"],  # --keep_last=2
                    "step_000003": ["model", "shards", "state.pt"], "step_000004": ["model", "shards", "state.pt"]}


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["ddp", "zero3"])
def test_resume_on_fewer_ranks(model_dir, data_file, tmp_path, shard):
    out = str(tmp_path / "run")
    r = run(flags(model_dir, data_file, out, shard=shard, steps=2), launcher=TORCHRUN2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(flags(model_dir, data_file, out, shard=shard, steps=3),
            launcher=("torchrun", "--standalone", "--nproc_per_node=1", "train.py"))
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    r = run(flags(model_dir, data_file, out, shard="zero2" if shard == "ddp" else "ddp", steps=4))
    assert r.returncode != 0 and "resume it with that --shard" in r.stderr and "Loading weights" not in r.stderr


def two_nodes(args, cwds):
    """Two torchrun launchers ("nodes", one rank each) joined by c10d rendezvous, as on a cluster -> their results."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
           "--rdzv_id=test", os.path.join(ROOT, "train.py"), *args]
    nodes = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cwd in cwds]
    outputs = [n.communicate(timeout=300) for n in nodes]
    return [(n.returncode, *o) for n, o in zip(nodes, outputs)]


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous(model_dir, data_file, tmp_path):
    out = str(tmp_path / "2nodes")
    results = two_nodes(flags(model_dir, data_file, out, shard="zero3", steps=2), [ROOT, ROOT])
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-2000:] + results[1][2][-2000:]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert "2 ranks x 2 prompts" in results[0][1] + results[1][1]


def test_nodes_without_a_shared_out_stop_before_loading(model_dir, data_file, tmp_path):
    """A relative --out from two working directories: each "node" sees its own folder, as without a shared
    filesystem. Both stop with one line before loading a model, not at the first checkpoint."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for d in cwds:
        d.mkdir()
    results = two_nodes(flags(model_dir, data_file, "run", shard="zero3", steps=2), cwds)
    for rc, _, err in results:
        assert rc != 0 and "do not all see the same --out=run" in err and "Loading weights" not in err, err[-2000:]


def test_ranks_that_would_resume_from_different_steps_stop(tmp_path):
    """All ranks must resume from the same checkpoint (a network filesystem can list a directory stale on one node):
    check_shared_out exits every rank with one line instead of mixing the shards of two steps."""
    script = tmp_path / "check.py"
    script.write_text(f"""import sys, torch, torch.distributed as dist
sys.path.insert(0, {ROOT!r})
import distributed
dist.init_process_group("gloo")
rank = dist.get_rank()
distributed.check_shared_out({str(tmp_path)!r}, int(sys.argv[1]) * rank, rank == 0, torch.device("cpu"))
print("agreed")
dist.destroy_process_group()  # (left to interpreter exit, gloo aborted 1 run in ~5)
""")
    launcher = ("torchrun", "--standalone", "--nproc_per_node=2")
    r = run([str(script), "0"], launcher=launcher)
    assert r.returncode == 0 and r.stdout.count("agreed") == 2, r.stderr[-2000:]
    r = run([str(script), "5"], launcher=launcher)
    assert r.returncode != 0 and "different latest checkpoints" in r.stderr and "steps 0 to 5" in r.stderr
    assert "agreed" not in r.stdout


@pytest.mark.parametrize("tied", [False, True])
def test_inference_copy_computes_what_the_policy_does(tokenizer, tied):
    """The rollout's copy (distributed.inference_copy + copy_weights, one process): the same logits as the policy's
    model, tied input/output embeddings still one tensor (SmolLM2, Qwen2.5-0.5B/1.5B), and it follows an update."""
    from distributed import copy_weights, inference_copy
    from model import Policy
    lm = make_model(tokenizer, tie_word_embeddings=tied)
    copy, group = inference_copy(lm.config, torch.device("cpu"), torch.float32)
    assert group is None and not any(p.requires_grad for p in copy.parameters())
    ids = torch.tensor([tokenizer("What is 3 + 5?")["input_ids"]])
    for _ in range(2):
        copy_weights(Policy(lm), copy)
        assert (copy.lm_head.weight is copy.model.embed_tokens.weight) == tied
        with torch.no_grad():
            assert torch.equal(copy(ids).logits, lm(ids).logits)
            lm.model.embed_tokens.weight.add_(0.1)  # an "update": the next copy_weights must carry it
