#!/usr/bin/env bash
# One command for a fresh CUDA machine (torch, transformers, triton, numpy, pytest; no network): install
# what it lacks from the wheels in .whl/ (scripts/fetch_gpu_wheels.sh downloads them; the run must carry
# .whl/), then run the steps below, each under its own time limit, everything under $OUT (default
# ./gpu-out): env.txt, STEP.txt per step, the JSON each writes, and summary.json (every step's rc and
# seconds). A step that fails or times out does not stop the others.
# Budget: about 8.5 minutes of device time (the limits below add up to 510 s). FlexAttention compiles once
# per bucket of shapes (models/attention.py), in the bench's warm-up runs: the first rows of each size pay it.
#   bash scripts/gpu_check.sh                      # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run            # on CPU: same steps, tiny shapes, no wheel install
#   bash scripts/gpu_check.sh --only kernels,encode # some steps only (names: --list)
#   bash scripts/gpu_check.sh -- --chunks 10,20    # arguments after -- go to bench_gpu.py
# To add a step: a branch in step_command (CMD=(...), writing under "$OUT") and "NAME LIMIT_S" in STEPS.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-out}"
DRY=0
LIST=0
ONLY=""
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    --list) LIST=1 ;;
    --) shift; BENCH_ARGS+=("$@"); break ;;
    *) BENCH_ARGS+=("$1") ;;  # passed on to bench_gpu.py (e.g. --chunks 10,20)
  esac
  shift
done
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
T0=$(date +%s)

# name and time limit (s) of every step, in order
STEPS=(
  "pytest_gpu 85"    # CPU-vs-CUDA parity of every strategy, family, tier and mask kind (tests/test_gpu.py)
  "kernels 60"       # every Triton kernel against its torch reference, compiled (interpreted in the dry run)
  "encode 40"        # packed encode GB/s: fused vs the reference, same bytes (benchmarks/gpu_encode.py)
  "bench 150"        # TTFT table, codec GB/s, precompute (benchmarks/bench_gpu.py; JSON kept row by row)
  "load 75"          # 8 x 5K-token requests: the default strategy batched vs batched full prefill (bench_gpu_load.py)
  "handoff_tests 30" # the fused-KV hand-off's CUDA cases (tests/test_gpu_handoff.py)
  "handoff 70"       # producer -> connector hand-off per path, blend + hand-off vs HF (benchmarks/bench_handoff.py)
)

# CMD=(the command of step $1): one branch per step
step_command() {
  case "$1" in
    pytest_gpu) CMD=("$PY" -m pytest -m gpu tests/test_gpu.py tests/test_storage_contract.py -q -p no:cacheprovider
      -W ignore::UserWarning -W ignore::FutureWarning --durations=10 --junitxml="$OUT/pytest-gpu.xml") ;;
    kernels) CMD=("$PY" -m pytest tests/test_codec_int8_rows.py tests/test_packed_encode.py tests/test_codec_device.py
      tests/test_rerotate_kernel.py tests/test_flex_buckets.py tests/test_layer_reads.py -q -p no:cacheprovider
      -W ignore::UserWarning -W ignore::FutureWarning --junitxml="$OUT/pytest-kernels.xml") ;;
    encode) if [ "$DRY" = 1 ]; then
        CMD=("$PY" benchmarks/gpu_encode.py --device cpu --shape tiny --tokens 64 --repeats 1 --out "$OUT/gpu_encode.json")
      else
        CMD=("$PY" benchmarks/gpu_encode.py --device cuda --shape llama-3.1-8b --tokens 512,2048 --out "$OUT/gpu_encode.json")
      fi ;;
    bench) CMD=("$PY" benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json")
      if [ "$DRY" = 1 ]; then CMD+=(--dry-run); fi
      CMD+=("${BENCH_ARGS[@]}") ;;
    load) CMD=("$PY" benchmarks/bench_gpu_load.py --out "$OUT/bench_gpu_load.json")
      if [ "$DRY" = 1 ]; then CMD+=(--dry-run); fi ;;
    handoff_tests) CMD=("$PY" -m pytest -m gpu tests/test_gpu_handoff.py -q -p no:cacheprovider) ;;
    handoff) CMD=("$PY" benchmarks/bench_handoff.py --out "$OUT/bench_handoff.json")
      if [ "$DRY" = 1 ]; then CMD+=(--dry-run); fi ;;
    *) echo "unknown step $1" >&2; return 1 ;;
  esac
}

if [ "$LIST" = 1 ]; then printf '%s\n' "${STEPS[@]}"; exit 0; fi
for entry in "${STEPS[@]}"; do step_command "${entry%% *}" || exit 2; done  # every step has a command

# 1. Dependencies: the wheels go into their own folder, first on PYTHONPATH (same versions as CI).
SITE="${RAGKV_GPU_SITE:-${TMPDIR:-/tmp}/ragkv-site}"
if [ "$DRY" = 0 ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$ROOT"/.whl/*.whl 2>&1 | tail -3
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$DRY" = 0 ]; then
  echo "warning: no wheels in $ROOT/.whl (run scripts/fetch_gpu_wheels.sh where there is network)" >&2
fi
# 2. `import ragkv` from this checkout (the repository root is the package); benchmarks/ for their helpers.
PKG="$(mktemp -d)"
ln -s "$ROOT" "$PKG/ragkv"
export PYTHONPATH="$PKG:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; fi  # kernels run in the interpreter on CPU
cd "$ROOT"

{
  date -u
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, transformers, ragkv; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('transformers', transformers.__version__); print('ragkv from', ragkv.__file__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 3. The steps: each under `timeout`, its output in STEP.txt, its rc and seconds in summary.json.
RESULTS=""
FAILED=0
for entry in "${STEPS[@]}"; do
  read -r name limit <<< "$entry"
  if [ "$DRY" = 1 ]; then limit=$((limit * 6)); fi  # interpreted kernels on a shared CPU: far slower than the GPU
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  start=$(date +%s)
  echo "== $name (at most ${limit} s)"
  step_command "$name" || exit 2
  timeout "$limit" "${CMD[@]}" > "$OUT/$name.txt" 2>&1
  rc=$?
  tail -25 "$OUT/$name.txt"
  [ "$rc" = 0 ] || FAILED=1
  RESULTS="$RESULTS${RESULTS:+, }\"$name\": {\"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit_s\": $limit}"
done

rm -rf "$PKG"
cat > "$OUT/summary.json" <<JSON
{"dry_run": $DRY, "steps": {$RESULTS}, "seconds": $(( $(date +%s) - T0 ))}
JSON
cat "$OUT/summary.json"
[ "$FAILED" = 0 ]
