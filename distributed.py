"""The distributed machinery: process group, ZeRO sharding (FSDP2), weights for generation, the tensor-parallel
rollout copy, and checkpoints (save, resume, and the checks that keep a multi-node run from losing one).

    device = init(cfg, rank, world, local_rank, resume_step)     # torchrun's env -> process group, checks --out
    policy = shard_model(Policy(lm), cfg, cuda, local_rank, world)  # ddp: DDP; zero2/zero3: fully_shard per layer
    init_shards(policy, full_state_on_rank0, device)             # fill meta-device shards from rank 0's weights
    copy_weights(policy, rollout_lm, tp_group)                   # before each rollout: the copy that generates
    save_checkpoint(out, step, ...); load_training_state(ckpt, state, policy, optimizer, cfg)

Every function here is called on every rank (they hold collectives) unless its docstring says otherwise.
"""
import contextlib
import copy
import datetime
import inspect
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# Process group.


def init(cfg, rank, world, local_rank, resume_step):
    """Sets this rank's device and, for several ranks or zero2/zero3 (FSDP needs a group, even of one), the process
    group; checks that all ranks share --out and resume from the same step. -> device."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # A collective may wait an hour (NCCL's default is 10 min): the other ranks wait while rank 0 alone reads, or
    # downloads, the initial weights (zero2/zero3) and merges each checkpoint's HF export (32B: 131 GB).
    timeout = datetime.timedelta(hours=1)
    if world > 1:  # a key space per torchrun restart: torch 2.13 keeps the dead attempt's peer addresses in its store
        store, _, _ = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
        check_shared_out(cfg.out, resume_step, rank == 0, device)
    elif cfg.shard != "ddp":
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    return device


def check_shape(cfg, world, per_node):
    """Exits with one line unless the batch splits over `world` ranks (`per_node` per node): whole prompts and
    mini-batches per rank, whole tensor-parallel groups per node (they talk over NVLink)."""
    local = cfg.prompts_per_step // world
    for bad, msg in [(cfg.prompts_per_step % world, f"--prompts_per_step={cfg.prompts_per_step} is not divisible by "
                      f"the {world} ranks; use a multiple of {world}"),
                     (world % cfg.gen_tp or per_node % cfg.gen_tp, f"--gen_tp={cfg.gen_tp} does not divide the "
                      f"{world} ranks ({per_node} per node); use a divisor of --nproc_per_node"),
                     (local % cfg.mini_batches, f"each rank's {local} prompts do not split into "
                      f"--mini_batches={cfg.mini_batches}; make prompts_per_step a multiple of world_size * "
                      f"mini_batches = {world * cfg.mini_batches}")]:
        if bad:
            sys.exit(f"error: {msg}")


def all_sum(values, device):
    """A list of floats summed over ranks (float64, on `device`: NCCL takes CUDA tensors only)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()

# -----------------------------------------------------------------------------
# Sharding (FSDP2), and the copy of the weights that generates.


def shard_model(policy, cfg, cuda, local_rank, world, train=True):
    """--shard=ddp: a full replica per rank (DDP; the frozen reference is just replicated). zero2/zero3: FSDP2
    `fully_shard` on every decoder layer, then the root (embeddings, final norm, lm_head), so parameters, gradients
    and Adam states are split over ranks; zero3 also frees each layer's gathered weights after its forward. On GPU
    the trained model keeps fp32 shards (the master copy) and computes in bf16 with fp32 gradient reduction."""
    if cfg.shard == "ddp":
        return DDP(policy, device_ids=[local_rank] if cuda else None, gradient_as_bucket_view=True) \
            if train and world > 1 else policy  # bucket view: no second fp32 copy of the gradients
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda and train \
        else MixedPrecisionPolicy()  # the reference is already bf16 on GPU
    reshard = cfg.shard == "zero3" or not train
    for layer in policy.lm.get_decoder().layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard)
    return fully_shard(policy, mp_policy=mp, reshard_after_forward=reshard)


def init_shards(model, full_state, device):
    """Allocates the shards of a model split on the meta device (shard_model, inference_copy), restores its
    buffers (to_empty leaves them uninitialised) and, unless full_state is None, fills the shards from the full state
    dict that rank 0 holds (the other ranks pass {}): rank 0 broadcasts it tensor by tensor and each rank keeps its
    slice, cast to its shards' dtype. So the full model exists once per job, in rank 0's host memory, not once per
    GPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    if full_state is not None:
        set_model_state_dict(model, dict(full_state),  # a copy: it puts the loaded shards into the dict it gets
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def tp_plan(config, tp):
    """The model's own tensor-parallel plan ({module pattern: "colwise" | "rowwise"}, Megatron-style: attention by
    heads, the MLP by columns) checked against `tp` ranks -> plan, or exits with one line."""
    plan = getattr(config, "base_model_tp_plan", None) or {}
    heads = [getattr(config, k, 0) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")]
    if not plan or set(plan.values()) - {"colwise", "rowwise"}:
        sys.exit(f"error: --gen_tp={tp}: {config.model_type} has no colwise/rowwise tensor-parallel plan; "
                 "use --gen_tp=1")
    if any(h % tp for h in heads):
        sys.exit(f"error: --gen_tp={tp} does not divide {config.model_type}'s attention heads, KV heads and MLP width "
                 f"{heads}; use a common divisor")
    return plan


def inference_copy(config, device, dtype, tp=1):
    """The model that generates: a plain copy of the policy in `dtype` (bf16 on GPU), so the rollout never reads fp32
    master weights under autocast or FSDP's per-layer hooks, and its decode step can be a CUDA graph. With tp > 1 it
    is split over groups of `tp` consecutive ranks (one node) by tp_plan (embeddings, norms and lm_head replicated):
    for models whose full copy does not fit next to its KV cache on one GPU (32B: 61 GiB in bf16). It stays allocated
    for the run; copy_weights fills it before each rollout. -> (model, the rank's tp process group or None)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    model.tie_weights()
    group = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = init_device_mesh(device.type, (dist.get_world_size() // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]
        style = dict(colwise=ColwiseParallel, rowwise=RowwiseParallel)
        plan = {f"{model.base_model_prefix}.{k}": style[v]() for k, v in tp_plan(config, tp).items()}
        parallelize_module(model, mesh, plan)  # e.g. model.layers.*.self_attn.q_proj: ColwiseParallel()
        group = mesh.get_group()
    init_shards(model, None, device)
    model.tie_weights()  # (to_empty gave the tied input and output embeddings a tensor each)
    return model.eval().requires_grad_(False), group


@torch.no_grad()
def copy_weights(policy, model, tp_group=None):
    """policy's current weights -> its inference copy, one FSDP unit (decoder layer, then the root) gathered at a
    time (each once per call, not once per decoded token as generating on the sharded policy would), so no full fp32
    model ever exists on a GPU; with a tp_group each rank keeps its slice of the split weights."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    module = policy.module if isinstance(policy, DDP) else policy
    if isinstance(module, FSDPModule):
        module._get_fsdp_state()._lazy_init()  # private: make Policy the FSDP root although its forward is not run
    tp, tp_rank = (1, 0) if tp_group is None else (dist.get_world_size(tp_group), dist.get_rank(tp_group))
    for prefix, unit in module.named_modules():
        fsdp = isinstance(unit, FSDPModule)
        if unit is not module and not fsdp:
            continue
        if fsdp:
            unit.unshard()
        for name, p in unit.named_parameters(prefix=prefix):
            if isinstance(p, DTensor):  # a parameter of another FSDP unit, still sharded: copied with its unit
                continue
            q = model.get_parameter(name.removeprefix("lm."))
            if isinstance(q, DTensor):  # Shard(d) over the tp group: this rank's chunk (Replicate: all of it)
                place = q.placements[0]
                q.to_local().copy_(p.chunk(tp, place.dim)[tp_rank] if place.is_shard() else p)
            else:
                q.copy_(p)
        if fsdp:
            unit.reshard()

# -----------------------------------------------------------------------------
# Checkpoints: save, resume, and the checks before any model is loaded.


def checkpoints(out):
    """Complete checkpoints in `out`, oldest first (a checkpoint is complete once renamed from its .tmp name)."""
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, d) for d in os.listdir(out) if d.startswith("step_") and not d.endswith(".tmp"))


EXPORT_FILE_BYTES = 5 * 2**30  # size of one safetensors file of a zero2/zero3 checkpoint's model/ export


def save_checkpoint(out, step, policy, lm, tokenizer, optimizer, scheduler, sampler, bad_steps, cfg, master,
                    export_dtype):
    """Called on every rank. step_NNNNNN/: model/ (the full model as HF safetensors in export_dtype, e.g. bf16 as the
    released Zoo models, + config + tokenizer), state.pt (step, sampler, LR scheduler, consecutive bad steps) and the
    fp32 training state: under ddp weights.pt (the master weights) and optim.pt; under zero2/zero3 shards/, the fp32
    parameter and Adam shards (torch.distributed.checkpoint; resumes on any number of ranks). Under ddp model/ is rank
    0's save_pretrained; under zero2/zero3 each rank writes its slices and rank 0 merges them into ~5 GB safetensors
    files tensor by tensor (DCP's HuggingFaceStorageWriter), so no full copy of the model is ever gathered in memory.
    Written as .tmp, then renamed. With cfg.keep_last, older checkpoints then lose their training state (they stay
    for eval) once this one is complete."""
    final = os.path.join(out, f"step_{step:06d}")
    tmp = final + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint of a killed run
    if dist.is_initialized():
        dist.barrier()
    state = dict(step=step, sampler=sampler.state_dict(), scheduler=scheduler.state_dict(), bad_steps=bad_steps,
                 shard=cfg.shard)
    if cfg.shard != "ddp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        model = get_model_state_dict(policy)  # this rank's fp32 slices (DTensors), keys "lm.model.layers.0..."
        dcp.save({"model": model, "optim": get_optimizer_state_dict(policy, optimizer)},
                 checkpoint_id=os.path.join(tmp, "shards"))
        tied = {n for n, _ in lm.named_parameters(remove_duplicate=False)} - {n for n, _ in lm.named_parameters()}
        export = {k.removeprefix("lm."): v.to(export_dtype) for k, v in model.items()
                  if k.removeprefix("lm.") not in tied}  # a tied lm_head is saved once, as HF does
        files, index, used = {}, 1, 0  # tensor name -> safetensors file number (the hub takes files <= 50 GB)
        for k, v in export.items():
            nbytes = v.numel() * v.element_size()  # (of the full tensor)
            if used and used + nbytes > EXPORT_FILE_BYTES:
                index, used = index + 1, 0
            files[k], used = index, used + nbytes
        dcp.save(export, storage_writer=dcp.HuggingFaceStorageWriter(
            os.path.join(tmp, "model"), fqn_to_index_mapping=files, save_distributed=True, enable_consolidation=True))
    if master:
        model_dir = os.path.join(tmp, "model")
        if cfg.shard == "ddp":
            weights = lm.state_dict()  # fp32
            lm.save_pretrained(model_dir, state_dict={k: v.to(export_dtype) for k, v in weights.items()})
            torch.save(weights, os.path.join(tmp, "weights.pt"))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optim.pt"))
        else:
            shutil.rmtree(os.path.join(model_dir, "sharded"))  # the per-rank slices, merged above
            lm.generation_config.save_pretrained(model_dir)
        config = copy.deepcopy(lm.config)  # (save_pretrained writes the live model's dtype: fp32)
        config.dtype = str(export_dtype).removeprefix("torch.")
        config.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        torch.save(state, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)  # only when re-saving the same step
        os.replace(tmp, final)
        for old in checkpoints(out)[:-cfg.keep_last] if cfg.keep_last else []:
            for name in ("state.pt", "optim.pt", "weights.pt"):  # state.pt first: then it is never resumed from
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(old, name))
            shutil.rmtree(os.path.join(old, "shards"), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def check_checkpoint_writer(shard):
    """Exits with one line if zero2/zero3 checkpoints cannot be written: their HF export uses DCP's safetensors writer
    with consolidation (checked before any model is loaded, not at the first save)."""
    if shard == "ddp":
        return
    import torch.distributed.checkpoint as dcp
    writer = getattr(dcp, "HuggingFaceStorageWriter", None)
    if writer is None or "enable_consolidation" not in inspect.signature(writer).parameters:
        sys.exit(f"error: --shard={shard} checkpoints need torch.distributed.checkpoint's "
                 f"HuggingFaceStorageWriter(enable_consolidation=...), which torch {torch.__version__} lacks; "
                 "upgrade torch (tested: 2.13)")


def check_shared_out(out, resume_step, master, device, wait=10.0):
    """Exits with one line on every rank unless all ranks see the same --out folder and would resume from the same
    step. Every rank writes checkpoints there (zero2/zero3: its shards, which rank 0 then merges) and reads them back
    on resume, so with several nodes --out must be on a shared filesystem: with a node-local folder, zero checkpoints
    silently lack the other nodes' shards (rank 0 merges half-size tensors), and a restart would resume the nodes from
    different steps. Rank 0 writes a random token that the others must read within `wait` s."""
    token = torch.tensor([int.from_bytes(os.urandom(7), "little") if master else 0], device=device)
    dist.broadcast(token, 0)
    path = os.path.join(out, ".shared_check")
    if master:
        with open(path, "w") as f:
            f.write(str(token.item()))
    dist.barrier()
    seen, deadline = False, time.time() + wait
    while not seen and time.time() < deadline:  # (a network filesystem may show the file a little late)
        with contextlib.suppress(OSError):
            seen = open(path).read() == str(token.item())
        time.sleep(0 if seen else 0.5)
    ok = torch.tensor([int(seen)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if master:
        os.remove(path)
    if not ok.item():
        sys.exit(f"error: the ranks do not all see the same --out={out} (a folder local to each node?); every rank "
                 "writes and reads checkpoints there: put --out on a filesystem that all nodes share")
    lo, hi = torch.tensor([resume_step], device=device), torch.tensor([resume_step], device=device)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():  # e.g. a network filesystem's stale directory listing right after a checkpoint
        sys.exit(f"error: the ranks found different latest checkpoints in --out={out} (steps {lo.item()} to "
                 f"{hi.item()}); restart the job (with torchrun --max-restarts it retries by itself)")


def check_out(cfg, ckpt, state):
    """Exits with one line unless --out is writable (every rank writes there: zero2/zero3 their checkpoint shards)
    and, when it holds a checkpoint to resume from, this run can resume from it."""
    try:
        os.makedirs(cfg.out, exist_ok=True)
        if not os.access(cfg.out, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        sys.exit(f"error: cannot write to --out={cfg.out!r} ({e}); pass a writable folder")
    if state:
        check_resumable(ckpt, state, cfg)


def check_resumable(ckpt, state, cfg):
    """Exits with one line if this run cannot resume from ckpt (checked before any model is loaded)."""
    if state["shard"] != cfg.shard and "ddp" in (state["shard"], cfg.shard):
        sys.exit(f"error: {ckpt} was written with --shard={state['shard']}; resume it with that --shard "
                 f"(zero2 and zero3 checkpoints are interchangeable)")


def load_training_state(ckpt, state, policy, optimizer, cfg):
    """Resume: the fp32 master weights and the optimizer (ddp), or the parameter and Adam shards (zero2/zero3)."""
    if cfg.shard == "ddp":
        module = policy.module if isinstance(policy, DDP) else policy
        module.lm.load_state_dict(torch.load(os.path.join(ckpt, "weights.pt"), weights_only=True, map_location="cpu"))
        optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optim.pt"), weights_only=True, map_location="cpu"))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    sd = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    dcp.load(sd, checkpoint_id=os.path.join(ckpt, "shards"))  # each rank reads its own slices
    set_model_state_dict(policy, sd["model"])
    set_optimizer_state_dict(policy, optimizer, sd["optim"])
