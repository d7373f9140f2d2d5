"""EngineConfig: the composed configuration of an Engine (model, devices, cache, blend defaults)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..blend import BlendConfig
from ..retriever import RetrieverConfig
from ..storage.config import StorageConfig, TierConfig

DEFAULT_DATA_DIR = Path.home() / ".cache" / "ragkv"


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine is built from; `from_env` reads `RAGKV_*` overrides."""

    model: str = "smollm2"
    data_dir: str = str(DEFAULT_DATA_DIR)
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype (fp32 on CPU; bf16/fp16 on GPU)
    kv_dtype: str = "float16"  # how chunk KV is held in memory tiers
    namespace: str = "default"
    max_new_tokens: int = 32
    prepack_tokens: int = 4096  # precompute packs several chunks per pass up to this many tokens
    blend: BlendConfig = field(default_factory=BlendConfig)
    storage: StorageConfig | None = None  # None: a CPU tier + a disk tier (SQLite catalog) under data_dir/cache
    catalog_url: str | None = (
        None  # one database for the chunk store and the document catalog; None: SQLite in data_dir
    )
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)

    def data_path(self, namespace: str | None = None) -> Path:
        """Where this namespace's catalog and index live (the default namespace at the top)."""
        root = Path(self.data_dir).expanduser()
        return root if namespace in (None, self.namespace) else root / "tenants" / namespace

    def catalog(self, namespace: str | None = None) -> str:
        """The SQLAlchemy URL of the catalog database."""
        return self.catalog_url or f"sqlite:///{self.data_path(namespace) / 'catalog.sqlite'}"

    def storage_config(self) -> StorageConfig:
        """The store to build: the configured one, or the embedded default under `data_dir`."""
        if self.storage is not None:
            return self.storage
        first = "gpu" if self.device.startswith("cuda") else "cpu"
        return StorageConfig(
            tiers=(TierConfig(first, 2 << 30), TierConfig("disk", 32 << 30, codec="lz4")),
            disk_dir=str(self.data_path() / "cache"),
            catalog_url=self.catalog(),
            kv_dtype=self.kv_dtype,
        )

    @classmethod
    def from_env(cls, **overrides) -> EngineConfig:
        """Defaults, then RAGKV_MODEL / RAGKV_DATA_DIR / RAGKV_DEVICE / RAGKV_DTYPE, then `overrides`."""
        env = {
            k: os.environ[f"RAGKV_{k.upper()}"]
            for k in ("model", "data_dir", "device", "dtype")
            if f"RAGKV_{k.upper()}" in os.environ
        }
        return cls(**{**env, **overrides})
