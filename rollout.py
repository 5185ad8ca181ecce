"""Rollouts: prompt token ids in, sampled responses out.

    from rollout import generate
    ro = generate(model, prompt_ids, n=8, max_new_tokens=8192, temperature=1.0, top_p=1.0, stop_ids=[...], pad_id=0)

One function, `generate`, is the whole engine: HF `model.generate` on left-padded prompts with a KV cache and
the n samples of a prompt
as n rows. A faster engine replaces this function and keeps the `Rollout` it returns.

Row order is prompt-major: rows g*n .. g*n+n-1 are the n samples of prompt g. A response is every generated token up to
and including the first stop token (the stop token is trained); everything after it is padding and masked out.
Sampling is exactly temperature/top_p: the model's own generation_config (top_k, repetition_penalty, ... as shipped
with e.g. Qwen2.5-Instruct) is replaced by a neutral one for the call, so nothing else reshapes the distribution.
temperature=0 means greedy.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import GenerationConfig, StoppingCriteria


@dataclass
class Rollout:
    prompt_ids: list[list[int]]   # B prompts (each repeated n times, prompt-major), unpadded
    response_ids: torch.Tensor    # (B, R) long, right-padded with pad_id; R = longest response in the batch
    response_mask: torch.Tensor   # (B, R) bool, True on response tokens (through the first stop token)
    lengths: torch.Tensor         # (B,) long, number of response tokens
    finish_reason: list[str]      # B x "stop" (emitted a stop token) | "length" (hit max_new_tokens)
    logprobs: torch.Tensor | None = None  # (B, R) log p(token) at the sampling temperature, from the decode pass


class _Progress(StoppingCriteria):
    """Never stops anything: ticks a progress bar once per decode step."""

    def __init__(self, total, enabled):
        self.bar = tqdm(total=total, desc="rollout", unit="tok", leave=False, disable=not enabled)

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def stop_token_ids(tokenizer, extra_words=()):
    """EOS plus the ChatML/GPT end tokens that exist in this vocabulary, plus single-token stop words (abel template)."""
    ids = {tokenizer.eos_token_id}
    for tok in ["<|im_end|>", "<|endoftext|>", "</s>", *extra_words]:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is not None and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def response_mask(tokens, stop_ids):
    """tokens (B, R) -> (mask (B, R) bool through the first stop token, lengths (B,), stopped (B,) bool)."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))  # (B, R)
    stopped = is_stop.any(1)  # (B,)
    first = torch.where(stopped, is_stop.int().argmax(1), tokens.shape[1] - 1)  # (B,) index of the last kept token
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= first[:, None]  # (B, R)
    return mask, first + 1, stopped


@torch.no_grad()
def generate(model, prompt_ids, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs=False,
             progress=False):
    """prompt_ids: list of B0 token-id lists. Returns a Rollout with B = B0 * n rows (prompt-major)."""
    device = next(model.parameters()).device
    prompt_ids = [p for p in prompt_ids for _ in range(n)]  # prompt-major rows
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)  # (B, P) left-padded
    attn = torch.zeros((len(prompt_ids), P), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    greedy = temperature == 0
    config = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=0,
        max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
        use_cache=True, return_dict_in_generate=True, output_logits=return_logprobs)
    bar = _Progress(max_new_tokens, progress)
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config,
                             stopping_criteria=[bar])
    finally:
        model.generation_config = saved
        bar.bar.close()
    tokens = out.sequences[:, P:].cpu()  # (B, R)
    mask, lengths, stopped = response_mask(tokens, stop_ids)
    tokens = tokens.masked_fill(~mask, pad_id)
    logprobs = None
    if return_logprobs:
        logits = torch.stack(out.logits, 1).float().cpu()  # (B, R, V) raw logits of each decode step
        logits = logits / (1.0 if greedy else temperature)
        logprobs = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1) * mask  # (B, R)
    return Rollout(
        prompt_ids=prompt_ids, response_ids=tokens, response_mask=mask,
        lengths=lengths, finish_reason=["stop" if s else "length" for s in stopped.tolist()], logprobs=logprobs)
