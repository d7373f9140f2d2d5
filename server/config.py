"""EngineConfig: the composed configuration of an Engine (model, devices, cache, blend defaults)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..blend import BlendConfig

DEFAULT_DATA_DIR = Path.home() / ".cache" / "ragkv"


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine is built from; `from_env` reads `RAGKV_*` overrides."""

    model: str = "smollm2"
    data_dir: str = str(DEFAULT_DATA_DIR)
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype (fp32 on CPU; bf16/fp16 on GPU)
    kv_dtype: str = "float16"  # how chunk KV is held in memory tiers
    memory_bytes: int = 4 << 30
    namespace: str = "default"
    max_new_tokens: int = 32
    prepack_tokens: int = 4096  # precompute packs several chunks per pass up to this many tokens
    blend: BlendConfig = field(default_factory=BlendConfig)

    @classmethod
    def from_env(cls, **overrides) -> EngineConfig:
        """Defaults, then RAGKV_MODEL / RAGKV_DATA_DIR / RAGKV_DEVICE / RAGKV_DTYPE, then `overrides`."""
        env = {k: os.environ[f"RAGKV_{k.upper()}"] for k in ("model", "data_dir", "device", "dtype")
               if f"RAGKV_{k.upper()}" in os.environ}
        return cls(**{**env, **overrides})
