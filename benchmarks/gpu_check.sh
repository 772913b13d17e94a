#!/usr/bin/env bash
# One GPU check of SimLAP-HF, sized for a lent machine (one H200) and a run of under 9 minutes.
#
# Usage, from anywhere (it changes to the repository root):
#   bash benchmarks/gpu_check.sh OUTDIR               # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke OUTDIR   # every part on the CPU with tiny sizes (~2-3 min), to catch
#                                                     # errors before spending device time (or GPU_CHECK_CPU_SMOKE=1)
#
# Preparing the run (the repository is copied to the GPU machine and run from its root; outputs/ is git-ignored,
# so the Fashion-MNIST files travel as a carried path):
#   mkdir -p outputs/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz outputs/fashion-mnist/
#   device tool: carry ["outputs/fashion-mnist"], command "bash benchmarks/gpu_check.sh $OUT", timeout_s 600
#
# The machine needs python3 with torch (CUDA), timm, transformers, numpy, Pillow; not datasets/evaluate, and the
# package need not be installed: PYTHONPATH is set to the repository root here.
#
# Parts (each under its own time limit; a part that fails or times out is reported and the next one runs):
#   info          nvidia-smi -L, torch / CUDA / timm / transformers versions
#   loss          benchmarks/bench_loss.py --device cuda, B = 1024, 4096, 16384 (N = B, K = 256): our B x N loss vs
#                 the materialised B x N x K baseline; peak memory from torch.cuda.max_memory_allocated; the
#                 baseline is skipped by estimate (or caught out of memory) where it does not fit
#   step_eager_bB benchmarks/bench_step.py --device cuda --bf16 --channels-last, SimLAP vs plain cross-entropy step,
#                 ResNet-18 deep stem OS8 at 32x32, batch B in $STEP_BATCHES (default "256 1024")
#   fmnist        benchmarks/gpu_pretrain_fmnist.py: short Fashion-MNIST pretraining at the reference recipe;
#                 online-head and kNN top-1 on the 10k test images, images/s. Epochs: $FMNIST_EPOCHS, else as many
#                 as fit its time limit at the SimLAP step speed measured by step_eager_b256
#   step_compile_bB  the step benchmark again with torch.compile, batch B in $COMPILE_BATCHES (default "256")
#
# Results in OUTDIR: <part>.log (full output), <part>.json (each benchmark's JSON), report.md (all tables and the
# status of every part), summary.json (status and seconds of every part). Exit status 0 when every part passed,
# 1 otherwise.
#
# Environment overrides: GPU_CHECK_DEADLINE_S (total budget in s, default 525), FMNIST_EPOCHS, FMNIST_LIMIT_S
# (default 240), STEP_BATCHES, COMPILE_BATCHES, PYTHON (interpreter; default: python of an active virtual
# environment, else .venv/bin/python when present, else python3).
set -uo pipefail

SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    SMOKE=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke] OUTDIR" >&2
    exit 2
fi
MODE=$([[ "$SMOKE" == 1 ]] && echo cpu-smoke || echo gpu)
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

source "$ROOT/benchmarks/choose_python.sh"

DEADLINE=${GPU_CHECK_DEADLINE_S:-525}  # seconds since the start by which every part has ended
RESERVE=25                              # kept back for the kill grace period (15 s) and the summary
MIN_PART=20                             # a part with less time than this left is skipped
SECONDS=0

# In the smoke test the Python parts run with `datasets` and `evaluate` made unimportable, as on the GPU image.
if [[ "$SMOKE" == 1 ]]; then
    RUNPY=("$PY" -c "import runpy, sys; sys.modules['datasets'] = None; sys.modules['evaluate'] = None; \
sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
else
    RUNPY=("$PY")
fi

NAMES=()
STATES=()
TIMES=()
record() {  # record NAME STATE SECONDS
    NAMES+=("$1")
    STATES+=("$2")
    TIMES+=("$3")
}

# run_part NAME LIMIT_S COMMAND...: run under `timeout`, output to the terminal and OUT/NAME.log, and record it.
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - RESERVE - SECONDS))
    echo
    echo "=== $name ==="
    if ((left < MIN_PART)); then
        echo "skipped: only ${left}s left of the ${DEADLINE}s budget"
        record "$name" "skipped (no time left)" 0
        return
    fi
    ((limit > left)) && limit=$left
    local start=$SECONDS
    {
        echo "limit ${limit}s, started at ${start}s"
        echo "+ $*"
    } | tee "$OUT/$name.log"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    local state=ok
    if ((rc == 124 || rc == 137)); then
        state="timed out (${limit}s)"
    elif ((rc != 0)); then
        state="FAILED (exit $rc)"
    fi
    echo "--- $name: $state in ${took}s"
    record "$name" "$state" "$took"
}

# Epochs of the Fashion-MNIST run that fit TRAIN_S seconds at the SimLAP step speed of step_eager_b256.json.
auto_epochs() {
    local train_s=$1 images=$2
    "$PY" - "$OUT/step_eager_b256.json" "$train_s" "$images" <<'EOF' 2>/dev/null || echo 6
import json, sys
speed = json.load(open(sys.argv[1]))["images_per_s"]["simlap"]
train_s, images = float(sys.argv[2]), int(sys.argv[3])
print(max(1, min(50, int(0.75 * train_s * speed / (3 * images)))))
EOF
}

echo "SimLAP-HF GPU check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), mode $MODE"
echo "repository $ROOT, results in $OUT, python $PY, budget ${DEADLINE}s"

# --- info -----------------------------------------------------------------------------------------------------
show_info() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo "CPUs: $(nproc); /dev/shm: $(df -h /dev/shm 2>/dev/null | awk 'NR == 2 {print $4 " free of " $2}')"
    "$PY" -c "
import platform, torch, timm, transformers
cuda = torch.cuda.is_available()
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, available {cuda}), '
      f'timm {timm.__version__}, transformers {transformers.__version__}')
if cuda:
    p = torch.cuda.get_device_properties(0)
    print(f'device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, '
          f'bf16 {torch.cuda.is_bf16_supported()}')
"
}
export PY
export -f show_info  # `timeout` runs programs, not shell functions
run_part info 60 bash -c show_info

if [[ "$SMOKE" == 1 ]]; then
    DEVICE=cpu
    # B = 64 runs the baseline, B = 256 skips it by estimate (cap 0.3 GiB)
    LOSS_ARGS=(--batch-sizes 64 256 --repeats 2 --warmup 1 --max-baseline-repeats 1 --max-baseline-gib 0.3)
    STEP_ARGS=(--steps 1 --image-size 16 --breakdown-repeats 1)
    STEP_BATCHES=${STEP_BATCHES:-8}
    COMPILE_BATCHES=${COMPILE_BATCHES:-8}
    COMPILE_ARGS=(--compile --compile-backend aot_eager --warmup-steps 1)  # inductor would compile for minutes here
    FMNIST_ARGS=(--max_train_samples 150 --max_test_samples 100 --batch_size 48 --input_size 16 --num_workers 1
        --log_every 2)
    FMNIST_LIMIT_S=${FMNIST_LIMIT_S:-120}
    FMNIST_EPOCHS=${FMNIST_EPOCHS:-1}
    TRAIN_IMAGES=300
else
    DEVICE=cuda
    LOSS_ARGS=(--batch-sizes 1024 4096 16384 --repeats 20 --max-baseline-gib 120)
    STEP_ARGS=(--steps 30 --breakdown-repeats 5)
    STEP_BATCHES=${STEP_BATCHES:-256 1024}
    COMPILE_BATCHES=${COMPILE_BATCHES:-256}
    COMPILE_ARGS=(--compile)
    FMNIST_ARGS=()
    FMNIST_LIMIT_S=${FMNIST_LIMIT_S:-240}
    TRAIN_IMAGES=60000
fi

# --- a. loss ----------------------------------------------------------------------------------------------------
run_part loss 100 "${RUNPY[@]}" benchmarks/bench_loss.py --device "$DEVICE" "${LOSS_ARGS[@]}" --json "$OUT/loss.json"

# --- b. training step, eager --------------------------------------------------------------------------------------
for batch in $STEP_BATCHES; do
    extra=()
    [[ "$batch" == 256 || "$SMOKE" == 1 ]] && extra=(--breakdown)
    run_part "step_eager_b$batch" 75 "${RUNPY[@]}" benchmarks/bench_step.py --device "$DEVICE" --bf16 --channels-last \
        --batch-size "$batch" "${STEP_ARGS[@]}" "${extra[@]}" --json "$OUT/step_eager_b$batch.json"
done

# --- c. Fashion-MNIST pretraining ------------------------------------------------------------------------------
left=$((DEADLINE - RESERVE - SECONDS))
fmnist_limit=$((FMNIST_LIMIT_S < left ? FMNIST_LIMIT_S : left))
overhead=$([[ "$SMOKE" == 1 ]] && echo 40 || echo 60)  # start-up, data loading and evaluation
train_budget=$((fmnist_limit - overhead))
((train_budget < 10)) && train_budget=10
epochs=${FMNIST_EPOCHS:-$(auto_epochs "$train_budget" "$TRAIN_IMAGES")}
echo
echo "Fashion-MNIST: $epochs epoch(s), training time budget ${train_budget}s within a ${fmnist_limit}s limit"
run_part fmnist "$fmnist_limit" "${RUNPY[@]}" benchmarks/gpu_pretrain_fmnist.py --device "$DEVICE" --epochs "$epochs" \
    --time_budget_s "$train_budget" "${FMNIST_ARGS[@]}" --json "$OUT/fmnist.json"

# --- b'. training step with torch.compile (last: compilation takes minutes; it gets the time left, up to 240 s) -----
for batch in $COMPILE_BATCHES; do
    run_part "step_compile_b$batch" 240 "${RUNPY[@]}" benchmarks/bench_step.py --device "$DEVICE" --bf16 \
        --channels-last --batch-size "$batch" "${STEP_ARGS[@]}" "${COMPILE_ARGS[@]}" \
        --json "$OUT/step_compile_b$batch.json"
done

# --- summary ----------------------------------------------------------------------------------------------------
failures=0
{
    echo "# SimLAP-HF GPU check (mode $MODE)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), total ${SECONDS}s"
    echo
    echo '```'
    grep -v '^+ \|^limit ' "$OUT/info.log" 2>/dev/null
    echo '```'
    echo
    echo "| part | status | seconds |"
    echo "|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${STATES[$i]} | ${TIMES[$i]} |"
    done
    for name in "${NAMES[@]}"; do
        [[ "$name" == info || ! -f "$OUT/$name.log" ]] && continue
        echo
        echo "## $name"
        echo
        echo '```'
        grep -m1 '^+ ' "$OUT/$name.log"
        echo '```'
        echo
        grep -E '^\||overhead|Targets|out of memory|stopped early|Note:|Error|error:' "$OUT/$name.log" |
            grep -v '^W[0-9]'
    done
} >"$OUT/report.md"
{
    echo "{"
    echo "  \"mode\": \"$MODE\","
    echo "  \"total_s\": $SECONDS,"
    echo "  \"parts\": ["
    for i in "${!NAMES[@]}"; do
        [[ "${STATES[$i]}" == ok ]] || failures=$((failures + 1))
        sep=$([[ $i -lt $((${#NAMES[@]} - 1)) ]] && echo "," || echo "")
        echo "    {\"name\": \"${NAMES[$i]}\", \"status\": \"${STATES[$i]}\", \"seconds\": ${TIMES[$i]}}$sep"
    done
    echo "  ]"
    echo "}"
} >"$OUT/summary.json"

echo
echo "=== summary (${SECONDS}s) ==="
echo "| part | status | seconds |"
echo "|---|---|---|"
for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATES[$i]} | ${TIMES[$i]} |"
done
echo "report: $OUT/report.md, $OUT/summary.json, logs and JSON per part in $OUT"
((failures == 0))
