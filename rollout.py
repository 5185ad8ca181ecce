"""Rollouts: prompt token ids in, sampled responses out.

    from rollout import generate
    ro = generate(model, prompt_ids, n=8, max_new_tokens=8192, temperature=1.0, top_p=1.0, stop_ids=[...], pad_id=0,
                  engine="drop")

Three engines behind one function, chosen by `engine=`; all sample from the same distribution, give the same greedy
outputs (in fp32; bf16 kernels that depend on the batch shape can flip near-ties) and return the same `Rollout`
(tests/test_engines.py). bench/rollout.py times them (BENCHMARKS.md); "drop", the fastest measured, is the default.
- "pad":  HF `model.generate` on left-padded prompts, the n samples of a prompt as n rows. Every row is decoded until
          the longest response ends, so with Zoo-like length spreads most decoded tokens are padding.
- "drop": our own decode loop over a transformers DynamicCache: each prompt is prefilled ONCE and its cache copied to
          its n rows, and a row leaves the batch (its cache rows are dropped) as soon as it emits a stop token.
- "cb":   HF continuous batching (`model.generate_batch`, paged KV cache, forked samples). Its log-probs are of the
          top_p-renormalised distribution, so return_logprobs needs top_p == 1 there. It runs in a background thread,
          where autocast (thread-local) does not reach: it decodes in the weights' own dtype.

Row order is prompt-major: rows g*n .. g*n+n-1 are the n samples of prompt g. A response is every generated token up to
and including the first stop token (the stop token is trained); everything after it is padding and masked out.
Sampling is exactly temperature/top_p (top_p as in HF: keep the most probable tokens until their mass reaches top_p):
the model's own generation_config (top_k, repetition_penalty, ... as shipped with e.g. Qwen2.5-Instruct) is replaced by
a neutral one for the call, so nothing else reshapes the distribution. temperature=0 means greedy. Log-probs
(return_logprobs) are log softmax(logits / T) of the sampled tokens over the whole vocabulary (T = 1 when greedy),
taken from the decode pass: what the training forward computes (train.py: token_logprobs).
"""
import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache, GenerationConfig, StoppingCriteria
from transformers.generation import ContinuousBatchingConfig  # where the 5.8-5.24 docs import it


@dataclass
class Rollout:
    prompt_ids: list[list[int]]   # B prompts (each repeated n times, prompt-major), unpadded
    response_ids: torch.Tensor    # (B, R) long, right-padded with pad_id; R = longest response in the batch
    response_mask: torch.Tensor   # (B, R) bool, True on response tokens (through the first stop token)
    lengths: torch.Tensor         # (B,) long, number of response tokens
    finish_reason: list[str]      # B x "stop" (emitted a stop token) | "length" (hit max_new_tokens)
    logprobs: torch.Tensor | None = None  # (B, R) log p(token) at the sampling temperature, from the decode pass

    def rows(self, i):
        """The Rollout of rows i (a slice)."""
        return Rollout(self.prompt_ids[i], self.response_ids[i], self.response_mask[i], self.lengths[i],
                       self.finish_reason[i], None if self.logprobs is None else self.logprobs[i])


class _Progress(StoppingCriteria):
    """Never stops anything: ticks a progress bar once per decode step."""

    def __init__(self, total, enabled):
        self.bar = tqdm(total=total, desc="rollout", unit="tok", leave=False, disable=not enabled)

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def stop_token_ids(tokenizer, extra_words=(), model_eos=None):
    """EOS plus the ChatML/GPT end tokens that exist in this vocabulary, plus single-token stop words (abel template),
    plus model_eos: the model's generation_config.eos_token_id (an int, a list or None), on which vLLM stops too
    (for Qwen2.5 it is the tokenizer's EOS; Llama-3.1-Instruct adds <|eom_id|> and <|eot_id|>)."""
    ids, vocab = {tokenizer.eos_token_id}, tokenizer.get_vocab()
    ids.update([model_eos] if isinstance(model_eos, int) else model_eos or [])
    for tok in ["<|im_end|>", "<|endoftext|>", "</s>", *extra_words]:
        if tok in vocab:  # (not `id != unk_token_id`: SmolLM2's unk IS <|endoftext|>)
            ids.add(tokenizer.convert_tokens_to_ids(tok))
    return sorted(i for i in ids if i is not None)


def response_mask(tokens, stop_ids):
    """tokens (B, R) -> (mask (B, R) bool through the first stop token, lengths (B,), stopped (B,) bool)."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))  # (B, R)
    stopped = is_stop.any(1)  # (B,)
    first = torch.where(stopped, is_stop.int().argmax(1), tokens.shape[1] - 1)  # (B,) index of the last kept token
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= first[:, None]  # (B, R)
    return mask, first + 1, stopped


def left_pad(prompt_ids, pad_id):
    """B token-id lists -> ids (B, P) left-padded with pad_id, attention mask (B, P) long (0 on padding)."""
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)  # (B, P)
    attn = torch.zeros((len(prompt_ids), P), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    return ids, attn


def sample(logits, temperature, top_p):
    """logits (b, V) -> tokens (b,) drawn from softmax(logits / T) cut to the top_p nucleus; argmax when T == 0."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)  # (b, V)
    if top_p < 1:  # drop a token when the tokens more probable than it already hold top_p of the mass
        p, order = probs.sort(-1, descending=True)  # (b, V)
        probs = probs.scatter(-1, order, p.masked_fill(p.cumsum(-1) - p >= top_p, 0))
    return torch.multinomial(probs, 1).squeeze(1)  # (b,)


@contextlib.contextmanager
def _neutral_generation_config(model):
    """Swap in an empty GenerationConfig so no default of the model's (top_k=20, repetition_penalty, ...) applies."""
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _generate_pad(model, prompts, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs, bar):
    """HF generate over B = B0*n left-padded rows -> tokens (B, R), logprobs (B, R) or None."""
    device = next(model.parameters()).device
    ids, attn = left_pad([p for p in prompts for _ in range(n)], pad_id)  # (B, P) prompt-major rows
    greedy = temperature == 0
    config = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None if greedy else 0, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
        use_cache=True, return_dict_in_generate=True, output_logits=return_logprobs)
    with _neutral_generation_config(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config,
                             stopping_criteria=[bar])
    tokens = out.sequences[:, ids.shape[1]:]  # (B, R)
    if not return_logprobs:
        return tokens.cpu(), None
    T = 1.0 if greedy else temperature
    logprobs = torch.stack([(z.float() / T).log_softmax(-1).gather(1, tokens[:, t, None]).squeeze(1)
                            for t, z in enumerate(out.logits)], 1)  # (B, R)
    return tokens.cpu(), logprobs.cpu()


def _generate_drop(model, prompts, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs, bar,
                   tp_group=None):
    """Own decode loop: prefill B0 prompts once, repeat their cache to B = B0*n rows, drop rows as they stop.
    -> tokens (B, R) right-padded with pad_id, logprobs (B, R) or None. With tp_group, the ranks of a tensor-parallel
    model decode the same batch together, and every rank takes the tokens its group's first rank sampled."""
    device = next(model.parameters()).device
    ids, attn = (x.to(device) for x in left_pad(prompts, pad_id))  # (B0, P)
    cache = DynamicCache(config=model.config)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 renamed it
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # (B0, P) positions count real tokens only (left padding)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, **{name: cache}, use_cache=True,
                   logits_to_keep=1).logits[:, -1].float()  # (B0, V)
    cache.batch_repeat_interleave(n)  # B0 -> B rows, prompt-major
    logits, attn = logits.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)  # (B, V), (B, P)
    B = len(prompts) * n
    rows = torch.arange(B, device=device)  # (b,) the Rollout row of each live row
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, max_new_tokens)
    logprobs = torch.zeros((B, max_new_tokens), device=device) if return_logprobs else None
    stop = torch.tensor(stop_ids, device=device)
    for t in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p)  # (b,)
        if tp_group is not None:  # one draw per group, so its ranks never disagree on which rows are still live
            torch.distributed.broadcast(nxt, torch.distributed.get_global_rank(tp_group, 0), group=tp_group)
        tokens[rows, t] = nxt
        if return_logprobs:
            z = logits / (temperature or 1.0)  # (b, V)
            logprobs[rows, t] = z.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
        bar.update(1)
        live = ~torch.isin(nxt, stop)  # (b,)
        if t == max_new_tokens - 1 or not live.any():
            break
        if not live.all():  # drop the rows that just stopped from the cache and the running tensors
            keep = live.nonzero().squeeze(1)  # (b',)
            cache.batch_select_indices(keep)
            rows, nxt, attn = rows[keep], nxt[keep], attn[keep]
        attn = torch.cat([attn, attn.new_ones(len(rows), 1)], 1)  # (b, P + t + 1)
        logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=attn.sum(1, keepdim=True) - 1,
                       **{name: cache}, use_cache=True).logits[:, -1].float()  # (b, V)
    R = t + 1  # decode steps = longest response
    return tokens[:, :R].cpu(), None if logprobs is None else logprobs[:, :R].cpu()


def _generate_cb(model, prompts, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs, bar,
                 memory=0.0):
    """HF continuous batching -> tokens (B, R) right-padded with pad_id, logprobs (B, R) or None.
    Its sampler applies exactly the warpers _get_logits_processor builds from our config (temperature if != 1, top_p
    if < 1; do_sample must be set, None means greedy there) and samples softmax of the result; its log-probs are
    log of that softmax, so with top_p < 1 they are renormalised over the nucleus (not what training computes)."""
    if return_logprobs and top_p < 1:
        raise ValueError("engine='cb' returns log-probs of the top_p-renormalised distribution; use top_p=1 or "
                         "engine='drop'/'pad' with return_logprobs")
    greedy = temperature == 0
    rows = [p for p in prompts for _ in range(n)]  # prompt-major
    config = GenerationConfig(  # greedy forbids num_return_sequences > 1: repeat the prompt instead
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None if greedy else 0, max_new_tokens=max_new_tokens, num_return_sequences=1 if greedy else n,
        eos_token_id=list(stop_ids), pad_token_id=pad_id)
    # Paged KV cache: `memory` of the free GPU memory (0: HF's default). Without flash-attn (sdpa) HF packs the batch
    # into one sequence under a dense (max_batch_tokens, cache tokens) mask: each query scores every key of the batch.
    # On CPU (where HF would take 60% of RAM) we size it for this batch instead: every row at full length in pages of
    # 32 tokens, and max_batch_tokens cut so the mask stays under 2^26 entries (the default took 18 s to fill on 2
    # cores).
    # With flash-attn HF captures CUDA graphs; not across FSDP's per-layer hooks (zero2/zero3: they sync streams).
    from torch.distributed.fsdp import FSDPModule
    fsdp = any(isinstance(m, FSDPModule) for m in model.modules())
    cache = ContinuousBatchingConfig(return_logprobs=return_logprobs, max_memory_percent=memory or None,
                                     use_cuda_graph=False if fsdp else None)
    if next(model.parameters()).device.type == "cpu":
        cache.page_size = 32
        cache.num_blocks = len(rows) * -(-(max(map(len, prompts)) + max_new_tokens) // cache.page_size)
        cache.max_batch_tokens = max(64, min(8192, 2 ** 26 // (cache.num_blocks * cache.page_size)))
    training = model.training
    with _neutral_generation_config(model):
        out = model.generate_batch(rows if greedy else prompts, generation_config=config,
                                   continuous_batching_config=cache, progress_bar=not bar.disable)
    model.train(training)  # generate_batch leaves the model in eval mode
    # generate_batch logs failed or missing requests instead of raising; it lists a prompt's samples in input order
    results = list(out.values())
    if len(results) != len(rows) or any(r.error or r.prompt_ids != p for r, p in zip(results, rows)):
        raise RuntimeError(f"generate_batch returned {len(results)}/{len(rows)} complete requests in prompt order")
    R = max(len(r.generated_tokens) for r in results)
    tokens = torch.full((len(rows), R), pad_id, dtype=torch.long)  # (B, R)
    logprobs = torch.zeros((len(rows), R)) if return_logprobs else None  # (B, R)
    for i, r in enumerate(results):
        tokens[i, :len(r.generated_tokens)] = torch.tensor(r.generated_tokens)
        if return_logprobs:
            logprobs[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    return tokens, logprobs


@torch.no_grad()
def generate(model, prompt_ids, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs=False,
             progress=False, engine="drop", max_prompts=0, tp_group=None, cb_memory=0.0):
    """prompt_ids: list of B0 token-id lists. Returns a Rollout with B = B0 * n rows (prompt-major).
    engine: "drop" (default: the fastest measured, BENCHMARKS.md) | "pad" | "cb" (see the file docstring).
    max_prompts > 0 generates in chunks of that many prompts (bounds the KV cache; bench/memory.py sizes it).
    tp_group: the process group of a tensor-parallel model (distributed.tensor_parallel_copy). Its ranks decode the prompts
    of all of them together, as one batch, and each gets the rows of its own prompts. Engine "drop" only.
    cb_memory: engine "cb" on GPU: the fraction of free GPU memory its paged KV cache takes (0: HF's default, 0.9,
    or 0.8 when temperature/top_p processors run)."""
    if engine not in ("pad", "drop", "cb"):
        raise ValueError(f"engine={engine!r}: expected 'pad', 'drop' or 'cb'")
    if tp_group is not None and engine != "drop":
        raise ValueError("a tensor-parallel model (tp_group) generates with engine='drop' only")
    if min(n, max_new_tokens) < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    own = slice(0, len(prompt_ids) * n)  # the caller's rows
    if tp_group is not None:
        pooled = [None] * torch.distributed.get_world_size(tp_group)
        torch.distributed.all_gather_object(pooled, prompt_ids, group=tp_group)
        before = sum(map(len, pooled[:torch.distributed.get_rank(tp_group)]))
        own = slice(before * n, (before + len(prompt_ids)) * n)
        prompt_ids = sum(pooled, [])
    chunk = max_prompts or len(prompt_ids)
    chunks = [prompt_ids[i:i + chunk] for i in range(0, len(prompt_ids), chunk)]
    bar = _Progress(max_new_tokens * len(chunks), progress)
    outs = []  # (tokens (b, R_c), logprobs (b, R_c) or None) per chunk
    try:
        for c in chunks:
            args = (model, c, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs)
            if engine == "drop":
                outs.append(_generate_drop(*args, bar.bar, tp_group))
            elif engine == "pad":
                outs.append(_generate_pad(*args, bar))
            else:
                outs.append(_generate_cb(*args, bar.bar, cb_memory))
    finally:
        bar.bar.close()
    R = max(t.shape[1] for t, _ in outs)
    tokens = torch.cat([F.pad(t, (0, R - t.shape[1]), value=pad_id) for t, _ in outs])  # (B, R)
    logprobs = None if not return_logprobs else torch.cat([F.pad(l, (0, R - l.shape[1])) for _, l in outs])
    mask, lengths, stopped = response_mask(tokens, stop_ids)
    return Rollout(
        prompt_ids=[p for p in prompt_ids for _ in range(n)], response_ids=tokens.masked_fill(~mask, pad_id),
        response_mask=mask, lengths=lengths, finish_reason=["stop" if s else "length" for s in stopped.tolist()],
        logprobs=None if logprobs is None else logprobs * mask).rows(own)
