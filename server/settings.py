"""ServerSettings: what `ragkv serve` runs with, read by pydantic-settings from (highest first) explicit
overrides, `RAGKV_*` environment variables, and a JSON or TOML config file; then defaults.

`engine_config()` composes the Engine's EngineConfig from it; the rest is the HTTP layer's own
(API keys and their namespaces, request limits, the model queue).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ..blend.config import validate
from ..engine.config import DEFAULT_DATA_DIR, EngineConfig

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ServerSettings(BaseSettings):
    """Engine choices, auth, limits and the queue of one server process."""

    model_config = SettingsConfigDict(env_prefix="RAGKV_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # -- the engine ------------------------------------------------------------------------------
    model: str = "smollm2"
    data_dir: str = str(DEFAULT_DATA_DIR)
    device: str = "cpu"
    dtype: str = "float32"
    store: Literal["default", "memory"] = "default"  # default: CPU + disk tiers under data_dir; memory: RAM only
    memory_bytes: int = Field(2 << 30, gt=0)  # budget of the RAM tier when store = memory
    strategy: str = "cacheblend"
    recompute_ratio: float = 0.15
    max_new_tokens: int = Field(32, ge=1)  # when a request names none
    torch_threads: int | None = Field(None, ge=1)
    # -- sharing between sidecars: a Redis tier after the first one, a PostgreSQL catalog -----------
    redis_url: str | None = None  # redis://host:port/db: every sidecar with the same URL shares chunk KV
    redis_codec: str = "cachegen"
    redis_prefix: str = "ragkv"
    redis_bytes: int = Field(64 << 30, gt=0)  # this process's accounting budget; Redis maxmemory bounds the total
    catalog_url: str | None = None  # SQLAlchemy URL of the document + chunk catalog (default: SQLite in data_dir)
    # -- auth: bearer API key -> namespace (tenant); empty = no auth, everyone is `namespace` ------
    api_keys: dict[str, str] = Field(default_factory=dict)
    namespace: str = "default"
    # -- request limits ----------------------------------------------------------------------------
    max_body_bytes: int = Field(1 << 20, gt=0)
    max_documents: int = Field(16, ge=1)
    max_document_chars: int = Field(20_000, ge=1)
    max_question_chars: int = Field(8_000, ge=1)
    max_tokens_limit: int = Field(512, ge=1)  # the largest max_tokens a request may ask for
    max_retrieve_k: int = Field(16, ge=1)
    # -- the model queue ---------------------------------------------------------------------------
    queue_size: int = Field(64, ge=1)  # requests waiting for the one model worker; more get 429
    retry_after_s: int = Field(1, ge=1)
    shutdown_timeout_s: float = Field(30.0, gt=0)
    # -- retrieval: catalog + faiss index in DATA_DIR (default namespace), DATA_DIR/tenants/NS -------
    chunk_min_tokens: int = Field(256, ge=1)
    chunk_max_tokens: int = Field(512, ge=1)
    retrieve_k: int = Field(4, ge=1)

    @field_validator("namespace")
    @classmethod
    def _namespace_ok(cls, v: str) -> str:
        if not _NAMESPACE.match(v):
            raise ValueError(f"namespace {v!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")
        return v

    @field_validator("api_keys")
    @classmethod
    def _keys_ok(cls, v: dict[str, str]) -> dict[str, str]:
        for key, ns in v.items():
            if not key.strip():
                raise ValueError("api_keys: an API key must not be empty")
            if not _NAMESPACE.match(ns):
                raise ValueError(f"api_keys: namespace {ns!r} of a key: use 1-64 characters from A-Z a-z 0-9 _ . -")
        return v

    @model_validator(mode="after")
    def _blend_ok(self) -> ServerSettings:
        validate(self.strategy, self.recompute_ratio)
        if self.chunk_min_tokens > self.chunk_max_tokens:
            raise ValueError("chunk_min_tokens must be <= chunk_max_tokens")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ):
        return (
            init_settings,
            env_settings,
            JsonConfigSettingsSource(settings_cls),
            TomlConfigSettingsSource(settings_cls),
        )

    def engine_config(self) -> EngineConfig:
        """The EngineConfig these settings describe."""
        from ..blend import BlendConfig
        from ..retriever import RetrieverConfig
        from ..storage.config import StorageConfig, TierConfig

        storage = None
        if self.store == "memory":
            kind = "gpu" if self.device.startswith("cuda") else "cpu"
            storage = StorageConfig(tiers=(TierConfig(kind, self.memory_bytes),))
        if storage is None and (self.redis_url or self.catalog_url):
            # the disk tier is this machine's: its catalog stays in SQLite under data_dir even when the
            # document catalog is a shared PostgreSQL (another sidecar's check() would drop our rows)
            storage = EngineConfig(data_dir=self.data_dir, device=self.device).storage_config()
        if self.redis_url:  # the shared tier goes right after the first (memory) tier
            redis = TierConfig(
                "redis", self.redis_bytes, self.redis_codec, url=self.redis_url, prefix=self.redis_prefix
            )
            storage = replace(storage, tiers=(storage.tiers[0], redis, *storage.tiers[1:]))
        return EngineConfig(
            model=self.model,
            data_dir=self.data_dir,
            device=self.device,
            dtype=self.dtype,
            namespace=self.namespace,
            max_new_tokens=self.max_new_tokens,
            storage=storage,
            catalog_url=self.catalog_url,
            blend=BlendConfig(strategy=self.strategy, recompute_ratio=self.recompute_ratio),
            retriever=RetrieverConfig(chunk_min_tokens=self.chunk_min_tokens, chunk_max_tokens=self.chunk_max_tokens),
        )

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
    """Settings from `overrides` > `RAGKV_*` env > `config_file` (.json or .toml) > defaults."""
    if config_file is None:
        return ServerSettings(**overrides)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    kind = {".json": "json_file", ".toml": "toml_file"}.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"config file {str(path)!r}: accepted formats are .json and .toml")

    class FileSettings(ServerSettings):
        model_config = SettingsConfigDict(**{**ServerSettings.model_config, kind: path})

    return ServerSettings(**FileSettings(**overrides).model_dump())
