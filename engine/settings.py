"""The settings tree: everything a user configures, read with ONE precedence (highest first):

1. overrides (the CLI's flags, or keyword arguments of `load_settings` / `Engine.from_pretrained`);
2. `RAGKV_*` environment variables, nested with `__` (`RAGKV_STORAGE__POLICY=cost`,
   `RAGKV_STORAGE__TIERS='[{"kind": "cpu", "capacity": "1GiB"}]'`, `RAGKV_SERVER__PORT=9000`);
3. a TOML (or JSON) config file: `--config FILE`, else the file `RAGKV_CONFIG` names;
4. the defaults below.

An override that is None means "not given": it never beats the environment or the file.
The library, every CLI command and the sidecar read the same tree; `ragkv config` prints it with the
origin of each value. `EngineConfig.from_settings(settings)` (engine/config.py) composes the Engine's
config from it (and with it the lower folders' StorageConfig and RetrieverConfig). A section that is
the same as a lower folder's config is that dataclass itself, validated once by its own checks:
`blend` is blend/config.py's `BlendConfig` (pydantic reads its fields and runs its `__post_init__`).
This module imports no other module of ragkv's engine (engine/config.py imports it, not the reverse).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ..blend.config import BlendConfig

CONFIG_ENV = "RAGKV_CONFIG"  # names the config file when `--config` is not given
DEFAULT_DATA_DIR = "~/.cache/ragkv"
DType = Literal["float32", "float16", "bfloat16"]
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_NAMESPACE_RULE = "use 1-64 characters from A-Z a-z 0-9 _ . -"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierSettings(_Section):
    """One tier of the chunk store (fastest first; at most one disk tier, last)."""

    kind: Literal["gpu", "cpu", "disk", "redis"]
    capacity: ByteSize  # "2GiB", "512MB" or a number of bytes
    codec: str = "identity"  # identity | lz4 | int8 | fp8 | cachegen
    name: str | None = None  # defaults to `kind`
    url: str | None = None  # redis only: redis://host:port/db, shared by every sidecar that names it
    prefix: str = "ragkv"  # redis only: the keys' prefix
    ttl_s: float | None = 7 * 24 * 3600.0  # redis only: expiry after the last hit (None: never)

    @model_validator(mode="after")
    def _redis_ok(self) -> TierSettings:
        if self.kind == "redis" and not self.url:
            raise ValueError("a redis tier needs url (redis://host:port/db)")
        return self


class StorageSettings(_Section):
    """The chunk store: tiers, where the disk tier lives, eviction policy, decode workers."""

    tiers: tuple[TierSettings, ...] | None = None  # None: a CPU (GPU on cuda) 2GiB tier + a 32GiB lz4 disk tier
    disk_dir: str | None = None  # None: DATA_DIR/cache
    policy: Literal["lru", "cost", "utility"] = "lru"
    promote: bool = True  # a lower-tier hit is copied up after the request
    decode_workers: int | None = Field(None, ge=0)  # cachegen decode processes; None: one per core, 0: inline
    # a shared Redis tier right after the first tier, unless `tiers` already has one: every sidecar naming the
    # same URL shares chunk KV (RAGKV_STORAGE__REDIS_URL=redis://host:6379/0)
    codec_schedule: str | None = None  # a `ragkv calibrate` schedule file or folder; None: DATA_DIR/calibration
    redis_url: str | None = None
    redis_codec: str = "lz4"  # must pass the answer gate (`ragkv calibrate --gate`); cachegen/packed are opt-in
    redis_prefix: str = "ragkv"
    redis_capacity: ByteSize = ByteSize(64 << 30)  # this process's accounting; Redis maxmemory bounds the total


class RetrieverSettings(_Section):
    """Chunking, embedding and the index of ingested documents."""

    chunk_min_tokens: int = Field(256, ge=1)
    chunk_max_tokens: int = Field(512, ge=1)
    overlap_tokens: int = Field(0, ge=0)
    embedder_path: str | None = None  # a local HF encoder folder; None: bundled all-MiniLM-L6-v2
    index_kind: Literal["flat", "ivf", "hnsw"] = "flat"
    max_document_bytes: ByteSize = ByteSize(20 << 20)

    @model_validator(mode="after")
    def _lengths_ok(self) -> RetrieverSettings:
        if self.chunk_min_tokens > self.chunk_max_tokens:
            raise ValueError(
                f"chunk_min_tokens ({self.chunk_min_tokens}) must be <= chunk_max_tokens ({self.chunk_max_tokens})"
            )
        return self


class ServerOptions(_Section):
    """The sidecar's own: bind address, API keys (bearer key -> namespace), request limits, the queue."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: dict[str, str] = Field(default_factory=dict)  # empty: no auth, everyone is `namespace`
    metrics_key: str | None = None  # with api_keys: the bearer key /metrics needs (server-wide counters)
    metrics_public: bool = False  # with api_keys: serve /metrics without a key (e.g. on a private network)
    max_body_bytes: ByteSize = ByteSize(1 << 20)
    max_documents: int = Field(16, ge=1)
    max_document_chars: int = Field(20_000, ge=1)
    max_question_chars: int = Field(8_000, ge=1)
    max_tokens_limit: int = Field(512, ge=1)  # the largest max_tokens a request may ask for
    max_retrieve_k: int = Field(16, ge=1)
    queue_size: int = Field(64, ge=1)  # requests waiting for the one model worker; more get 429
    max_inflight_per_tenant: int | None = Field(None, ge=1)  # one tenant's share of the queue (None: all)
    scheduler: Literal["batch", "one"] = "batch"  # batch: generations decode together; one: each on its own
    join_tokens: int | None = Field(None, ge=1)  # prompt tokens joining in one turn (None: the batch budget)
    retry_after_s: int = Field(1, ge=1)
    shutdown_timeout_s: float = Field(30.0, gt=0)

    @field_validator("api_keys")
    @classmethod
    def _keys_ok(cls, v: dict[str, str]) -> dict[str, str]:
        for key, ns in v.items():
            if not key.strip():
                raise ValueError("api_keys: an API key must not be empty")
            if not _NAMESPACE.match(ns):
                raise ValueError(f"api_keys: namespace {ns!r} of a key: {_NAMESPACE_RULE}")
        return v


class Settings(BaseSettings):
    """Everything a user configures: model and devices, the chunk store, fusion, retrieval, the sidecar."""

    model_config = SettingsConfigDict(env_prefix="RAGKV_", env_nested_delimiter="__", extra="forbid", frozen=True)

    model: str = "smollm2"  # alias, local path or cached HF id
    data_dir: str = DEFAULT_DATA_DIR  # converted models, catalog, index and the disk tier
    device: str = "cpu"  # cpu or cuda[:N]
    dtype: DType = "float32"  # compute dtype
    kv_dtype: DType | None = "float16"  # chunk KV as held in the store (None: as computed)
    namespace: str = "default"  # tenant of chunk keys and documents
    catalog_url: str | None = None  # one SQLAlchemy database for store + documents; None: SQLite in data_dir
    max_new_tokens: int = Field(32, ge=1)
    prepack_tokens: int = Field(4096, ge=1)  # precompute packs several chunks per pass up to this many tokens
    # what chunk KV is computed after: "prefix", the prompt template's fixed prefix (chat template +
    # instruction; keyed by it), or "sink", the model's attention sink alone (engine/chunk_supply.py)
    chunk_context: Literal["prefix", "sink"] = "prefix"
    # requests fused together (engine/batch_budget.py): their prompt tokens and their K/V buffer bytes at most
    # this much (None: per device, 16384 tokens / 1GiB on CPU, 65536 tokens / a quarter of the GPU's memory)
    batch_tokens: int | None = Field(None, ge=1)
    batch_kv_bytes: ByteSize | None = None
    torch_threads: int | None = Field(None, ge=1)
    storage: StorageSettings = StorageSettings()
    blend: BlendConfig = BlendConfig()
    retriever: RetrieverSettings = RetrieverSettings()
    server: ServerOptions = ServerOptions()

    @field_validator("namespace")
    @classmethod
    def _namespace_ok(cls, v: str) -> str:
        if not _NAMESPACE.match(v):
            raise ValueError(f"namespace {v!r}: {_NAMESPACE_RULE}")
        return v

    @field_validator("blend", mode="before")
    @classmethod
    def _nested_env_lists(cls, v: Any) -> Any:
        """pydantic-settings decodes a nested variable's JSON only for pydantic sections: a dataclass
        section's list arrives as text (RAGKV_BLEND__CHECK_LAYERS='[1, 3]') and is decoded here."""
        if not isinstance(v, Mapping):
            return v
        return {k: json.loads(x) if isinstance(x, str) and x.lstrip().startswith("[") else x for k, x in v.items()}

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r}: accepted are cpu, cuda and cuda:N")
        return v

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


S = TypeVar("S", bound=Settings)


def _reading(cls: type[S], path: Path) -> type[S]:
    """`cls` whose file source reads `path` (pydantic-settings takes the file from the model config)."""
    kind = "json_file" if path.suffix.lower() == ".json" else "toml_file"
    config = SettingsConfigDict(**{**cls.model_config, kind: path})
    return type(cls.__name__, (cls,), {"model_config": config, "__module__": cls.__module__})


def config_path(config: str | Path | None) -> Path | None:
    """The config file to read: `config`, else `$RAGKV_CONFIG`, else none; checked to exist and be TOML/JSON."""
    given = config if config is not None else os.environ.get(CONFIG_ENV) or None
    if given is None:
        return None
    path = Path(given).expanduser()
    origin = "--config" if config is not None else CONFIG_ENV
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} ({origin}) does not exist")
    if path.suffix.lower() not in (".toml", ".json"):
        raise ValueError(f"config file {str(path)!r} ({origin}): accepted formats are .toml and .json")
    return path


def nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides keyed by dotted path (`storage.policy`), top-level name (`data_dir`) or a field name
    unique to one section (`queue_size` -> `server.queue_size`) -> a nested dict; None values are dropped."""
    sections = {name: _fields(f.annotation) for name, f in Settings.model_fields.items() if _fields(f.annotation)}
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        path = key.split(".")
        if len(path) == 1 and key not in Settings.model_fields:
            owners = [s for s, names in sections.items() if key in names]
            if len(owners) != 1:
                raise ValueError(f"unknown setting {key!r}; run `ragkv config` to list them all")
            path = [owners[0], key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _fields(annotation: Any) -> set[str]:
    """The field names of a section (a pydantic model or a lower folder's dataclass); empty otherwise."""
    if isinstance(annotation, type) and issubclass(annotation, _Section):
        return set(annotation.model_fields)
    return {f.name for f in fields(annotation)} if isinstance(annotation, type) and is_dataclass(annotation) else set()


def load_settings(
    config: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *, cls: type[S] = Settings, **kw: Any
) -> S:
    """The settings tree: `overrides` and `kw` (see `nest`) > `RAGKV_*` environment > config file > defaults."""
    path = config_path(config)
    given = nest({**(overrides or {}), **kw})
    try:
        if path is None:
            return cls(**given)
        return cls(**_reading(cls, path)(**given).model_dump())
    except ValidationError as err:  # one line per bad value: where, what is accepted, what was given
        raise ValueError("; ".join(_explain(e) for e in err.errors())) from None
    except ValueError as err:  # the file does not parse (TOML or JSON syntax): name it
        raise ValueError(f"config file {path}: {err}") from None


def _explain(error: Mapping[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "settings"
    got = "" if error["type"] in ("missing", "value_error") else f"; got {error['input']!r}"
    return f"setting {where}: {error['msg'].removeprefix('Value error, ')}{got}"


def origins(settings: Settings, config: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    """Where each value of `settings` came from: dotted path -> `flag`, `env RAGKV_...`, `file PATH` or
    `default` (a path set by a whole section, e.g. RAGKV_STORAGE='{...}', names that section)."""
    given = _flatten(nest(overrides or {}))
    env = _flatten(EnvSettingsSource(type(settings))())
    path = config_path(config)
    file = {}
    if path is not None:
        reader = _reading(type(settings), path)
        source = JsonConfigSettingsSource if path.suffix.lower() == ".json" else TomlConfigSettingsSource
        file = _flatten(source(reader)())
    out = {}
    for key in _flatten(settings.model_dump()):
        if _covered(key, given):
            out[key] = "flag"
        elif _covered(key, env):
            out[key] = "env RAGKV_" + "__".join(_covered(key, env).split(".")).upper()
        elif _covered(key, file):
            out[key] = f"file {path}"
        else:
            out[key] = "default"
    return out


def unknown_env() -> list[str]:
    """`RAGKV_*` variables that name no setting (a typo is otherwise silently ignored); the test and
    PostgreSQL helpers' own variables and `RAGKV_CONFIG` are not settings and not listed."""
    fields = {name.upper() for name in Settings.model_fields}
    return sorted(
        name
        for name in os.environ
        if name.startswith("RAGKV_")
        and name != CONFIG_ENV
        and not name.startswith(("RAGKV_TEST_", "RAGKV_PG_", "RAGKV_SHARED_DATA"))
        and name[len("RAGKV_") :].split("__")[0] not in fields
    )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key not in ("server.api_keys",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(key: str, given: Mapping[str, Any]) -> str:
    """The given path that sets `key` (`key` itself or a section above it); "" when none does."""
    parts = key.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in given), "")
