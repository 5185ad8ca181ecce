#!/usr/bin/env bash
# Everything one lent GPU (H100 or H200) must tell us, in one script that finishes in under 8 minutes:
#   bash bench/gpu.sh           # GPU; logs under $OUT (default /tmp/zero_rl_gpu): one file per part, and all.log
#   bash bench/gpu.sh --dry     # CPU: every part at toy size, to check that each command starts and runs (~5 min)
# Needs only torch>=2.11, transformers>=5.17 and accelerate: no flash-attn, math-verify or network (random weights
# from the Qwen2.5 configs' shapes). Parts run in order of importance, each under a timeout; a part that runs over is
# cut and the next one starts (JSON lines printed before the cut stay in its log). The timeouts sum to 485 s.
# Per-part times are ESTIMATES (no GPU was lent while this was written): they assume ~20 ms per eager HF decode step
# (host-bound, 28 layers), ~2-8 ms per CUDA-graph step of "slots", ~10 s to build a random 7B on the GPU.
set -u
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry" ] && DRY=1
SLOW=1; [ $DRY = 1 ] && SLOW=4  # a shared 2-core CPU runs the toy sizes slower than a GPU the real ones
OUT=${OUT:-/tmp/zero_rl_gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/all.log") 2>&1

part() {  # part NAME TIMEOUT_S ESTIMATE COMMAND...: run, log to $OUT/NAME.log, report exit status and seconds
  local name=$1 limit=$2 estimate=$3; shift 3
  echo "=== $name (estimate $estimate, timeout $((limit * SLOW))s): $*"
  local t0=$SECONDS
  timeout $((limit * SLOW)) "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}

if [ $DRY = 1 ]; then  # toy sizes on the CPU
  CHECK="--dry"
  SCALE="--model_config=quick --prompts 2 --samples 2 --prompt_len 16 --max_new_tokens 32 --slots 2 --threads 1"
  R15="--model_config=quick --prompts 4 --samples 2 --prompt_len 16 --max_new_tokens 32 --slots 4 --threads 1"
  R7=$R15
  U15="--quick"; U7="--quick"
  STEP="--quick"
else
  CHECK=""
  SCALE="--model_config=qwen2.5-7b --prompts 64 --samples 8 --prompt_len 256 --max_new_tokens 2048"
  R15="--model_config=qwen2.5-1.5b --prompts 16 --samples 8 --prompt_len 256 --max_new_tokens 512 --slots 64"
  R7="--model_config=qwen2.5-7b --prompts 16 --samples 8 --prompt_len 256 --max_new_tokens 512 --slots 64"
  U15="--model_config=qwen2.5-1.5b --samples 32 --max_response 2048 --repeats 1"
  U7="--model_config=qwen2.5-7b --dtype=bf16 --samples 16 --max_response 2048 --repeats 1 --micro_batch_tokens 16384"
  STEP="--model_config=qwen2.5-1.5b --nproc=1 -- --shard=ddp --prompts_per_step=8 --max_response_len=256"
fi

# math-verify (the grader: train.py and bench/update.py import it) is not on the lent GPU machine: carry its wheels in
# .whl/ (git-ignored: `echo /.whl/ >> .git/info/exclude`), made on a machine with a package index by
#   pip download --no-deps -d .whl math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
# and name .whl in the device tool's `carry`; they are installed here into /tmp/site.
if ! python -c "import math_verify" 2>/dev/null; then
  if [ -d .whl ]; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  else
    echo "=== warning: math-verify is missing and there is no .whl/ to install it from: parts 5-7 will fail"
  fi
fi

echo "=== $(date -u) | $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
python -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers",
transformers.__version__, "| flash sdp", torch.backends.cuda.is_flash_attention_available())'

# 0. MEMORY.md's risk 1: the second rollout's slot cache after the update placed persistent blocks (Adam's states)
#    inside the first cache's freed segment, sized as rollout.kv_slots does (after empty_cache). Estimate 5 s.
ALLOC='import torch
free = lambda: (torch.cuda.empty_cache(), torch.cuda.mem_get_info()[0])[1]
B = lambda n: torch.empty(int(n), dtype=torch.uint8, device="cuda")
resident = B(0.25 * free()); kv = B(0.9 * free()); del kv
acts = [B(2**28) for _ in range(40)]; adam = [B(2**26) for _ in range(56)]; del acts
kv = B(0.9 * free()); print(f"second slot cache allocated: {kv.numel() / 2**30:.1f} GiB")'
[ $DRY = 1 ] || part alloc 20 "5 s" python -c "$ALLOC"

# 1. Engine "slots" on the GPU paths the CPU tests cannot reach: flash decode attention vs masked SDPA; CUDA graphs vs
#    eager (identical greedy tokens), greedy vs "pad", decode log-probs vs a teacher-forced forward. Estimate 25 s.
part check 45 "25 s" python bench/gpu_check.py $CHECK

# 2. "slots" at scale: 7B, 64 prompts x 8, forced lognormal lengths (mean 200, 1% at 2048), slots sized from the free
#    memory (printed; all 512 rows fit on an 80 GB GPU): % of the HBM roofline, schedule efficiency, peak memory.
#    Estimate: build 10 s, ~2100 graph steps x ~7 ms = 15 s, 64 prefills + ~16 graph captures 5 s: 35 s.
part rollout_7b_scale 60 "35 s" python bench/rollout.py $SCALE --engines slots

# 3-4. Every engine, one KV budget: 16 prompts x 8 on 64 slots ("slots") or 8 prompts per call (the others), mean
#    length 50, 1% at 512. Estimates per shape: build 5-10 s, slots 3-5 s, pad ~900 steps x 20 ms = 18 s-22 s,
#    cb (sdpa: dense mask) ~30 s: 1.5B 80 s, 7B 90 s.
part rollout_1.5b 90 "80 s" python bench/rollout.py $R15 --engines slots,pad,cb
part rollout_7b 100 "90 s" python bench/rollout.py $R7 --engines slots,pad,cb

# 5-6. Update tokens/s and MFU (train.accumulate_gradients, padded vs packed; sdpa, so "packed" builds a dense mask).
#    1.5B: fp32 weights under bf16 autocast (train.py's ddp); 7B: bf16 weights and grads. Estimates 30 s, 40 s.
part update_1.5b 40 "30 s" python bench/update.py $U15
part update_7b 50 "40 s" python bench/update.py $U7

# 7. One bf16 train.py step end to end (2 steps: rollout with its default engine, log-probs, update), 1.5B ddp, with
#    bench/memory.py's estimate next to the measured peaks (MEMORY.md's plan). Estimate: build + save 15 s, load
#    10 s, 2 steps x 20 s: 65 s.
part train_step_1.5b 80 "65 s" python bench/train_step.py $STEP

echo "=== MEMORY.md's plan (computed), for the peaks above"
python bench/memory.py
echo "=== done $(date -u); logs in $OUT"
