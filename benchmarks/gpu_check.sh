#!/usr/bin/env bash
# One GPU check of SimLAP-HF, sized for a lent machine (one H200) and a run of under 9 minutes.
#
# Usage, from anywhere (it changes to the repository root):
#   bash benchmarks/gpu_check.sh OUTDIR               # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke OUTDIR   # every part on the CPU with tiny sizes (a few minutes), to catch
#                                                     # errors before spending device time (or GPU_CHECK_CPU_SMOKE=1)
#
# Preparing the run (the repository is copied to the GPU machine and run from its root; outputs/ is git-ignored,
# so the Fashion-MNIST files travel as a carried path):
#   mkdir -p outputs/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz outputs/fashion-mnist/
#   device tool: carry ["outputs/fashion-mnist"], command "GPU_CHECK_WORK=/tmp/gpu_check bash benchmarks/gpu_check.sh
#   $OUT", timeout_s 600 (the logs and runs stay there; OUT gets the report and the JSON)
#
# The machine needs python3 with torch (CUDA), timm, transformers, numpy, Pillow; not datasets/evaluate, and the
# package need not be installed: PYTHONPATH is set to the repository root here.
#
# Parts (each under its own time limit; a part that fails or times out is reported and the next one runs; a part
# with under 20 s of the budget left is skipped, so the order is the priority):
#   info                   nvidia-smi -L, torch / CUDA / timm / transformers versions
#   pretrain_bf16          train_pretrain.py with configs/pretrain_cifar10_resnet18.yaml (the seed's recipe: ResNet-18
#                          deep stem, output stride 8, 32 px, batch 255, ra 3) on Fashion-MNIST, bf16, channels-last,
#                          TF32, cuDNN autotuning; $EPOCHS epochs (default 3), evaluated at the end
#   pretrain_compile_bf16  the same for 1 epoch with --torch_compile (early, so that compilation has its time)
#   plain_bf16             train_finetune.py --from_scratch with configs/finetune_cifar10_resnet18.yaml: the plain
#                          cross-entropy step on the same backbone, 1 epoch
#   pretrain_fp16, plain_fp16   the same with fp16 (GradScaler), 1 epoch each
#   throughput_bf16/_fp16  benchmarks/train_throughput.py over those runs: images/s, time waiting for data, the step's
#                          consumption against the training loader's delivery, FLOPs per image and achieved TFLOP/s
#                          against a timed matrix product and the datasheet peak
#   loss                   benchmarks/bench_loss.py --device cuda, B = 1024, 4096, 16384 (N = B, K = 256): our B x N
#                          loss vs the materialised B x N x K baseline, peak memory; the baseline is skipped by
#                          estimate (or caught out of memory) where it does not fit
#
# Results: report.md (all tables and the status of every part) and summary.json (status and seconds of every part) in
# OUTDIR; <part>.log (full output), <part>.json (the benchmarks' JSON) and runs/<part>/ (each training run's output
# folder) in $GPU_CHECK_WORK (default OUTDIR), the throughput JSON copied to OUTDIR. Exit status 0 when every part
# passed, 1 otherwise.
#
# Environment overrides: GPU_CHECK_DEADLINE_S (total budget in s, default 525), GPU_CHECK_WORK, EPOCHS, SIMLAP_FASHION_MNIST_DIR,
# PYTHON (interpreter; default: python of an active virtual environment, else .venv/bin/python when present, else
# python3).
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
# Logs, JSON and the training runs' folders; OUT gets report.md, summary.json and the throughput JSON (few files, for
# tools that bring back only a handful).
WORK=${GPU_CHECK_WORK:-$OUT}
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd)
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
    } | tee "$WORK/$name.log"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$WORK/$name.log"
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
    TRAIN_BATCH=12
    TRAIN_ARGS=(--max_train_samples 48 --max_eval_samples 24 --per_device_train_batch_size "$TRAIN_BATCH"
        --per_device_eval_batch_size 24 --input_size 16 --dataloader_num_workers 0 --model_name resnet10t)
    EPOCHS=${EPOCHS:-1}
    COMPILE_BACKEND=aot_eager  # inductor would compile for minutes here
else
    DEVICE=cuda
    LOSS_ARGS=(--batch-sizes 1024 4096 16384 --repeats 20 --max-baseline-gib 120)
    TRAIN_BATCH=255
    TRAIN_ARGS=()
    EPOCHS=${EPOCHS:-3}
    COMPILE_BACKEND=inductor
fi

# Fashion-MNIST: the carried copy of the IDX files (see the top), else where the environment or the package says.
if [[ -z "${SIMLAP_FASHION_MNIST_DIR:-}" && -d "$ROOT/outputs/fashion-mnist" ]]; then
    export SIMLAP_FASHION_MNIST_DIR="$ROOT/outputs/fashion-mnist"
fi

# --- training runs: the real train_pretrain.py (SimLAP) and train_finetune.py --from_scratch (plain cross-entropy) --
# The seed's CIFAR-10 ResNet-18 recipes (deep stem, output stride 8, 32 px, batch 256 -> 255 with ra 3) on
# Fashion-MNIST (IDX arrays: no datasets/evaluate needed), a few epochs each; bf16 and fp16; TF32, cuDNN autotuning
# and channels-last on. Each writes all_results.json with images/s and the time it waited for data.
RUNS="$WORK/runs"
mkdir -p "$RUNS"
PRETRAIN=(train_pretrain.py configs/pretrain_cifar10_resnet18.yaml --dataset_name fashion_mnist --channels_last
    --tf32 --cudnn_benchmark --warmup_epochs 0 --logging_steps 50 --report_to none "${TRAIN_ARGS[@]}")
PLAIN=(train_finetune.py configs/finetune_cifar10_resnet18.yaml --dataset_name fashion_mnist --from_scratch
    --model_name resnet18 --stem_type deep --output_stride 8 --model_name_or_path "" --channels_last --tf32
    --cudnn_benchmark --warmup_epochs 0 --logging_steps 50 --report_to none "${TRAIN_ARGS[@]}")
train_part() {  # train_part NAME LIMIT_S EPOCHS COMMAND...: one training run into $RUNS/NAME, evaluated at its end
    local name=$1 limit=$2 epochs=$3
    shift 3
    run_part "$name" "$limit" "${RUNPY[@]}" "$@" --num_train_epochs "$epochs" --eval_every "$epochs" \
        --checkpointing_epochs "$epochs" --output_dir "$RUNS/$name" --overwrite_output_dir
}
train_part pretrain_bf16 120 "$EPOCHS" "${PRETRAIN[@]}" --mixed_precision bf16
# torch.compile early, so that its compilation (minutes) has the time it needs.
train_part pretrain_compile_bf16 150 1 "${PRETRAIN[@]}" --mixed_precision bf16 --torch_compile \
    --torch_compile_backend "$COMPILE_BACKEND"
train_part plain_bf16 60 1 "${PLAIN[@]}" --mixed_precision bf16
train_part pretrain_fp16 60 1 "${PRETRAIN[@]}" --mixed_precision fp16
train_part plain_fp16 60 1 "${PLAIN[@]}" --mixed_precision fp16

# --- throughput: images/s, waiting for data, the loader alone, TFLOP/s against the chip's peak ------------------
for precision in bf16 fp16; do
    runs=()
    for name in pretrain_$precision pretrain_compile_$precision plain_$precision; do
        [[ -f "$RUNS/$name/all_results.json" ]] && runs+=("${name/pretrain/simlap}=$RUNS/$name")
    done
    ((${#runs[@]})) || continue
    run_part "throughput_$precision" 60 "${RUNPY[@]}" benchmarks/train_throughput.py --device "$DEVICE" \
        --precision "$precision" --batch-size "$TRAIN_BATCH" "${runs[@]}" --json "$WORK/throughput_$precision.json" \
        -- "${PRETRAIN[@]:1}" --mixed_precision "$precision"
done

# --- the loss alone, at up to 16k keys, when time is left ---------------------------------------------------------
run_part loss 80 "${RUNPY[@]}" benchmarks/bench_loss.py --device "$DEVICE" "${LOSS_ARGS[@]}" --json "$WORK/loss.json"

# --- summary ----------------------------------------------------------------------------------------------------
failures=0
{
    echo "# SimLAP-HF GPU check (mode $MODE)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), total ${SECONDS}s"
    echo
    echo '```'
    grep -v '^+ \|^limit ' "$WORK/info.log" 2>/dev/null
    echo '```'
    echo
    echo "| part | status | seconds |"
    echo "|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${STATES[$i]} | ${TIMES[$i]} |"
    done
    for name in "${NAMES[@]}"; do
        [[ "$name" == info || ! -f "$WORK/$name.log" ]] && continue
        echo
        echo "## $name"
        echo
        echo '```'
        grep -m1 '^+ ' "$WORK/$name.log"
        echo '```'
        echo
        grep -E '^\||overhead|Targets|out of memory|stopped early|Note:|Error|error:' "$WORK/$name.log" |
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
[[ "$WORK" != "$OUT" ]] && cp "$WORK"/throughput_*.json "$OUT"/ 2>/dev/null
echo "report: $OUT/report.md, $OUT/summary.json; logs, JSON and training runs per part in $WORK"
((failures == 0))
