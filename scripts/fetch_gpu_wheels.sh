#!/usr/bin/env bash
# Download, on a machine with network, the wheels a stock CUDA machine (torch, transformers, triton,
# numpy, pytest) lacks for `scripts/gpu_check.sh`, into the git-ignored .whl/ folder (CPython 3.12,
# manylinux x86_64; pure-Python wheels where there are no binaries). Pinned to the versions CI tests.
# transformers and its hub/tokenizer stack are shipped too, so the GPU run uses the same transformers
# as CI whatever the machine has. The GPU session must carry .whl/ (run tool: carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACKAGES=(
  lz4==4.4.5 constriction==0.5.0 SQLAlchemy==2.1.9 greenlet==3.5.6 faiss-cpu==1.15.1
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3
  python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  anyio==4.16.0 sniffio==1.3.1 prometheus_client==0.26.0 gguf==0.19.0 uvicorn==0.54.0 h11==0.16.0
  click==8.5.1 httpx==0.28.1 httpcore==1.0.9 certifi==2026.10.19.post1 idna==3.20 tqdm==4.70.1 pypdf==7.1.1
  transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0 regex==2026.11.19
  accelerate==1.15.0 psutil==7.2.2 opentelemetry-api==1.45.2
  # what transformers 5 and huggingface_hub 2 import
  typer==0.29.2 shellingham==1.5.4 rich==15.0.0 annotated-doc==0.0.7 markdown-it-py==4.3.0 mdurl==0.1.2
  pygments==2.21.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 hf-xet==1.8.0 fsspec==2026.9.0
  filelock==4.3.1 packaging==26.4 pyyaml==6.0.4
)
mkdir -p .whl
for spec in "${PACKAGES[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
du -sh .whl
ls .whl
