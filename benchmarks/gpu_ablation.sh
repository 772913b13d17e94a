#!/usr/bin/env bash
# The ablation of the authors' later SimLAP formulation (README "Results"), on one GPU machine in a few minutes:
# every (variant, seed) of `reproduce.py --variants ablation` on the Fashion-MNIST budget
# benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml runs as its own reproduce.py process, all at once (the runs are
# small: the GPU is shared, the CPU cores do the augmentation), then one more call gathers them into results.md,
# results.json and results.png. Afterwards the loss benchmark runs on the GPU for every loss form.
#
# Usage, from anywhere (it changes to the repository root):
#   bash benchmarks/gpu_ablation.sh OUTDIR            # on the GPU machine
#   bash benchmarks/gpu_ablation.sh --smoke OUTDIR    # the same on the CPU with 1 epoch of 96 images (a check)
#
# The machine needs python3 with torch, timm, transformers, accelerate, scikit-learn, matplotlib and PyYAML; not
# datasets or evaluate (Fashion-MNIST and digits are array sources). Fashion-MNIST's IDX files are read from
# $SIMLAP_FASHION_MNIST_DIR (default: the Debian package's folder). Environment overrides: PYTHON, ABLATION_WORK
# (the runs' folders and logs, default OUTDIR/runs), ABLATION_SEEDS (default "0 1"), ABLATION_VARIANTS (default: the
# reproduce.py group "ablation"), ABLATION_WORKERS (loader workers per run, default 1), ABLATION_DEADLINE_S (runs
# still going then are stopped and the table is not gathered; default 420). Exit status 0 when every run finished and the table was gathered.
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_ablation.sh [--smoke] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
WORK=${ABLATION_WORK:-$OUT/runs}
SEEDS=${ABLATION_SEEDS:-0 1}
WORKERS=${ABLATION_WORKERS:-1}
DEADLINE=${ABLATION_DEADLINE_S:-420}
BUDGET=benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs" || exit 2

OVERRIDES=()
if [[ "$SMOKE" == 1 ]]; then
    OVERRIDES=(--override num_train_epochs=1 eval_every=1 warmup_epochs=0 max_train_samples=96 max_eval_samples=48)
fi
common=("$BUDGET" --output_dir "$WORK" --threads 1 --workers "$WORKERS" "${OVERRIDES[@]}")

variants=${ABLATION_VARIANTS:-$("$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); \
from reproduce import VARIANT_GROUPS; print(' '.join(VARIANT_GROUPS['ablation']))")} || exit 1
echo "variants: $variants; seeds: $SEEDS"
"$PYTHON" - <<'EOF'
import platform, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
print(f"torch {torch.__version__}, device: {name}")
EOF

start=$(date +%s)
pids=()
for seed in $SEEDS; do
    for variant in $variants; do
        "$PYTHON" benchmarks/reproduce.py "${common[@]}" --variants "$variant" --seeds "$seed" \
            >"$WORK/logs/${variant}_seed${seed}.log" 2>&1 &
        pids+=($!)
    done
done
# Runs still going after ABLATION_DEADLINE_S are stopped; what finished is still gathered and packed.
( sleep "$DEADLINE"; kill "${pids[@]}" 2>/dev/null ) &
watchdog=$!
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=$((failed + 1))
done
kill "$watchdog" 2>/dev/null
echo "runs: ${#pids[@]}, failed: $failed, wall: $(($(date +%s) - start)) s"
for log in "$WORK"/logs/*.log; do
    if ! grep -q '"variant"' "$log"; then
        echo "--- $(basename "$log") (no result) ---"
        tail -n 15 "$log"
    fi
done

# Every run's metrics and log, packed (they can be gathered elsewhere with reproduce.py on a folder holding them).
tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.onnx' . 2>/dev/null
# Gather the finished runs into one table (only when every run finished: reproduce.py trains what is missing).
gathered=1
if [[ "$failed" == 0 ]]; then
    "$PYTHON" benchmarks/reproduce.py "${common[@]}" --variants $variants --seeds $SEEDS >"$WORK/logs/gather.log" 2>&1
    gathered=$?
fi
cp "$WORK"/results.md "$WORK"/results.json "$WORK"/results.png "$OUT"/ 2>/dev/null
cat "$OUT/results.md" 2>/dev/null || tail -n 20 "$WORK/logs/gather.log"

if [[ "$SMOKE" == 1 ]]; then
    loss_sizes=(--batch-sizes 64 --quick --no-memory)
    device=cpu
else
    loss_sizes=(--batch-sizes 768 4096)
    device=cuda
fi
"$PYTHON" benchmarks/bench_loss.py --device "$device" --forms reference fastssl cosine_options "${loss_sizes[@]}" \
    --json "$OUT/bench_loss.json" >"$OUT/bench_loss.txt" 2>&1 || echo "bench_loss failed (see bench_loss.txt)"
tail -n 30 "$OUT/bench_loss.txt"
echo "total wall: $(($(date +%s) - start)) s"
[[ "$failed" == 0 && "$gathered" == 0 ]]
