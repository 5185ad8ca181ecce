"""rollout.py: decode log-probs == training forward log-probs, prompt-major rows, stop-token masking."""
import pytest
import torch

import reward
from conftest import make_model
from rollout import generate, response_mask, stop_token_ids
from model import Policy
from train import Samples, sequence_logprobs


def test_decode_logprobs_equal_training_forward(tokenizer):
    model = make_model(tokenizer).eval()
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 3 + 5?", "1 2", "Let's think step by step. 7 + 2 ="]]
    torch.manual_seed(0)
    T = 0.8
    ro = generate(model, prompts, n=3, max_new_tokens=12, temperature=T, top_p=1.0, stop_ids=[0, 2],
                  pad_id=tokenizer.pad_token_id, return_logprobs=True)
    assert ro.response_ids.shape[0] == 9 and ro.prompt_ids[3] == prompts[1]  # prompt-major: rows 3..5 = prompt 1
    s = Samples(seqs=[torch.cat([torch.tensor(p), r[m]]) for p, r, m in
                      zip(ro.prompt_ids, ro.response_ids, ro.response_mask)],
                prompt_lens=[len(p) for p in ro.prompt_ids], adv=torch.zeros(9), keep=torch.ones(9, dtype=torch.bool),
                old_logp=[None] * 9, ref_logp=[None] * 9, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = sequence_logprobs(Policy(model), s, list(range(9)), T, torch.device("cpu"))
    decode = ro.logprobs[ro.response_mask]  # (N,) row-major = the same order
    assert logp.shape == decode.shape and len(logp) == int(ro.lengths.sum())
    assert torch.allclose(logp, decode, atol=1e-5), (logp - decode).abs().max()


def test_samples_of_a_prompt_differ_and_lengths_are_consistent(tokenizer):
    model = make_model(tokenizer).eval()
    torch.manual_seed(1)
    ro = generate(model, [tokenizer("1 2 3")["input_ids"]], n=4, max_new_tokens=10, temperature=1.0, top_p=1.0,
                  stop_ids=[0], pad_id=0)
    assert len({tuple(r.tolist()) for r in ro.response_ids}) > 1
    assert torch.equal(ro.response_mask.sum(1), ro.lengths)
    for r, m, reason, n in zip(ro.response_ids, ro.response_mask, ro.finish_reason, ro.lengths):
        assert reason == ("stop" if r[n - 1] == 0 else "length")
        assert (r[~m] == 0).all()


def test_greedy_is_deterministic(tokenizer):
    model = make_model(tokenizer).eval()
    p = [tokenizer("7 + 2 =")["input_ids"]]
    a = generate(model, p, n=2, max_new_tokens=8, temperature=0, top_p=1.0, stop_ids=[0], pad_id=0)
    torch.manual_seed(123)
    b = generate(model, p, n=2, max_new_tokens=8, temperature=0, top_p=1.0, stop_ids=[0], pad_id=0)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_ids[0], a.response_ids[1])
    x = torch.tensor([p[0]])  # (1, T)
    with torch.no_grad():  # greedy == argmax of a plain forward, token by token
        for t in range(int(a.lengths[0])):
            nxt = model(x).logits[0, -1].argmax()
            assert nxt == a.response_ids[0, t]
            x = torch.cat([x, nxt.view(1, 1)], 1)


def test_response_mask_keeps_first_stop_token():
    tokens = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 9, 9, 9, 9]])
    mask, lengths, stopped = response_mask(tokens, [2])
    assert lengths.tolist() == [3, 5, 1] and stopped.tolist() == [True, False, True]
    assert mask.tolist()[0] == [True, True, True, False, False]


def test_stop_token_ids(tokenizer):
    ends = reward.STOP_STRINGS
    ids = stop_token_ids(tokenizer, ends)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids and tokenizer.eos_token_id in ids
    # SmolLM2's tokenizer: <|im_end|> is EOS and <|endoftext|> doubles as the unknown token; it still stops
    from transformers import PreTrainedTokenizerFast
    smol = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    assert smol.convert_tokens_to_ids("<|endoftext|>") in stop_token_ids(smol, ends)
    assert "</s>" not in smol.get_vocab() and len(stop_token_ids(smol, ends)) == 2  # an end string it lacks: skipped
    with pytest.raises(ValueError, match="'<|nonexistent|>' is not one token"):  # a stop word it lacks: refused
        stop_token_ids(smol, ends, ["<|nonexistent|>"])
    assert stop_token_ids(smol, ends, ["<|im_start|>"]) == sorted({*stop_token_ids(smol, ends),
                                                                   smol.convert_tokens_to_ids("<|im_start|>")})
    # the model's generation_config.eos_token_id (int or list) stops too, as in vLLM
    assert stop_token_ids(tokenizer, ends, model_eos=[7, 9]) == sorted({*ids, 7, 9})
    assert stop_token_ids(tokenizer, ends, model_eos=11) == sorted({*ids, 11})
    assert stop_token_ids(tokenizer, ends, model_eos=None) == ids


def test_chunked_generation_equals_one_call(tokenizer):
    """max_prompts splits a pad rollout into generate calls (KV budget); greedy rows are the same as one call of
    the default engine ("slots")."""
    model = make_model(tokenizer).eval()
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 3 + 5?", "1 2", "7 + 2 =", "0"]]
    args = dict(n=2, max_new_tokens=8, temperature=0, top_p=1.0, stop_ids=[0, 5], pad_id=0)
    whole, parts = generate(model, prompts, **args), generate(model, prompts, **args, engine="pad", max_prompts=3)
    assert torch.equal(whole.response_ids, parts.response_ids) and torch.equal(whole.lengths, parts.lengths)
    assert whole.finish_reason == parts.finish_reason and parts.prompt_ids == whole.prompt_ids


def test_a_limit_per_prompt_equals_each_prompt_alone(tokenizer):
    """max_new_tokens as one limit per prompt (eval.py: each prompt's room in the context): every row equals that
    prompt decoded alone with its own limit (tokens, mask, finish reason, log-probs), also where the pad id is a stop
    token (so the padding after a row's limit must not read as a stop)."""
    model = make_model(tokenizer).eval()
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 3 + 5?", "0 1 2 3 4 5 6 7 8", "Hi"]]
    limits, never = [3, 7, 1], len(tokenizer)  # a stop id no model emits: every row runs to its limit
    for pad_id in (0, never):
        args = dict(n=2, temperature=0, top_p=1.0, stop_ids=[never], pad_id=pad_id, return_logprobs=True)
        together = generate(model, prompts, max_new_tokens=limits, **args)
        assert together.lengths.tolist() == [3, 3, 7, 7, 1, 1] and set(together.finish_reason) == {"length"}
        for k, (p, limit) in enumerate(zip(prompts, limits)):
            alone, rows = generate(model, [p], max_new_tokens=limit, **args), slice(2 * k, 2 * k + 2)
            R = alone.response_ids.shape[1]
            assert torch.equal(together.response_ids[rows, :R], alone.response_ids)
            assert not together.response_mask[rows, R:].any() and torch.equal(together.lengths[rows], alone.lengths)
            assert torch.allclose(together.logprobs[rows, :R], alone.logprobs)
    with pytest.raises(ValueError, match="engine='slots' and one limit per prompt"):
        generate(model, prompts, max_new_tokens=limits, engine="pad", **args)
