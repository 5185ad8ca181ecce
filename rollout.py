"""Rollouts: prompt token ids in, sampled responses out.

    from rollout import generate
    ro = generate(model, prompt_ids, n=8, max_new_tokens=8192, temperature=1.0, top_p=1.0, stop_ids=[...], pad_id=0)

Two engines behind one function, chosen by `engine=`; both sample from the same distribution, give the same greedy
outputs (in fp32; bf16 kernels that depend on the batch shape can flip near-ties) and return the same `Rollout`
(tests/test_engines.py). bench/rollout.py times them (BENCHMARKS.md); "slots" is the default. (Engine "cb", HF
continuous batching, was removed: on transformers 5.17 its num_return_sequences returns only the parent requests, and
on CPU it was 2.4x slower than "slots"; bench/ keeps a comparison.)
- "pad":   HF `model.generate` on left-padded prompts, the n samples of a prompt as n rows: the reference. Every row is
           decoded until the longest response ends, so with Zoo-like length spreads most decoded tokens are padding.
- "slots": all prompts in one call on S KV-cache slots (`slots=`, or as many as fit in the free GPU memory): a prompt
           is prefilled ONCE into G = n free slots (the prompts admitted together are packed into one prefill
           forward), a row frees its slot when it ends and the next prompt takes the freed slots, so no row waits
           for another. The cache is static, (layers, 2, S, longest prompt +
           max_new_tokens, KV heads, head dim), written in place by our attention function ("slots", registered with
           transformers' AttentionInterface and selected with the model's own setter for the call), which reads only
           each slot's own length on CUDA (flash-attn's flash_attn_with_kvcache, else torch's varlen flash kernel with
           seqused_k) and masked SDPA on CPU/fp32. The decode step has fixed shapes and no host sync (stop flags are
           read every SYNC_EVERY steps), so on CUDA it is captured once per batch size and replayed as a CUDA graph
           (COMPILE: torch.compile'd first). Under a tensor-parallel group (--gen_tp) it runs eagerly: a captured NCCL
           collective needs every rank to capture and replay the same graphs in step, untestable on the one GPU lent
           to us; bench/ measures eager against graph step time, which bounds the cost. Sliding-window models are
           refused (full causal attention only). generate(stats=) reports the schedule, its timing and on GPU the
           decode roofline (_generate_slots).

Row order is prompt-major: rows g*n .. g*n+n-1 are the n samples of prompt g. A response is every generated token up to
and including the first stop token (the stop token is trained); everything after it is padding and masked out.
Sampling is exactly temperature/top_p (top_p as in HF: keep the most probable tokens until their mass reaches top_p):
the model's own generation_config (top_k, repetition_penalty, ... as shipped with e.g. Qwen2.5-Instruct) is replaced by
a neutral one for the call, so nothing else reshapes the distribution. temperature=0 means greedy. Log-probs
(return_logprobs) are log softmax(logits / T) of the sampled tokens over the whole vocabulary (T = 1 when greedy),
taken from the decode pass: what the training forward computes (model.py: token_logprobs).
"""
import contextlib
import functools
import importlib.util
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface, GenerationConfig, StoppingCriteria


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


def group_rows(ro, j, G):
    """Group j's G rows of a Rollout as a Rollout of their own: tensors copied (a view would pickle the whole
    batch's storage) and cut to the group's longest response."""
    r = ro.rows(slice(j * G, (j + 1) * G))
    cut = lambda t: None if t is None else t[:, :int(r.lengths.max())].clone()  # (G, R_j)
    return Rollout(r.prompt_ids, cut(r.response_ids), cut(r.response_mask), r.lengths.clone(), r.finish_reason,
                   cut(r.logprobs))


def cat_rollouts(parts, pad_id):
    """Rollouts -> one, rows in order, responses right-padded to the longest (pad_id; mask False; logprobs 0)."""
    R = max(p.response_ids.shape[1] for p in parts)
    pad = lambda t, v: torch.cat([t, t.new_full((t.shape[0], R - t.shape[1]), v)], 1)  # (b, R)
    return Rollout([x for p in parts for x in p.prompt_ids], torch.cat([pad(p.response_ids, pad_id) for p in parts]),
                   torch.cat([pad(p.response_mask, False) for p in parts]), torch.cat([p.lengths for p in parts]),
                   [x for p in parts for x in p.finish_reason],
                   None if parts[0].logprobs is None else torch.cat([pad(p.logprobs, 0.0) for p in parts]))


class _Progress(StoppingCriteria):
    """Never stops anything: ticks a progress bar once per decode step (HF generate calls it)."""

    def __init__(self, total, enabled, unit):
        self.bar = tqdm(total=total, desc="rollout", unit=unit, leave=False, disable=not enabled)

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def stop_token_ids(tokenizer, end_strings, stop_words=(), model_eos=None):
    """The ids a rollout stops on: EOS; each of end_strings (reward.STOP_STRINGS: <|im_end|>, <|endoftext|>, </s>)
    that is one token of this vocabulary; each of stop_words (the template's: data.Template.stop_words), which must
    be one token (ValueError otherwise: the engines stop on token ids, so a longer word would never stop a response;
    data.load_template refuses such a template before any model loads); and model_eos: the model's
    generation_config.eos_token_id (an int, a list or None), on which vLLM stops too (for Qwen2.5 it is the
    tokenizer's EOS; Llama-3.1-Instruct adds <|eom_id|> and <|eot_id|>)."""
    ids, vocab = {tokenizer.eos_token_id}, tokenizer.get_vocab()
    ids.update([model_eos] if isinstance(model_eos, int) else model_eos or [])
    for word in stop_words:
        if word not in vocab:
            raise ValueError(f"stop word {word!r} is not one token of this tokenizer; the rollout stops on token ids")
    for tok in [*end_strings, *stop_words]:
        if tok in vocab:  # (not `id != unk_token_id`: SmolLM2's unk IS <|endoftext|>)
            ids.add(tokenizer.convert_tokens_to_ids(tok))
    return sorted(i for i in ids if i is not None)


def response_mask(tokens, stop_ids, limits=None):
    """tokens (B, R) -> (mask (B, R) bool through the first stop token, lengths (B,), stopped (B,) bool).
    limits (B,): each row's max_new_tokens, where rows have their own (what follows is padding, whatever its id)."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))  # (B, R)
    last = torch.full((len(tokens),), tokens.shape[1] - 1, device=tokens.device) if limits is None else limits - 1
    is_stop &= torch.arange(tokens.shape[1], device=tokens.device) <= last[:, None]
    stopped = is_stop.any(1)  # (B,)
    first = torch.where(stopped, is_stop.int().argmax(1), last)  # (B,) index of the last kept token
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
    """logits (b, V) -> tokens (b,) drawn from softmax(logits / T) cut to the top_p nucleus; argmax when T == 0.
    The draw is the exponential race argmax(probs / E), E_i = -log U_i ~ Exp(1): E_i / p_i ~ Exp(p_i), and the
    smallest of independent exponential clocks is clock i with probability p_i / sum(p). Unlike torch.multinomial
    (which checks its input with a host sync) it is a few elementwise ops: capturable in a CUDA graph. U is float64:
    a float32 U (steps of 2^-24) cannot give the E < 6e-8 that a token of probability ~1e-8 needs to beat a likely
    one, which would cut the vocabulary's tail. U in [0, 1): E > 0, so a zero-probability token scores 0 and never
    wins (U = 0 gives E = inf: the token scores 0, a 2^-53 event)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)  # (b, V)
    if top_p < 1:  # drop a token when the tokens more probable than it already hold top_p of the mass
        p, order = probs.sort(-1, descending=True)  # (b, V)
        probs = probs.scatter(-1, order, p.masked_fill(p.cumsum(-1) - p >= top_p, 0))
    return (probs / torch.rand_like(probs, dtype=torch.float64).log_().neg_()).argmax(-1)  # (b,)


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


# -----------------------------------------------------------------------------
# Engine "slots": a static KV cache of S slots kept busy, and a decode step without host syncs (a CUDA graph on GPU).

SYNC_EVERY = dict(cuda=8, cpu=1)  # decode steps between two reads of the stop flags (one host sync each); by device
CUDA_GRAPHS = True                # capture the decode step as CUDA graphs where it can be (False: eager, to compare)
COMPILE = False                   # torch.compile the decode step before capture (True: inductor; a string: that backend)
PREFILL_TOKENS = dict(cuda=8192, cpu=1024)  # prompt tokens packed in one prefill forward at most (a longer prompt
                                            # goes alone); by device (CPU: its SDPA mask is N x N)
GPU_PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}  # by device name: HBM
                                  # bytes/s and dense bf16 FLOP/s (SXM parts), for the decode roofline; others: None


@functools.cache
def _capture_stream(device):
    """The one side stream on which this process warms up and captures every decode graph: a stream per captured
    shape would cost each its own cuBLAS workspace."""
    return torch.cuda.Stream(device)


def _import_flash_attn_with_kvcache():
    """flash_attn.flash_attn_with_kvcache where flash-attn imports, else None (then torch's own flash kernel)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_with_kvcache
        return flash_attn_with_kvcache
    except (ImportError, OSError):
        return None


# Resolved once, at import: torch.compile (COMPILE) cannot trace an import inside the decode step (on the H200 without
# flash-attn, dynamo stopped at `from flash_attn import ...` with "Import failure").
FLASH_ATTN_WITH_KVCACHE = _import_flash_attn_with_kvcache()


def slot_attention(module, query, key, value, attention_mask, scaling, slot_cache=None, slot_fill=None,
                   slot_fill_pos=None, slot_cu=None, slot_max=None, slot_pos=None, slot_mask=None, slot_used=None,
                   **kwargs):
    """Attention over the static slot cache; registered below as transformers' AttentionInterface "slots" (HF calls
    it from every attention layer with the rotated query (b, Hq, q, D), key and value (b, Hkv, q, D) and the extra
    forward kwargs; HF builds no mask for it, nor looks for packed sequences in position_ids: masking_utils returns
    early for an attention name it has no mask function for, in transformers 5.17 and 5.25). Returns (b, q, Hq, D).
    slot_cache (layers, 2, S, L, Hkv, D).
    Prefill (b = 1): P prompts packed back to back in one row of N tokens; slot_fill (N, G): the G slots of each
    token's prompt, slot_fill_pos (N,): its position there. Its keys are written to those slots and each prompt
    attends causally to itself only, through slot_mask (1, 1, N, N) block-diagonal causal (SDPA: CPU, fp32) or
    slot_cu (P + 1,) int32 prompt starts and slot_max (the longest prompt) (torch's varlen flash kernel).
    Decode (slot_pos (b,): where slot i's new key goes): the new keys are written in place, then each slot attends to
    its own positions 0..slot_pos through either slot_mask (b, 1, 1, keys) (masked SDPA over the first `keys`
    positions: CPU, fp32) or slot_used (b,) int32 = slot_pos + 1 (flash kernels that read only each slot's own
    length: flash_attn_with_kvcache where flash-attn imports, else torch's varlen flash with seqused_k)."""
    k_cache, v_cache = slot_cache[module.layer_idx, 0], slot_cache[module.layer_idx, 1]  # (S, L, Hkv, D) each
    query, key, value = (x.to(k_cache.dtype) for x in (query, key, value))  # autocast's fp32 rotary -> cache dtype
    if slot_fill is not None:
        k_cache[slot_fill, slot_fill_pos[:, None]] = key[0].transpose(0, 1)[:, None]  # (N, G, Hkv, D) <- (N, 1, ..)
        v_cache[slot_fill, slot_fill_pos[:, None]] = value[0].transpose(0, 1)[:, None]
        if slot_mask is not None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=slot_mask, scale=scaling, enable_gqa=True)
            return out.transpose(1, 2), None  # (1, N, Hq, D)
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (N, H, D) each
        out = torch.ops.aten._flash_attention_forward(q, k, v, slot_cu, slot_cu, slot_max, slot_max, 0.0, True, False,
                                                      scale=scaling)[0]  # (N, Hq, D)
        return out[None], None  # (1, N, Hq, D)
    b, Hq, _, D = query.shape
    Hkv, L = key.shape[1], k_cache.shape[1]
    slots = torch.arange(b, device=query.device)  # (b,)
    k_cache[slots, slot_pos] = key[:, :, 0]  # (b, Hkv, D) written in place: no copy of the cache
    v_cache[slots, slot_pos] = value[:, :, 0]
    if slot_mask is not None:  # the query heads of one KV head become its g = Hq / Hkv "positions": no repeat_kv copy
        keys = slot_mask.shape[-1]
        out = F.scaled_dot_product_attention(query.reshape(b, Hkv, Hq // Hkv, D), k_cache[:, :keys].transpose(1, 2),
                                             v_cache[:, :keys].transpose(1, 2), attn_mask=slot_mask, scale=scaling)
        return out.reshape(b, 1, Hq, D), None  # (b, Hkv, g, D) -> (b, 1, Hq, D)
    flash = FLASH_ATTN_WITH_KVCACHE
    if flash is not None:
        return flash(query.transpose(1, 2), k_cache, v_cache, cache_seqlens=slot_used, softmax_scale=scaling), None
    cu = torch.arange(b + 1, device=query.device, dtype=torch.int32)  # (b + 1,) one query per slot; slot i's keys
    out = torch.ops.aten._flash_attention_forward(  # start at i * L in the flattened cache, slot_used[i] of them read
        query.reshape(b, Hq, D), k_cache.view(b * L, Hkv, D), v_cache.view(b * L, Hkv, D), cu, cu * L, 1, L, 0.0,
        False, False, scale=scaling, seqused_k=slot_used)[0]  # (b, Hq, D)
    return out.view(b, 1, Hq, D), None


AttentionInterface.register("slots", slot_attention)


@contextlib.contextmanager
def slots_attention(model):
    """model's attention implementation set to "slots" (through its own setter) for the block, then restored."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("slots")
    if model.config._attn_implementation != "slots":  # HF only warns for models that cannot switch
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation; use engine='pad'")
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


@dataclass
class SlotState:
    """Per-slot decode state on the device, changed in place (CUDA graphs replay on fixed addresses). A free slot, or
    one whose row has ended, has row = B (the scratch row of the output buffers) and pos = col = 0."""
    tok: torch.Tensor  # (S,) long: the last sampled token, fed at the next step
    pos: torch.Tensor  # (S,) long: its position = tokens already in the slot's cache
    row: torch.Tensor  # (S,) long: the Rollout row the slot decodes (B: none)
    col: torch.Tensor  # (S,) long: the response index of the next sampled token
    last: torch.Tensor  # (S,) long: the row's last response index (its max_new_tokens - 1)

    @classmethod
    def empty(cls, S, B, device):
        st = cls(*(torch.zeros(S, dtype=torch.long, device=device) for _ in range(5)))
        st.row.fill_(B)
        return st


def kv_shape(model, S, cap, tp=1):
    """(layers, 2, S, cap, kv heads, head dim): the slot cache of a model (kv heads / tp per rank of a tp group)."""
    c = model.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, 2, S, cap, c.num_key_value_heads // tp, D


def slots_that_fit(free, per_slot, prefill, rows):
    """-> (S, fit): fit = how many slots of `per_slot` bytes fit in 90% of `free` bytes less one prefill's
    activations (`prefill` bytes), S = min(rows, fit). `free` must be what ONE new tensor can get: the driver's free
    memory (mem_get_info) after torch.cuda.empty_cache(). Facts of the CUDA caching allocator (torch 2.6-2.13;
    MEMORY.md, risk 1) that make it so:
    - empty_cache returns to the driver only what no live tensor holds on to. Without expandable segments that is
      whole segments: the last rollout's cache was one segment, and once anything is carved from it after it is freed
      (AdamW's states at the first optimizer.step()), the whole segment stays reserved; its free part (memory_reserved
      - memory_allocated) is fragments that one cache-sized tensor cannot use, so it is not counted here (counting it
      was a likely OOM at step 2), and from then on `free` is only the ~10% the cache left: S collapses.
    - With expandable segments (PYTORCH_ALLOC_CONF=expandable_segments:True, train.py's default) empty_cache unmaps
      every free page, even inside a partly used segment, so `free` counts them again; with AdamW's states created
      before the first rollout (train.create_adam_states) every step's rollout then sees the same `free` and S."""
    fit = max(0, int((0.9 * free - prefill) // per_slot))
    return min(rows, fit), fit


def kv_slots(model, rows, prompt_len, cap, dtype, device, tp=1):
    """How many slots of `cap` tokens to allocate -> (S, fit, line to print); fit: the slots that fit before the cap
    of `rows` (None on CPU). CPU: one per row. CUDA: slots_that_fit with the free memory after empty_cache(), a
    prefill's activations (bench/memory.py's estimate) and a slot's bytes: its KV plus its share of the step's
    temporaries (~56 bytes per vocabulary entry: bf16 and fp32 logits, softmax, sort values and indices, cumsum, the
    race's float64 noise, log-softmax). The line also shows the memory the allocator keeps cached but cannot give
    back (reserved - allocated): large only without expandable segments, where it is what the cache lost."""
    if device.type != "cuda":
        return rows, None, f"rollout: {rows} slots (one per row, CPU)"
    c = model.config
    L, _, _, _, Hkv, D = kv_shape(model, 1, cap, tp)
    per_slot = cap * 2 * L * Hkv * D * dtype.itemsize + 56 * c.vocab_size
    prefill = prompt_len * (8 * c.hidden_size + 3 * c.intermediate_size) * 2
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0]
    stuck = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    S, fit = slots_that_fit(free, per_slot, prefill, rows)
    return S, fit, (f"rollout: {S} slots for {rows} rows ({fit} fit; {per_slot / 2**20:.0f} MiB per slot: KV of {cap} "
                    f"tokens + logits; {free / 2**30:.1f} GiB free, {stuck / 2**30:.1f} GiB cached and not free)")


def decode_step(model, cache, st, out_tokens, out_logprobs, b, keys, temperature, top_p, is_stop, tp_group=None):
    """One token for each of slots [0, b): feeds its last token at its position, samples the next and writes it (and
    its log-prob) to (row, col) of the output buffers (B + 1, max_new_tokens); a row that samples a stop token or
    reaches its last column ends: its slot gets row = B and pos = 0 (the scratch row takes what it decodes until the
    host frees it). Fixed shapes, state changed in place, no host sync: capturable as a CUDA graph. keys: the key
    positions read by the masked-SDPA path (a multiple of 64 >= every live slot's pos + 1), None on the flash paths.
    With tp_group, the group's first rank's tokens are broadcast so its ranks decode the same rows."""
    tok, pos, row, col, last = st.tok[:b], st.pos[:b], st.row[:b], st.col[:b], st.last[:b]  # (b,) views
    attend = dict(slot_used=(pos + 1).int()) if keys is None else \
        dict(slot_mask=(torch.arange(keys, device=pos.device) <= pos[:, None])[:, None, None])  # (b, 1, 1, keys)
    logits = model(input_ids=tok[:, None], position_ids=pos[:, None], use_cache=False, slot_cache=cache[:, :, :b],
                   slot_pos=pos, **attend).logits[:, -1].float()  # (b, V)
    nxt = sample(logits, temperature, top_p)  # (b,)
    if tp_group is not None:
        torch.distributed.broadcast(nxt, torch.distributed.get_global_rank(tp_group, 0), group=tp_group)
    out_tokens[row, col] = nxt
    if out_logprobs is not None:
        out_logprobs[row, col] = (logits / (temperature or 1.0)).log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
    ended = is_stop[nxt] | (col == last) | (row == out_tokens.shape[0] - 1)  # (b,) incl. free slots
    row.masked_fill_(ended, out_tokens.shape[0] - 1)
    pos.copy_((pos + 1).masked_fill_(ended, 0))
    col.copy_((col + 1).masked_fill_(ended, 0))
    tok.copy_(nxt)


def _prefill(model, cache, st, out_tokens, out_logprobs, prompts, limits, slot0, row0, G, flash, temperature, top_p,
             is_stop, tp_group):
    """Prefill P prompts in ONE forward, packed back to back in one row (position ids restart at 0 at each prompt,
    each attends to itself only), each ONCE into its G slots slot0 + iG .. slot0 + iG + G - 1 (its keys written to
    each), logits only at each prompt's last token; then sample each sample's first token (rows row0 + iG ..). A row
    ends after its prompt's limit of tokens. The draws are one (P * G, V) block, in prompt order: on CPU the same
    numbers as P draws of (G, V), prompt by prompt."""
    device, P, B = cache.device, len(prompts), out_tokens.shape[0] - 1
    lens = torch.tensor([len(p) for p in prompts])  # (P,)
    ends = lens.cumsum(0)  # (P,) where each prompt ends in the packed row
    seg = torch.arange(P).repeat_interleave(lens)  # (N,) the prompt of each packed token
    pos = torch.arange(int(ends[-1])) - (ends - lens)[seg]  # (N,) its position in its prompt
    slots = slot0 + torch.arange(P * G).view(P, G)  # (P, G)
    if flash:  # varlen flash: the prompts' starts
        attend = dict(slot_cu=F.pad(ends, (1, 0)).to(device, torch.int32), slot_max=int(lens.max()))
    else:  # SDPA: block-diagonal causal mask
        same = (seg[:, None] == seg[None]) & (torch.arange(len(seg))[:, None] >= torch.arange(len(seg))[None])
        attend = dict(slot_mask=same[None, None].to(device))  # (1, 1, N, N)
    ids = torch.tensor([[t for p in prompts for t in p]], device=device)  # (1, N)
    logits = model(input_ids=ids, position_ids=pos[None].to(device), use_cache=False, slot_cache=cache,
                   slot_fill=slots[seg].to(device), slot_fill_pos=pos.to(device), logits_to_keep=(ends - 1).to(device),
                   **attend).logits[0].float().repeat_interleave(G, 0)  # (P * G, V) each prompt's G samples
    nxt = sample(logits, temperature, top_p)  # (P * G,)
    if tp_group is not None:
        torch.distributed.broadcast(nxt, torch.distributed.get_global_rank(tp_group, 0), group=tp_group)
    rows = torch.arange(row0, row0 + P * G, device=device)  # (P * G,)
    out_tokens[rows, 0] = nxt
    if out_logprobs is not None:
        out_logprobs[rows, 0] = (logits / (temperature or 1.0)).log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
    limit = torch.tensor(limits).repeat_interleave(G).to(device)  # (P * G,)
    ended = is_stop[nxt] | (limit == 1)  # (P * G,)
    idx = slots.flatten().to(device)  # (P * G,)
    st.last[idx] = limit - 1
    st.tok[idx] = nxt
    st.pos[idx] = torch.where(ended, 0, lens.repeat_interleave(G).to(device))
    st.row[idx] = torch.where(ended, B, rows)
    st.col[idx] = torch.where(ended, 0, 1)


def _compact(cache, st, held, ended, t, B):
    """Frees the slots whose rows ended (ended: a bool per busy slot) and moves the busy slots above the new top down
    into the gaps (their live KV and state), so that slots [0, busy) are the busy ones -> busy. held: (prompt length,
    step admitted) of each slot, host-side, moved along."""
    busy = sum(not e for e in ended)
    gaps, movers = [s for s in range(busy) if ended[s]], [s for s in range(busy, len(ended)) if not ended[s]]
    if movers:
        for d, s in zip(gaps, movers):  # in place, slot by slot (no temporary of all their KV)
            live = held[s][0] + t - held[s][1]
            cache[:, :, d, :live].copy_(cache[:, :, s, :live])
            held[d] = held[s]
        dst, src = torch.tensor(gaps, device=cache.device), torch.tensor(movers, device=cache.device)
        for x in (st.tok, st.pos, st.row, st.col, st.last):
            x[dst] = x[src]
        st.row[src], st.pos[src], st.col[src] = B, 0, 0
    return busy


@functools.cache
def _compiled_decode_step(backend):
    """decode_step under torch.compile (COMPILE): one trace for every b (dynamic shapes), made before any graph is
    captured, so that inductor fuses the step's many small ops (RMSNorm, rotary, residual adds, SiLU) into few
    kernels."""
    return torch.compile(decode_step, fullgraph=True, dynamic=True, backend=backend)


class _GraphRunner:
    """Runs the decode step of b slots: eagerly (graphs=False), or as one CUDA graph per b, captured at the first step
    of that b after an eager warm-up (which is that step's real work) on the process's one side stream, every graph in
    one memory pool. capture_s: seconds spent in warm-ups and captures (synced around)."""

    def __init__(self, graphs, device):
        self.graphs = {} if graphs else None
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.device, self.capture_s = device, 0.0

    def step(self, b, fn):
        if self.graphs is None:
            return fn()
        if b in self.graphs:
            return self.graphs[b].replay()
        torch.cuda.synchronize(self.device)
        t0, side = time.perf_counter(), _capture_stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graphs[b] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graphs[b], pool=self.pool, stream=side):
            fn()  # recorded, not run
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - t0


def decode_roofline_s(steps, weight_bytes, flops_per_row, kv_bytes_per_key, attn_flops_per_key, hbm, peak):
    """The least time a GPU of `hbm` bytes/s and `peak` FLOP/s needs for these decode forwards: the sum over them of
    max(bytes / hbm, flops / peak), bytes = weight_bytes + kv_bytes_per_key * keys and flops = flops_per_row * b +
    attn_flops_per_key * keys. steps: (b, keys) per forward: the rows it decodes, the live keys its busy rows read.
    The other arguments: roofline_terms."""
    return sum(max((weight_bytes + kv_bytes_per_key * k) / hbm, (flops_per_row * b + attn_flops_per_key * k) / peak)
               for b, k in steps)


def roofline_terms(model, dtype, tp=1):
    """-> (weight_bytes, flops_per_row, kv_bytes_per_key, attn_flops_per_key) of a decode forward, per rank of a tp
    group (its own shards of the weights, heads / tp): the weights read are every parameter but an untied input
    embedding (a row lookup); 2 FLOPs per weight per row; a key is K and V in every layer, in `dtype`; QK^T and PV
    take 4 * layers * heads * head_dim FLOPs per key."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # a tensor-parallel DTensor -> this rank's shard
    params = [local(p) for p in model.parameters()]
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    untied = [] if head is not None and head.weight is emb else [local(emb)]
    n = sum(p.numel() for p in params) - sum(p.numel() for p in untied)
    weight_bytes = sum(p.numel() * p.element_size() for p in params) - sum(p.numel() * p.element_size() for p in untied)
    L, _, _, _, Hkv, D = kv_shape(model, 1, 1, tp)
    return weight_bytes, 2 * n, 2 * L * Hkv * D * dtype.itemsize, 4 * L * model.config.num_attention_heads // tp * D


def _generate_slots(model, prompts, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs, bar,
                    slots=0, tp_group=None, stats=None, compile_step=False):
    """All prompts in one call on S KV-cache slots -> tokens (B, R) right-padded with pad_id, logprobs (B, R) or None.
    max_new_tokens: an int, or one per prompt. The host schedules, the device decodes:
    every SYNC_EVERY steps the host reads which slots' rows have ended (one sync), frees them, moves the busy slots
    above the gaps down into them (_compact: slots [0, busy) are the busy ones; the moves copy those rows' live KV,
    outside the step), and while G = n slots are free admits the next prompts: all those that fit are prefilled
    together (_prefill, one forward per PREFILL_TOKENS), each ONCE into G slots. Each step decodes slots [0, b),
    b = busy (where CUDA graphs are captured, rounded up to a multiple of G or more: at most ~16 graphs, one per b;
    _GraphRunner). So no slot waits for another row, and the decode forwards are at most
        floor((sum(lengths - 1) + B * k) / (S - G + 1)) + max(lengths) + k - 1    (k = SYNC_EVERY)
    (until the last admission, fewer than G slots are free at each check and a row holds its slot at most k steps
    after it ended; after it, the last admitted rows end within max(lengths) - 1 steps, seen within k).
    stats (a dict), if given, gets: slots, slots_fit (the uncapped slot count; None on CPU or with slots=),
    decode_forwards, row_steps (slot-rows decoded: b summed over steps), graphs, attention, prefill_forwards, refills
    (admissions of one or more prompts), prefill_s, capture_s, decode_s (the rest of the call), tail_forwards
    (forwards with busy < S / 4), occupancy (busy / S, mean over forwards), ideal_forwards = max(ceil(sum(lengths -
    1) / S), max(lengths) - 1), schedule_efficiency = ideal / decode forwards, roofline_s (CUDA on a GPU of
    GPU_PEAKS, else None: decode_roofline_s of the forwards, the live keys as the host counts them)."""
    device = next(model.parameters()).device
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    G, B, M = n, len(prompts) * n, max(limits)
    cap = max(map(len, prompts)) + M  # tokens a slot holds: the longest prompt and a full response
    window = getattr(model.config, "sliding_window", None)
    if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or []) or (window and window < cap):
        raise ValueError(f"engine='slots' implements full causal attention only: {type(model).__name__} has a sliding "
                         f"window (sliding_window={window}, layer_types) shorter than a slot's {cap} tokens")
    tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else next(model.parameters()).dtype  # K/V as the attention computes them (autocast: bf16)
    out_tokens = torch.full((B + 1, M), pad_id, dtype=torch.long, device=device)  # (B + 1, M): row B is scratch
    out_logprobs = torch.zeros((B + 1, M), device=device) if return_logprobs else None  # (allocated before sizing)
    budget = PREFILL_TOKENS.get(device.type, 1024)  # packed tokens per prefill forward (a longer prompt: alone)
    if slots:
        S, fit, line = min(slots, B), None, f"rollout: {min(slots, B)} slots (given)"
    else:  # (kv_slots' prompt_len: the tokens of the largest prefill it leaves room for)
        S, fit, line = kv_slots(model, B, max(max(map(len, prompts)), min(budget, sum(map(len, prompts)))), cap,
                                dtype, device, tp)
    if tp_group is not None:  # ranks of a group run one schedule: the smallest budget of them
        agreed = torch.tensor([S], device=device)
        torch.distributed.all_reduce(agreed, torch.distributed.ReduceOp.MIN, group=tp_group)
        S = int(agreed)
    if S < G:
        raise ValueError(f"engine='slots': the KV budget holds {S} slots of {cap} tokens, fewer than the n={G} samples "
                         "of one prompt")
    flash = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    from torch.distributed.fsdp import FSDPModule
    runner = _GraphRunner(flash and CUDA_GRAPHS and tp_group is None and  # FSDP hooks, TP collectives: eager
                          not any(isinstance(m, FSDPModule) for m in model.modules()), device)
    attention = "sdpa" if not flash else "flash_attn_with_kvcache" if FLASH_ATTN_WITH_KVCACHE else "torch_flash"
    if not bar.disable:
        print(f"{line} | decode attention {attention}{' | CUDA graphs' if runner.graphs is not None else ''}",
              flush=True)
    every = SYNC_EVERY.get(device.type, 1)
    grain = G * max(1, S // (16 * G))  # graphs: b rounded up to this, so at most ~16 graphs
    step_fn = _compiled_decode_step("inductor" if compile_step is True else compile_step) if compile_step \
        else decode_step

    cache = torch.zeros(kv_shape(model, S, cap, tp), dtype=dtype, device=device)  # (layers, 2, S, cap, Hkv, D)
    st = SlotState.empty(S, B, device)
    is_stop = torch.zeros(max([model.config.vocab_size - 1, *stop_ids]) + 1, dtype=torch.bool, device=device)
    is_stop[stop_ids] = True
    args = (temperature, top_p, is_stop, tp_group)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    held = [None] * S  # host: (prompt length, step admitted) of each busy slot; busy slots are [0, busy)
    busy, waiting, t, tokens, t0 = 0, 0, 0, 0, time.perf_counter()
    steps = []  # (b, live keys of the busy rows) per decode forward
    base = top = 0  # sum and max of (prompt length - step admitted) over the busy slots: a slot's live keys at step t
    prefill_s, prefill_forwards, refills, tail, occupied = 0.0, 0, 0, 0, 0
    with slots_attention(model):
        while True:
            if t % every == 0:
                # the host sync: which rows ended; free their slots, compact; admit what fits; stop when all is done
                ended = (st.row[:busy] == B).tolist()
                if not bar.disable:  # rows finished, tokens decoded per second
                    bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
                    bar.update(sum(ended))
                busy = _compact(cache, st, held, ended, t, B)
                admit = min(len(prompts) - waiting, (S - busy) // G)  # prompts whose G slots are free
                if admit:
                    sync()
                    t1, first = time.perf_counter(), waiting
                    while waiting < first + admit:  # packs of at most `budget` tokens (one forward each)
                        pack, size = waiting, 0
                        while pack < first + admit and (pack == waiting or size + len(prompts[pack]) <= budget):
                            size, pack = size + len(prompts[pack]), pack + 1
                        _prefill(model, cache, st, out_tokens, out_logprobs, prompts[waiting:pack],
                                 limits[waiting:pack], busy + (waiting - first) * G, waiting * G, G, flash, *args)
                        prefill_forwards, waiting = prefill_forwards + 1, pack
                    held[busy:busy + admit * G] = [(len(p), t) for p in prompts[first:waiting] for _ in range(G)]
                    busy, refills = busy + admit * G, refills + 1
                    sync()
                    prefill_s += time.perf_counter() - t1
                if busy == 0:
                    break
                base, top = sum(p - a for p, a in held[:busy]), max(p - a for p, a in held[:busy])
            # one decode step of slots [0, b)
            b = busy if runner.graphs is None else min(S, -(-busy // grain) * grain)
            keys = None if flash else min(cap, -(-(top + t + 1) // 64) * 64)  # SDPA: >= every live slot's pos + 1
            runner.step(b, functools.partial(step_fn, model, cache, st, out_tokens, out_logprobs, b, keys, *args))
            steps.append((b, base + busy * (t + 1)))
            tail, occupied = tail + (busy < S / 4), occupied + busy
            t, tokens = t + 1, tokens + busy
    tokens = out_tokens[:B]  # (B, M)
    lengths = response_mask(tokens, stop_ids, torch.tensor(limits, device=device).repeat_interleave(n))[1].cpu()
    if stats is not None:
        ideal = max(-(-int((lengths - 1).sum()) // S), int(lengths.max()) - 1)
        peaks = next((v for k, v in GPU_PEAKS.items() if k in torch.cuda.get_device_name(device)), None) \
            if device.type == "cuda" else None
        stats.update(slots=S, slots_fit=fit, decode_forwards=t, row_steps=sum(b for b, _ in steps),
                     graphs=None if runner.graphs is None else len(runner.graphs), attention=attention,
                     prefill_forwards=prefill_forwards, refills=refills, prefill_s=prefill_s,
                     capture_s=runner.capture_s, decode_s=time.perf_counter() - t0 - prefill_s - runner.capture_s,
                     tail_forwards=tail, occupancy=occupied / S / max(t, 1), ideal_forwards=ideal,
                     schedule_efficiency=ideal / t if t else 1.0,
                     roofline_s=None if peaks is None else
                     decode_roofline_s(steps, *roofline_terms(model, dtype, tp), *peaks))
    R = int(lengths.max())
    return tokens[:, :R].cpu(), None if out_logprobs is None else out_logprobs[:B, :R].cpu()


@torch.no_grad()
def generate(model, prompt_ids, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs=False,
             progress=False, engine="slots", max_prompts=0, tp_group=None, slots=0, stats=None, compile_step=None):
    """prompt_ids: list of B0 token-id lists. Returns a Rollout with B = B0 * n rows (prompt-major).
    max_new_tokens: an int, or (engine "slots") a list of one per prompt (eval.py: each prompt's room in the context).
    engine: "slots" (default) | "pad" (see the file docstring; BENCHMARKS.md times them).
    max_prompts > 0 generates in chunks of that many prompts (bounds the KV cache; bench/memory.py sizes it); not
    with "slots", which takes every prompt in one call and bounds its cache with `slots`.
    tp_group: the process group of a tensor-parallel model (distributed.inference_copy). Its ranks decode the prompts
    of all of them together, as one batch, and each gets the rows of its own prompts. Engine "slots" only.
    slots: engine "slots": KV-cache slots (rows decoded at once); 0 sizes them from the free GPU memory (CPU: one
    per row). stats: engine "slots": a dict it fills (_generate_slots lists the keys). compile_step: engine "slots":
    torch.compile its decode step (True: inductor, a string: that backend; None: COMPILE)."""
    if engine not in ("slots", "pad"):
        raise ValueError(f"engine={engine!r}: expected 'slots' or 'pad'")
    if tp_group is not None and engine != "slots":
        raise ValueError("a tensor-parallel model (tp_group) generates with engine='slots' only")
    if engine == "slots" and max_prompts:
        raise ValueError("engine='slots' decodes all prompts in one call: bound its KV cache with slots=, "
                         "not max_prompts=")
    per_prompt = isinstance(max_new_tokens, list)
    if per_prompt and (engine != "slots" or len(max_new_tokens) != len(prompt_ids)):
        raise ValueError("max_new_tokens as a list takes engine='slots' and one limit per prompt")
    if min([n, *(max_new_tokens if per_prompt else [max_new_tokens])]) < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    own = slice(0, len(prompt_ids) * n)  # the caller's rows
    if tp_group is not None:  # the group's prompts (and limits), in rank order
        pooled = [None] * torch.distributed.get_world_size(tp_group)
        torch.distributed.all_gather_object(pooled, (prompt_ids, max_new_tokens), group=tp_group)
        before = sum(len(p) for p, _ in pooled[:torch.distributed.get_rank(tp_group)])
        own = slice(before * n, (before + len(prompt_ids)) * n)
        prompt_ids = [x for p, _ in pooled for x in p]
        max_new_tokens = [x for _, m in pooled for x in m] if per_prompt else max_new_tokens
    chunk = max_prompts or len(prompt_ids)
    chunks = [prompt_ids[i:i + chunk] for i in range(0, len(prompt_ids), chunk)]
    bar = _Progress(len(prompt_ids) * n, progress, "row") if engine == "slots" else \
        _Progress(max_new_tokens * len(chunks), progress, "step")  # slots: rows finished; pad: decode steps
    outs = []  # (tokens (b, R_c), logprobs (b, R_c) or None) per chunk
    try:
        for c in chunks:
            args = (model, c, n, max_new_tokens, temperature, top_p, stop_ids, pad_id, return_logprobs)
            if engine == "slots":
                outs.append(_generate_slots(*args, bar.bar, slots, tp_group, stats,
                                            COMPILE if compile_step is None else compile_step))
            else:
                outs.append(_generate_pad(*args, bar))
    finally:
        bar.bar.close()
    R = max(t.shape[1] for t, _ in outs)
    tokens = torch.cat([F.pad(t, (0, R - t.shape[1]), value=pad_id) for t, _ in outs])  # (B, R)
    logprobs = None if not return_logprobs else torch.cat([F.pad(l, (0, R - l.shape[1])) for _, l in outs])
    limits = torch.tensor(max_new_tokens).repeat_interleave(n) if per_prompt else None  # (B,)
    mask, lengths, stopped = response_mask(tokens, stop_ids, limits)
    return Rollout(
        prompt_ids=[p for p in prompt_ids for _ in range(n)], response_ids=tokens.masked_fill(~mask, pad_id),
        response_mask=mask, lengths=lengths, finish_reason=["stop" if s else "length" for s in stopped.tolist()],
        logprobs=None if logprobs is None else logprobs * mask).rows(own)
