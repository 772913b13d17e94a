#!/usr/bin/env bash
# Run the CPU benchmarks of SimLAP-HF in sequence and print their markdown tables:
#   1. benchmarks/bench_loss.py  our B x N SimLAP loss vs the materialised B x N x K baseline (time, peak memory)
#   2. benchmarks/bench_data.py  input pipeline throughput (decode + augment + collate) per loader worker count
#   3. benchmarks/bench_step.py  SimLAP training step vs a plain cross-entropy step (images/s, overhead)
#
# Usage, from anywhere (it changes to the repository root):
#   bash benchmarks/run_all.sh [--quick] [--out DIR]
#     --quick    passed to every benchmark (fewer repetitions, smaller sizes; a few minutes on 2 busy cores)
#     --out DIR  results folder (default outputs/benchmarks, relative to the repository root): loss.json,
#                data.json, step.json, one .log per benchmark (full output) and report.md (all tables)
#
# Interpreter: `python` of the active virtual environment, else .venv/bin/python when present, else python3
# (override with PYTHON=...). Each command is echoed before it runs. The benchmarks need the package importable
# (bench_data.py also needs `datasets`); the repository root is put on PYTHONPATH.
set -euo pipefail

QUICK=()
OUT=outputs/benchmarks
while [[ $# -gt 0 ]]; do
    case "$1" in
    --quick)
        QUICK=(--quick)
        shift
        ;;
    --out)
        [[ $# -ge 2 ]] || { echo "--out needs a folder" >&2; exit 2; }
        OUT=$2
        shift 2
        ;;
    --out=*)
        OUT=${1#--out=}
        shift
        ;;
    -h | --help)
        sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown option: $1 (usage: bash benchmarks/run_all.sh [--quick] [--out DIR])" >&2
        exit 2
        ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

source "$ROOT/benchmarks/choose_python.sh"

# run NAME COMMAND...: echo the command, run it with its output to the terminal and OUT/NAME.log.
run() {
    local name=$1
    shift
    echo
    echo "=== $name ==="
    echo "+ $*" | tee "$OUT/$name.log"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$OUT/$name.log"
    echo "--- $name done in $((SECONDS - start))s"
}

echo "SimLAP-HF CPU benchmarks: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), python $PY, $(nproc) CPUs, results in $OUT"
run loss "$PY" benchmarks/bench_loss.py "${QUICK[@]}" --json "$OUT/loss.json"
run data "$PY" benchmarks/bench_data.py "${QUICK[@]}"
run step "$PY" benchmarks/bench_step.py "${QUICK[@]}" --json "$OUT/step.json"

# bench_data.py prints its table only: turn the table (and its header comments) into data.json.
"$PY" - "$OUT/data.log" "$OUT/data.json" <<'EOF'
import json, sys

lines = open(sys.argv[1]).read().splitlines()
rows = []
for line in lines:
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(cells) == 3 and cells[0].isdigit():
        rows.append({
            "workers": int(cells[0]),
            "images_per_s": float(cells[1].replace(",", "")),
            "ratio_vs_0_workers": float(cells[2].rstrip("x")),
        })
command = next((line[2:] for line in lines if line.startswith("+ ")), None)
notes = [line[2:] for line in lines if line.startswith("# ")]
json.dump({"command": command, "notes": notes, "rows": rows}, open(sys.argv[2], "w"), indent=2)
EOF

{
    echo "# SimLAP-HF CPU benchmarks"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) CPUs, total ${SECONDS}s${QUICK:+, --quick}"
    for name in loss data step; do
        echo
        echo "## $name"
        echo
        echo '```'
        grep -m1 '^+ ' "$OUT/$name.log"
        echo '```'
        echo
        grep -E '^\||overhead|Targets|out of memory|load average' "$OUT/$name.log" || true
    done
} >"$OUT/report.md"

echo
echo "=== tables (${SECONDS}s in all) ==="
cat "$OUT/report.md"
echo
echo "results: $OUT/{loss,data,step}.json, $OUT/report.md, one .log per benchmark"
