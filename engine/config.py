"""EngineConfig: the composed configuration of an Engine (model, devices, cache, blend defaults).

Users configure ragkv through the settings tree (engine/settings.py: flags > `RAGKV_*` env > config
file > defaults); `EngineConfig.load(...)` / `EngineConfig.from_settings(settings)` compose this
dataclass from it. This module imports the settings module, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path

from ..blend import BlendConfig
from ..retriever import RetrieverConfig
from ..storage.config import StorageConfig, TierConfig
from .settings import DEFAULT_DATA_DIR, Settings, load_settings

CHUNK_CONTEXTS = ("prefix", "sink")  # what chunk KV is computed after (`EngineConfig.chunk_context`)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine is built from; `load` reads it from the settings tree."""

    model: str = "smollm2"
    data_dir: str = DEFAULT_DATA_DIR
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype (fp32 on CPU; bf16/fp16 on GPU)
    kv_dtype: str = "float16"  # how chunk KV is held in memory tiers
    namespace: str = "default"
    max_new_tokens: int = 32
    prepack_tokens: int = 4096  # precompute packs several chunks per pass up to this many tokens
    chunk_context: str = "prefix"  # chunk KV computed after the template's prefix ("prefix") or the sink ("sink")
    batch_tokens: int | None = None  # prompt tokens fused in one batch (None: the device's default)
    batch_kv_bytes: int | None = None  # K/V buffer bytes of one batch (None: the device's default)
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
            # the disk tier is this machine's: its catalog stays in SQLite under data_dir even when the
            # document catalog is a shared database (another machine's check() must not see our files)
            catalog_url=f"sqlite:///{self.data_path() / 'catalog.sqlite'}",
            kv_dtype=self.kv_dtype,
            codec_schedule=self._calibration(),
        )

    def _calibration(self) -> str | None:
        """Where `ragkv calibrate` writes its schedules (DATA_DIR/calibration), if it has."""
        folder = self.data_path() / "calibration"
        return str(folder) if folder.is_dir() else None

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides) -> EngineConfig:
        """From the settings tree: `overrides` (settings names; None = not given) > `RAGKV_*` environment >
        `config_file` (else `$RAGKV_CONFIG`) > defaults. An override that is already a built config
        (`storage=StorageConfig(...)`, `blend=BlendConfig(...)`, `retriever=RetrieverConfig(...)`) is used as given."""
        built = {k: v for k, v in overrides.items() if is_dataclass(v)}
        given = {k: v for k, v in overrides.items() if k not in built}
        return replace(cls.from_settings(load_settings(config_file, given)), **built)

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        """The EngineConfig (and the lower folders' configs) the settings tree describes."""
        base = cls(
            model=settings.model,
            data_dir=settings.data_dir,
            device=settings.device,
            dtype=settings.dtype,
            kv_dtype=settings.kv_dtype,
            namespace=settings.namespace,
            max_new_tokens=settings.max_new_tokens,
            prepack_tokens=settings.prepack_tokens,
            chunk_context=settings.chunk_context,
            batch_tokens=settings.batch_tokens,
            batch_kv_bytes=None if settings.batch_kv_bytes is None else int(settings.batch_kv_bytes),
            catalog_url=settings.catalog_url,
            blend=settings.blend,
            retriever=RetrieverConfig(
                **settings.retriever.model_dump(exclude={"max_document_bytes"}),
                max_document_bytes=int(settings.retriever.max_document_bytes),
                namespace=settings.namespace,
            ),
        )
        return replace(base, storage=_storage(base, settings))


def _storage(base: EngineConfig, settings: Settings) -> StorageConfig:
    """The store the settings' `storage` section describes, over `base`'s default store."""
    s = settings.storage
    storage = replace(
        base.storage_config(),
        policy=s.policy,
        promote=s.promote,
        decode_workers=s.decode_workers,
        kv_dtype=settings.kv_dtype,
    )
    if s.tiers is not None:
        tiers = tuple(
            TierConfig(t.kind, int(t.capacity), t.codec, t.name, url=t.url, prefix=t.prefix, ttl_s=t.ttl_s)
            for t in s.tiers
        )
        storage = replace(storage, tiers=tiers)
    if s.redis_url and not any(t.kind == "redis" for t in storage.tiers):
        redis = TierConfig("redis", int(s.redis_capacity), s.redis_codec, url=s.redis_url, prefix=s.redis_prefix)
        storage = replace(storage, tiers=(storage.tiers[0], redis, *storage.tiers[1:]))
    if s.codec_schedule is not None:
        storage = replace(storage, codec_schedule=str(Path(s.codec_schedule).expanduser()))
    if s.disk_dir is not None:
        storage = replace(storage, disk_dir=str(Path(s.disk_dir).expanduser()))
    return storage
