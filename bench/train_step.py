"""Whole train.py steps on a random-weight model of a Qwen2.5 shape (no download), for measured GPU memory and step
times next to bench/memory.py's estimate:

    python bench/train_step.py --quick                                      # CPU, tiny shape, 2 gloo ranks, < 1 min
    python bench/train_step.py --model_config=qwen2.5-1.5b --nproc=1 -- --shard=ddp --prompts_per_step=16
    python bench/train_step.py --model_config=qwen2.5-7b --nproc=8 -- --shard=zero3 --prompts_per_step=64

It writes a model folder (random weights, bf16 safetensors, built on the GPU when there is one, and a byte-level BPE
tokenizer trained offline; cached in --cache), then runs `torchrun --standalone --nproc_per_node=NPROC train.py` on
the built-in arithmetic data with the Zoo's settings (qwen-boxed template, 8 samples, kl_coef 1e-4) and the flags
after `--`. A random model rarely emits a stop token, so nearly every response runs to --max_response_len: the most
tokens a rollout can decode (the slot cache's memory does not depend on it: every slot is allocated at full length).
Prints one JSON line per step (train.py's metrics: peak_mem_gib = torch.cuda.max_memory_allocated from the step's
rollout through its update, peak_mem_rollout_gib during its rollout; on CPU the process's max RSS; train.py also
prints the peak after loading, and the rollout its number of KV slots) and one with bench/memory.py's estimate for
the same shape, shard mode, GPU count, GPU size and micro-batch budget. No checkpoint is written (--save_every=0: a
7B zero3 one is ~122 GB).

The KV-slot check (MEMORY.md, risk 1: the slot cache must not shrink from step 2):

    python bench/train_step.py --model_config=qwen2.5-1.5b --nproc=1 --min_slot_ratio=0.95 -- --shard=ddp --steps=3 \
        --prompts_per_step=8 --max_response_len=256

exits non-zero unless every step's slot capacity is at least that ratio of step 1's. It reads metrics.jsonl's
`rollout_slots_fit` (the slots that fit in the free memory, before the cap of the rows: with few rows S = rows would
hide a collapse), or, with a warning, `rollout_slots` where a train.py lacks the first; it needs --steps >= 3. With
few rows (the command above: S = its 64 rows) it catches step 1 sizing without AdamW's states; the cache stranded by
what is carved from its freed segment needs rows above the slots that fit (MEMORY.md: the allocator check shows it).

train.py runs under torchrun through this file (`--worker`, internal): `train.main(flags, score=exact_integer)`, a
grader that needs no math-verify (the GPU machine may lack it): 1.0 when the answer reward.py extracts (the last box,
else "the answer is", else the last number) is the gold integer exactly; the built-in arithmetic data has integer
golds (train.main checks for math-verify only when it grades itself). Needs torch, transformers, accelerate and
tokenizers only.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # train.py


import train  # noqa: E402  (first: it sets the CUDA allocator's settings before torch is imported)
import reward  # noqa: E402
import torch  # noqa: E402
import memory  # noqa: E402  (bench/memory.py)
from update import SHAPES  # noqa: E402  (bench/update.py: the Qwen2.5 shapes)

SHAPE_OF = {"qwen2.5-1.5b": "1.5b", "qwen2.5-7b": "7b"}  # SHAPES name -> memory.MODELS name


def build_model(name, folder, device):
    """Random-weight Qwen2 of SHAPES[name] (bf16 on GPU, fp32 on CPU) + a byte-level BPE tokenizer -> folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is 12 + 7? Please reason step by step, and put your final answer within \\boxed{}.",
              "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"] * 8
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = Qwen2Config(**SHAPES[name], max_position_embeddings=32768, rope_theta=1e6,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # built and initialised on the GPU, in bf16 there: seconds for 7B
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # this process waits while train.py runs: it must not keep the model's memory cached


def estimate(name, flags, nproc):
    """bench/memory.py's per-GPU bytes for this run, in GiB: load, rollout (engine "slots" only: S slots, each allocated
    at full length whatever the responses' lengths, S = --rollout_slots or what rollout.kv_slots gives on this GPU,
    at most the rows of the call), update, and their max; plus S. Adam's states are resident from before step 1's
    rollout (train.create_adam_states), so every step's S is this one."""
    if name not in SHAPE_OF:
        return None
    cfg = train.parse_config(["--preset=7b", *flags])  # the same defaults train.py will resolve
    m = memory.MODELS[SHAPE_OF[name]]
    gen = memory.resident(m, cfg.shard, nproc, "gen", cfg.gen_tp)
    upd = memory.resident(m, cfg.shard, nproc, "update", cfg.gen_tp)
    rows = cfg.prompts_per_step // nproc * cfg.gen_tp * cfg.samples_per_prompt  # per generating rank or tp group
    prompt_len = 64  # arithmetic prompts in the qwen-boxed template are ~40-60 tokens
    cap = prompt_len + cfg.max_response_len  # tokens a slot holds
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else memory.GPU
    S = min(cfg.rollout_slots, rows) if cfg.rollout_slots else \
        memory.kv_slots(m, sum(gen.values()), rows, cap, cfg.gen_tp, prompt_len, gpu)
    parts = dict(load=memory.load_peak(m, cfg.shard, nproc, cfg.gen_tp), update=sum(upd.values())
                 + memory.activations(m, cfg.shard, cfg.micro_batch_tokens))
    if cfg.engine == "slots":  # + the int64 token buffer (rows + 1, max_response_len)
        parts["rollout"] = sum(gen.values()) + S * memory.slot_bytes(m, cap, cfg.gen_tp) \
            + memory.prefill_bytes(m, prompt_len) + 8 * (rows + 1) * cfg.max_response_len
    parts["peak"] = max(parts.values())
    return {k: round(v / memory.GIB, 2) for k, v in parts.items()} | dict(slots=S if cfg.engine == "slots" else None)


def exact_integer(responses, golds):
    """The bench's grader (no math-verify): 1.0 where the answer reward.py extracts is the gold integer exactly."""
    grades = []
    for text, gold in zip(responses, golds):
        pred, boxed = reward.extract_answer(reward.cut_response(text))
        right = re.fullmatch(r"-?\d+", pred) is not None and int(pred) == int(gold)
        grades.append(reward.Grade(float(right), pred, boxed, "ok", right))
    return grades


def slot_check(rows, ratio):
    """metrics.jsonl's step rows -> (key, counts per step, steps below ratio x step 1's). key: rollout_slots_fit
    where every row has it, else rollout_slots (printed as a warning); exits with one line when neither is there."""
    key = "rollout_slots_fit" if all(r.get("rollout_slots_fit") is not None for r in rows) else "rollout_slots"
    if key == "rollout_slots":
        if any(r.get(key) is None for r in rows):
            sys.exit("error: metrics.jsonl has neither rollout_slots_fit nor rollout_slots on every step (a train.py "
                     "from before the engine logged them?); cannot check the slot counts")
        print("warning: no rollout_slots_fit in metrics.jsonl (CPU, --rollout_slots, or an older train.py): checking "
              "rollout_slots, which the rows cap (a collapse above the rows' count goes unseen)")
    counts = [r[key] for r in rows]
    return key, counts, [r["step"] for r in rows if r[key] < ratio * counts[0]]


def main():
    if sys.argv[1:2] == ["--worker"]:  # under torchrun: train.py's main with this bench's grader
        train.main(sys.argv[2:], score=exact_integer)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--model_config", default="qwen2.5-1.5b", choices=SHAPES)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="CPU: tiny shape, 2 ranks, zero3, 2 short steps")
    ap.add_argument("--min_slot_ratio", type=float, default=0.0,
                    help="exit non-zero unless every step's KV slots (rollout_slots_fit) >= this x step 1's; "
                         "needs --steps >= 3 after --")
    ap.add_argument("--cache", default="/tmp/zero_rl_bench_models")
    ap.add_argument("--out", default="/tmp/zero_rl_bench_run")
    args, flags = ap.parse_known_args()
    flags = [f for f in flags if f != "--"]
    if args.quick:
        args.model_config, args.nproc = "tiny", 2
        flags = ["--shard=zero3", "--prompts_per_step=4", "--max_response_len=16", "--steps=2",
                 "--micro_batch_tokens=2048", *flags]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = os.path.join(args.cache, f"{args.model_config}-{device.type}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        build_model(args.model_config, folder, device)
    base = dict(model=folder, data="arith", template="qwen-boxed", out=args.out, steps=2, save_every=0,
                prompts_per_step=8 * args.nproc, mini_batches=1, max_response_len=1024)
    flags = [f"--{k}={v}" for k, v in base.items()] + flags  # later flags win
    steps = train.parse_config(flags).steps
    if args.min_slot_ratio and steps < 3:
        sys.exit(f"error: --min_slot_ratio needs --steps >= 3 after -- (got {steps}): step 2 on must match step 1")
    shutil.rmtree(args.out, ignore_errors=True)
    worker = [os.path.join(HERE, "train_step.py"), "--worker"]  # train.main under torchrun, graded by exact_integer
    r = subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", *worker, *flags], cwd=ROOT)
    if r.returncode:
        sys.exit(f"error: train.py exited with {r.returncode}")
    rows = [m for m in map(json.loads, open(os.path.join(args.out, "metrics.jsonl"))) if m["step"] >= 1]
    for m in rows:
        keys = ("step", "peak_mem_gib", "peak_mem_rollout_gib", "t_step", "t_rollout", "t_logprobs", "t_update",
                "gen_tok_s", "train_tok_s", "len_mean")
        print(json.dumps({k: m[k] for k in keys} | {k: m.get(k) for k in ("rollout_slots", "rollout_slots_fit")}
                         | dict(model_config=args.model_config, nproc=args.nproc, device=device.type,
                                gpu=torch.cuda.get_device_name() if device.type == "cuda" else None)))
    est = estimate(args.model_config, [f for f in flags if not f.startswith(("--model=", "--data=", "--out="))],
                   args.nproc)
    print(json.dumps(dict(estimate_gib=est, note="bench/memory.py formulas for this run (None: not a Qwen2.5 shape)")))
    if args.min_slot_ratio:
        key, counts, low = slot_check(rows, args.min_slot_ratio)
        peaks = [(m["peak_mem_rollout_gib"], m["peak_mem_gib"]) for m in rows]
        print(f"slot check: {key} per step {counts}; peaks (rollout, step) GiB per step {peaks}")
        if low:
            sys.exit(f"error: {key} at steps {low} is below {args.min_slot_ratio} x step 1's {counts[0]} (MEMORY.md, "
                     "risk 1: the slot cache shrank after step 1)")
        print(f"slot check passed: every step >= {args.min_slot_ratio} x step 1's {counts[0]}")


if __name__ == "__main__":
    main()
