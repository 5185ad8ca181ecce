"""model.py's load path on model families other than the Qwen2 of most tests: models that post-process their logits
are refused (Policy applies lm_head alone), a model class without sdpa loads with eager attention, and a Llama (tied
embeddings, a BOS-prepending tokenizer) trains, with an inference copy whose lm_head is its embedding."""
import glob
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import GptOssConfig, GptOssForCausalLM, GraniteConfig, GraniteForCausalLM

import distributed
import train
from conftest import make_llama_tokenizer, make_model
from model import Policy, load_lm, load_models

CPU = torch.device("cpu")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def forward_logprobs(lm, ids):
    """The model's own forward: log softmax of its logits at every position but the last, of the next token."""
    return lm(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)


def test_models_that_scale_their_logits_are_refused_before_loading(tokenizer, tmp_path):
    """A tiny Granite with logits_scaling=8: Policy's log-probs are not the model's (the reason), and load_lm exits
    with one line from the config alone (the weights file is gone); with logits_scaling=1 it loads and they agree."""
    ids = torch.tensor([tokenizer("What is 3 + 5? The answer is")["input_ids"]])  # (1, L)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, -1] = False  # (1, L) every position but the last predicts a token
    for scaling in (8.0, 1.0):
        torch.manual_seed(0)
        lm = GraniteForCausalLM(GraniteConfig(vocab_size=len(tokenizer), logits_scaling=scaling, **TINY)).eval()
        with torch.no_grad():
            logp, _ = Policy(lm)(ids, mask, 1.0)  # (L - 1,)
            full = forward_logprobs(lm, ids)  # (L - 1,)
        assert torch.allclose(logp, full, atol=1e-5) == (scaling == 1.0)
        folder = tmp_path / f"granite_{scaling:g}"
        lm.save_pretrained(folder)
        cfg = train.Config(model=str(folder))
        if scaling == 1.0:
            assert torch.allclose(forward_logprobs(load_lm(str(folder), cfg, CPU), ids), full, atol=1e-5)
            continue
        os.remove(folder / "model.safetensors")
        with pytest.raises(SystemExit, match=r"^error: .*\(granite\) changes its logits after lm_head "
                                             r"\(logits_scaling=8.0\)") as err:
            load_lm(str(folder), cfg, CPU)
        assert "\n" not in str(err.value)


def test_model_class_without_sdpa_loads_with_eager_attention(tmp_path, capsys):
    """GptOss declares _supports_sdpa = False (transformers 5.17 and 5.25), and from_pretrained raises when asked for
    sdpa: load_lm falls back to eager, with one line saying so, and the loaded model runs."""
    assert not GptOssForCausalLM._supports_sdpa
    torch.manual_seed(0)
    GptOssForCausalLM(GptOssConfig(vocab_size=300, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                   **{**TINY, "intermediate_size": 64})).save_pretrained(tmp_path)
    lm = load_lm(str(tmp_path), train.Config(model=str(tmp_path)), CPU)
    assert lm.config._attn_implementation == "eager"
    assert "GptOssForCausalLM has no sdpa attention" in capsys.readouterr().err
    assert lm(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 300)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    tok = make_llama_tokenizer()
    folder = tmp_path_factory.mktemp("llama")
    make_model(tok, arch="llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_llama_inference_copy_is_tied_and_generates_the_policy(llama_dir):
    """load_models on a tied Llama: the policy and its inference copy each have one embedding matrix as lm_head,
    and after copy_weights (and a change of the policy's embedding) the copy's logits are the policy's."""
    cfg = train.Config(model=llama_dir, kl_coef=0.0, shard="ddp", grad_ckpt=False)
    models = load_models(cfg, None, CPU, True, 0, 1)
    for lm in (models.lm, models.rollout_lm):
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    with torch.no_grad():
        models.lm.get_input_embeddings().weight.mul_(2)
    distributed.copy_weights(models.policy, models.rollout_lm)
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        assert torch.allclose(models.rollout_lm(input_ids=ids).logits, models.lm(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
def test_llama_trains_and_saves_one_embedding(llama_dir, tmp_path):
    """Two zero3 steps on the Llama with its chat template (<s>[INST] ... [/INST]): prompts hold one <s>, the steps run,
    and the export keeps the embeddings tied (lm_head not saved apart) and loads with the trained embedding."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + 3?", "answer": str(a + 3)}) + "\n"
                            for a in range(8)))
    out = str(tmp_path / "run")
    argv = [f"--{k}={v}" for k, v in dict(
        model=llama_dir, data=str(data), template="chat", prompts_per_step=2, samples_per_prompt=4,
        max_prompt_len=64, max_response_len=8, lr=1e-3, kl_coef=1e-3, mini_batches=1, micro_batch_tokens=400,
        grad_ckpt="false", steps=2, save_every=2, out=out, shard="zero3").items()]
    run = train.prepare(train.parse_config(argv), 0, 1)
    assert all(p.count(run.tokenizer.bos_token_id) == 1 and p[0] == run.tokenizer.bos_token_id for p in run.prompt_ids)
    train.main(argv)
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in steps] == [1, 2] and all(m["reward"] == m["reward"] for m in steps)
    export = os.path.join(out, "step_000002", "model")
    saved = set()
    for name in glob.glob(os.path.join(export, "*.safetensors")):
        with safe_open(name, "pt") as f:
            saved |= set(f.keys())
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved
    lm = load_lm(export, train.Config(model=export), CPU)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert lm.get_input_embeddings().weight.ne(make_model(run.tokenizer, arch="llama").model.embed_tokens.weight).any()
