#!/usr/bin/env bash
# One command for a fresh CUDA machine (torch, transformers, triton, numpy, pytest; no network):
# install what it lacks from the wheels in .whl/ (scripts/fetch_gpu_wheels.sh downloads them; the
# run must carry .whl/), run the gpu tests, then `ragkv bench gpu`; everything lands under $OUT
# (default ./gpu-out): env.txt, pytest-gpu.txt/.xml, bench_gpu.txt/.json, summary.json.
# Budget: about 6 minutes (pytest 150 s, bench 330 s at most).
#   bash scripts/gpu_check.sh             # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run   # on CPU: same steps, tiny shapes, no wheel install
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-out}"
DRY=0
BENCH_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) BENCH_ARGS+=("$arg") ;;  # passed on to bench_gpu.py (e.g. --chunks 10,20)
  esac
done
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
T0=$(date +%s)

# 1. Dependencies: the wheels go into their own folder, first on PYTHONPATH (same versions as CI).
SITE="${RAGKV_GPU_SITE:-${TMPDIR:-/tmp}/ragkv-site}"
if [ "$DRY" = 0 ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$ROOT"/.whl/*.whl 2>&1 | tail -3
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$DRY" = 0 ]; then
  echo "warning: no wheels in $ROOT/.whl (run scripts/fetch_gpu_wheels.sh where there is network)" >&2
fi
# 2. `import ragkv` from this checkout: the repository root is the package.
PKG="$(mktemp -d)"
ln -s "$ROOT" "$PKG/ragkv"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
cd "$ROOT"

{
  date -u
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, transformers, ragkv; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('transformers', transformers.__version__); print('ragkv from', ragkv.__file__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 3. The gpu tests (skipped cleanly without CUDA: the dry run checks that they import and collect).
timeout 150 "$PY" -m pytest -m gpu tests/test_gpu.py tests/test_storage_contract.py -q -p no:cacheprovider \
  -W ignore::UserWarning -W ignore::FutureWarning --durations=10 --junitxml="$OUT/pytest-gpu.xml" > "$OUT/pytest-gpu.txt" 2>&1
PYTEST_RC=$?
tail -25 "$OUT/pytest-gpu.txt"

# 4. The benchmark (it saves its JSON after every row, so a cut-short run keeps what it measured).
if [ "$DRY" = 1 ]; then BENCH_ARGS=(--dry-run "${BENCH_ARGS[@]}"); fi
timeout 330 "$PY" benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" "${BENCH_ARGS[@]}" > "$OUT/bench_gpu.txt" 2>&1
BENCH_RC=$?
cat "$OUT/bench_gpu.txt"

rm -rf "$PKG"
cat > "$OUT/summary.json" <<JSON
{"dry_run": $DRY, "pytest_rc": $PYTEST_RC, "bench_rc": $BENCH_RC, "seconds": $(( $(date +%s) - T0 ))}
JSON
cat "$OUT/summary.json"
[ "$PYTEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
