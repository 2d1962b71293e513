#!/usr/bin/env bash
# The GPU check: on a CUDA machine, from the source tree, with nothing installed.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # or without OUT: results go to benchmarks/results/
#
# Stages (each under its own timeout, all inside GPU_CHECK_BUDGET_S seconds, default 470 = under 8 minutes):
#   1. nvidia-smi and library versions
#   2. pytest -m gpu -x -q                       (the correctness tests on CUDA)
#   3. python -m benchmarks.run --suite quick     (attention N=1k/4k/16k + vocabulary KL/CE at the target sizes)
#   4. python -m benchmarks.report               (markdown + PNGs; the README is not touched here)
#   5. python -m benchmarks.compile_report       (when the script exists)
#   6. attention-map KL (N = 1k/4k), end-to-end epoch and the long-context benchmark (one muse-books ASU step
#      at doubling N on a Llama-3.2-1B-shape model, ours against the authors' pipeline shape, until out of
#      memory: the longest context that fits is the headline), each only if the remaining budget allows
#   7. the report again, then copy to $OUT: gpu_check.log, the CSV, the markdown reports, plots.tar.gz
# Every benchmark stage appends to one CSV that is rewritten after each measurement, so a stage stopped by
# its timeout keeps what it measured. The exit status is 1 when a test or benchmark stage failed.
#
# GPU_CHECK_DEVICE=cpu runs the same stages on the CPU at the smallest sizes: a dry run of this script.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
if [[ "$DEVICE" == cpu ]]; then
  SIZE=(--device cpu --tiny --threads 1)
else
  SIZE=(--device "$DEVICE")
  unset TRITON_INTERPRET # the real kernels, not the interpreter
fi
START=$(date +%s)
STAMP=$(date -u +%Y%m%d-%H%M%S)

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  DEST="$OUT"
  RES="$(mktemp -d)"
else
  DEST="benchmarks/results"
  RES="benchmarks/results"
fi
mkdir -p "$RES"
LOG="$DEST/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

FAILED=()
left() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME MAX_SECONDS RESERVE_SECONDS CMD...: run CMD under min(MAX, time left - RESERVE); never aborts the script.
stage() {
  local name=$1 max=$2 reserve=$3
  shift 3
  local t
  t=$(($(left) - reserve))
  ((t > max)) && t=$max
  if ((t < 20)); then
    echo "=== $name: skipped, only $(left) s of the budget left"
    return 0
  fi
  echo "=== $name (timeout ${t} s, $(left) s of the budget left)"
  local rc=0
  timeout --signal=TERM --kill-after=15 "$t" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "=== $name: stopped by its ${t} s timeout"
  elif ((rc != 0)); then
    echo "=== $name: exit status $rc"
  fi
  return "$rc"
}

echo "=== gpu_check $(date -u +%FT%TZ) in $PWD, budget ${BUDGET} s, results in $DEST"
if command -v nvidia-smi >/dev/null; then nvidia-smi || true; else echo "nvidia-smi not found"; fi
GPU_CHECK_DEVICE="$DEVICE" "$PY" - <<'EOF'
import importlib, os, platform, sys
import torch
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda})")
for name in ("triton", "transformers", "numpy", "matplotlib", "flash_attn", "flash_attn_interface", "liger_kernel"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', 'present')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not available ({type(e).__name__})")
if os.environ["GPU_CHECK_DEVICE"] == "cpu":
    print("dry run on the CPU (GPU_CHECK_DEVICE=cpu)")
elif not torch.cuda.is_available():
    sys.exit("no CUDA device visible: the GPU check needs one (GPU_CHECK_DEVICE=cpu for a dry run)")
else:
    print("device:", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
EOF

CSV="$RES/bench-gpu-check-$STAMP.csv"

rc=0
stage "pytest -m gpu" 130 300 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider || rc=$?
if ((rc != 0 && rc != 5)); then FAILED+=("pytest($rc)"); fi # 5 = no test collected

stage "quick suite" 230 70 "$PY" -m benchmarks.run --suite quick "${SIZE[@]}" --csv "$CSV" || FAILED+=("quick")
stage "report" 40 10 "$PY" -m benchmarks.report --results "$RES" --no-readme || FAILED+=("report")
if [[ "$DEVICE" == cpu ]]; then
  echo "=== compile report: skipped in the CPU dry run (make compile-report runs it)"
elif [[ -f benchmarks/compile_report.py ]]; then
  stage "compile report" 60 20 "$PY" -m benchmarks.compile_report --jobs "$(nproc)" --out "$RES/compile_report.md" ||
    FAILED+=("compile_report")
else
  echo "=== compile report: benchmarks/compile_report.py not present, skipped"
fi
# Optional stages: a timeout is not a failure (what was measured is kept), an error is.
if (($(left) > 170)); then
  stage "attention KL" 60 110 "$PY" -m benchmarks.run --only attention_kl --suite quick "${SIZE[@]}" --csv "$CSV" ||
    { rc=$?; ((rc == 124 || rc == 137)) || FAILED+=("attention_kl"); }
fi
if (($(left) > 110)); then
  stage "e2e epoch" 90 45 "$PY" -m benchmarks.run --only e2e "${SIZE[@]}" --csv "$CSV" ||
    { rc=$?; ((rc == 124 || rc == 137)) || FAILED+=("e2e"); }
fi
if (($(left) > 80)); then
  # The search starts no trial in the last 60 s before the stage's timeout (model set-up, one last trial).
  ctx_budget=$(($(left) - 35 - 60))
  ((ctx_budget > 180)) && ctx_budget=180
  if [[ "$DEVICE" == cpu ]]; then
    LC=(--device cpu --model small-llama --lengths 256 --pipelines ours,authors --cap-gb 8)
  else
    LC=(--device cuda --model llama-1b-shape --pipelines authors,ours --max-tokens 131072)
  fi
  stage "long context" 240 35 "$PY" -m benchmarks.long_context "${LC[@]}" --budget-s "$ctx_budget" \
    --out "$RES/long-context" ||
    { rc=$?; ((rc == 124 || rc == 137)) || FAILED+=("long_context"); }
  # On the GPU its rows are the report's longest-context section (rows written before a timeout included).
  if [[ "$DEVICE" != cpu && -f "$RES/long-context/results.csv" ]]; then
    cp "$RES/long-context/results.csv" "$RES/bench-long-context-$STAMP.csv"
  fi
fi
stage "report (final)" 30 0 "$PY" -m benchmarks.report --results "$RES" --no-readme || FAILED+=("report")

if [[ -n "${OUT:-}" ]]; then
  # At most a handful of files come back from $OUT: the log, the CSV, the markdown and one tarball of plots.
  cp "$RES"/*.csv "$RES"/*.md "$OUT"/ 2>/dev/null || true # results markdown + compile_report.md
  if [[ "$DEVICE" == cpu && -f "$RES/long-context/results.md" ]]; then
    cp "$RES/long-context/results.md" "$OUT/long-context.md"
  fi
  if compgen -G "$RES/*.png" >/dev/null; then
    tar -czf "$OUT/plots.tar.gz" -C "$RES" $(cd "$RES" && ls *.png)
  fi
fi
echo "=== done in $(($(date +%s) - START)) s; files in $DEST:"
ls -l "$DEST"
if ((${#FAILED[@]})); then
  echo "=== FAILED stages: ${FAILED[*]}"
  exit 1
fi
echo "=== all stages passed"
