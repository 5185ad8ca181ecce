#!/usr/bin/env bash
# Everything one lent GPU (H200 or H100) must tell us, in one script of about 8 minutes:
#   bash bench/gpu.sh           # GPU; logs under $OUT (default /tmp/zero_rl_gpu): one file per part, all.log, and
#                               # at the end one summary table of every part's JSON lines (bench/gpu_summary.py)
#   PARTS="0 1 2" bash bench/gpu.sh   # only those parts (by number), in the script's order
#   bash bench/gpu.sh --dry     # CPU: every part at toy size, to check that each command starts and runs (minutes),
#                               # with pyarrow, math_verify and matplotlib import-blocked (BLOCK=0 to allow them)
# Needs only torch>=2.11, transformers>=5.17 and accelerate: no flash-attn, math-verify, pyarrow, matplotlib or
# network (random weights in the Qwen2.5 configs' shapes; train_step grades with its own exact-integer scorer).
# Parts run in order of importance, each independent and under its own timeout: one that fails or runs over is cut
# and the next one starts (JSON lines printed before the cut stay in its log). The script prints the timeouts' sum.
# Times below are estimates; parts 0-3 ran once on an H200 (2026-12-04, BENCHMARKS.md) in 57, 35, 67 and 50 s (part 3
# failed at its compile, fixed since); the eager 1.5B decode step took 43 ms, a CUDA-graph one 5.2 ms at b = 64.
set -u
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry" ] && DRY=1
SLOW=1; [ $DRY = 1 ] && SLOW=4  # a shared 2-core CPU runs the toy sizes slower than a GPU the real ones
OUT=${OUT:-/tmp/zero_rl_gpu}
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT/status.tsv"
exec > >(tee "$OUT/all.log") 2>&1

part() {  # part NAME TIMEOUT_S ESTIMATE COMMAND...: run, log to $OUT/NAME.log, record exit status and seconds
  local name=$1 limit=$(($2 * SLOW)) estimate=$3; shift 3
  if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" ${name%%_*} "* ]]; then return; fi  # PARTS="1 0 2": only those
  echo "=== $name (estimate $estimate, timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 $limit "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$estimate" "$limit" >> "$OUT/status.tsv"
}

if [ $DRY = 1 ]; then  # toy sizes on the CPU
  STEP="--quick --min_slot_ratio 0.95 -- --steps=3"
  CHECK="--dry"
  STEADY="--model_config=quick --workload steady --prompts 8 --samples 2 --prompt_len 16 --max_new_tokens 32 --mean_len 8 --slots 4 --threads 1"
  KERNELS="--model_config=quick --kernels --threads 1"
  ENGINES="--model_config=quick --prompts 4 --samples 2 --prompt_len 16 --max_new_tokens 32 --slots 4 --threads 1"
  U15="--model_config=tiny --samples 8 --max_response 128 --micro_batch_tokens 4096 --repeats 1"
  U7="$U15 --dtype=bf16"
  if [ "${BLOCK:-1}" = 1 ]; then  # the bare-box imports: any import of these three fails, in every python started below
    mkdir -p "$OUT/block"
    cat > "$OUT/block/sitecustomize.py" <<'EOF'
import sys
class _Block:  # an import of a blocked package raises ImportError, as on a box without it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pyarrow", "math_verify", "matplotlib"):
            raise ImportError(f"{name} is blocked (bench/gpu.sh --dry: a box without it)")
sys.meta_path.insert(0, _Block())
EOF
    export PYTHONPATH="$OUT/block${PYTHONPATH:+:$PYTHONPATH}"
    echo "=== pyarrow, math_verify, matplotlib blocked ($OUT/block/sitecustomize.py)"
  fi
else
  # memfix's check: a real 3-step train.py run; fails unless every step's slot capacity >= 0.95 x step 1's
  STEP="--model_config=qwen2.5-1.5b --nproc=1 --min_slot_ratio 0.95 -- --shard=ddp --steps=3 --prompts_per_step=8 --max_response_len=256"
  CHECK=""
  STEADY="--model_config=qwen2.5-7b --workload steady --prompts 384 --samples 8 --prompt_len 256 --max_new_tokens 512 --mean_len 256 --slots 512"
  KERNELS="--model_config=qwen2.5-1.5b --kernels"
  ENGINES="--model_config=qwen2.5-1.5b --prompts 16 --samples 8 --prompt_len 256 --max_new_tokens 384 --slots 64"
  U15="--model_config=qwen2.5-1.5b --samples 32 --max_response 2048 --repeats 1"
  U7="--model_config=qwen2.5-7b --dtype=bf16 --samples 16 --max_response 2048 --repeats 1 --micro_batch_tokens 16384"
fi
T=(90 60 90 100 65 35 45)  # each part's timeout in seconds (x SLOW under --dry), in the order of the parts below
TOTAL=0; for t in "${T[@]}"; do TOTAL=$((TOTAL + t * SLOW)); done
echo "=== parts' timeouts sum to $TOTAL s ($((TOTAL / 60)) min $((TOTAL % 60)) s); estimates sum to ~6 min"

# math-verify is needed by no part (train_step grades arithmetic with an exact-integer scorer). If some code path
# still imports it, carry its wheels in .whl/ (git-ignored: `echo /.whl/ >> .git/info/exclude`), made on a machine
# with a package index by
#   pip download --no-deps -d .whl math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
# and name .whl in the device tool's `carry`; they are installed here into /tmp/site.
if [ $DRY = 0 ] && ! python -c "import math_verify" 2>/dev/null && [ -d .whl ]; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "=== $(date -u) | $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
python -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers",
transformers.__version__, "| flash sdp", torch.backends.cuda.is_flash_attention_available())'

# 0. The slot cache must not shrink after step 1 (issue 20, finding 1; MEMORY.md's risk 1): three train.py steps
#    (1.5B, ddp, bf16, 8 prompts x 8, 256 tokens), exit 1 unless every step's slot capacity >= 0.95 x step 1's.
#    Estimate: build + save 15 s, torchrun + load 15 s, 3 steps x ~10 s: 60 s.
part 0_train_step ${T[0]} "60 s" python bench/train_step.py $STEP

# 1. Engine "slots" on the GPU paths the CPU tests cannot reach: flash decode attention vs masked SDPA; CUDA graphs vs
#    eager at the same batch sizes (greedy tokens), greedy vs "pad", decode log-probs vs a teacher-forced forward;
#    sampling at T = 1: graph vs eager token histograms (chi-square, with a chance and a real-difference control),
#    fresh noise at every replay. Estimate: imports 10 s, checks 20-30 s: 40 s.
part 1_gpu_check ${T[1]} "40 s" python bench/gpu_check.py $CHECK

# 2. "slots" at the 7B shape in its steady state: 384 prompts x 8 = 3072 rows of 128-384 tokens (uniform) on 512
#    slots, so most forwards run at b = 512 (compute-bound on an H200: the roofline is max(bytes, flops)): the decode
#    roofline % (engine's roofline_s / decode_s), occupancy, tail forwards, totals with prefill and capture.
#    Estimate: build 15 s, 384 prefills 5-10 s, ~1700 graph steps x ~15 ms = 26 s, ~16 captures 5 s: 55-60 s.
part 2_slots_7b_steady ${T[2]} "60 s" python bench/rollout.py $STEADY --engines slots

# 3. Kernels per layer per decode step (goal <= 15): aten ops (CPU proxy), CUDA kernels of one eager step with
#    rollout.COMPILE off and on; the decode step's time at b = 64 eager (what --gen_tp pays), as CUDA graphs, and as
#    graphs of the compiled step, with the compile time; 1.5B shape. Estimate: build 5 s, eager and graphs 15 s,
#    the compile 30-60 s (inductor, 28 layers; run last): 60-80 s.
part 3_kernels_1.5b ${T[3]} "80 s" python bench/rollout.py $KERNELS --engines=

# 4. Engines under one KV budget, 1.5B: "slots" vs "pad" vs HF continuous batching ("hf_cb", bench-only), 16 prompts
#    x 8 on 64 slots, lognormal lengths (mean 37.5, 1% at 384). Estimate: imports and build 15 s, slots 3 s, pad 2
#    calls x ~380 steps x 20 ms = 15 s, hf_cb (sdpa, dense mask) 15-30 s: 50-65 s.
part 4_engines_1.5b ${T[4]} "60 s" python bench/rollout.py $ENGINES --engines slots,pad,hf_cb

# 5. Update tokens/s and MFU (6 x params without an untied input embedding x tokens; mfu_with_attn adds attention),
#    padded vs packed micro-batches (sdpa: "packed" builds a dense mask). 1.5B: fp32 weights under bf16 autocast
#    (train.py's ddp); 7B: bf16 weights and grads. Estimates 25 s, 35 s.
part 5_update_1.5b ${T[5]} "25 s" python bench/update.py $U15
part 5_update_7b ${T[6]} "35 s" python bench/update.py $U7

echo "=== done $(date -u); logs in $OUT"
python bench/gpu_summary.py "$OUT"
