"""Helpers for the storage tests: tiny chunk KV, keys, a bytes-held codec, the PostgreSQL URL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import sqlalchemy as sa
import torch

from ragkv.chunk_cache import ChunkKey, ChunkKV
from ragkv.compression import IdentityCodec

SHAPE = (2, 3, 8, 2, 16)  # [2, L, T, H, D]: 1536 fp16 values, 3 KiB
_PG_FILE = Path(__file__).resolve().parent.parent / ".ci" / "pg_url"
_REDIS_FILE = Path(__file__).resolve().parent.parent / ".ci" / "redis_url"


class BytesCodec(IdentityCodec):
    """Identity bytes under another name, so memory tiers take their encoded (non-tensor) path."""

    name = "test-bytes"


def key(i: int, namespace: str = "default") -> ChunkKey:
    return ChunkKey.of("model", "tok", [i, i + 1], namespace)


def chunk(i: int, shape=SHAPE, dtype=torch.float16, pos0: int = 1) -> ChunkKV:
    g = torch.Generator().manual_seed(i)
    return ChunkKV(torch.randn(shape, generator=g).to(dtype), pos0)  # [2, L, T, H, D]


def same(kv, expected: ChunkKV) -> bool:
    """Every layer of a LayeredKV equals `expected`, bit for bit."""
    return (
        kv.pos0 == expected.pos0
        and kv.num_layers == expected.num_layers
        and kv.num_tokens == expected.num_tokens
        and all(torch.equal(kv.layer(i).cpu(), expected.layer(i)) for i in range(expected.num_layers))
    )


def pg_url() -> str | None:
    """RAGKV_TEST_PG_URL, else the URL `.ci/postgres.sh` wrote, else None."""
    url = os.environ.get("RAGKV_TEST_PG_URL")
    if not url and _PG_FILE.exists():
        url = _PG_FILE.read_text().strip()
    return url or None


def pg_reachable(url: str) -> str | None:
    """None if PostgreSQL answers at `url`, else why not."""
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as err:  # noqa: BLE001 - any failure means: skip
        return f"{type(err).__name__}: {err}"


def pg_url_or_skip() -> str:
    """The test PostgreSQL's URL; skips the calling test when there is none or it does not answer."""
    import pytest

    url = pg_url()
    if url is None:
        pytest.skip("no PostgreSQL: set RAGKV_TEST_PG_URL or run .ci/postgres.sh")
    why = pg_reachable(url)
    if why:
        pytest.skip(f"PostgreSQL not reachable: {why}")
    return url


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def redis_url() -> str | None:
    """RAGKV_TEST_REDIS_URL, else the URL `.ci/redis.sh` wrote, else None."""
    url = os.environ.get("RAGKV_TEST_REDIS_URL")
    if not url and _REDIS_FILE.exists():
        url = _REDIS_FILE.read_text().strip()
    return url or None


def redis_skip_reason() -> str | None:
    """None if a Redis answers at redis_url(), else why the Redis tests skip."""
    url = redis_url()
    if url is None:
        return "no Redis: set RAGKV_TEST_REDIS_URL or run .ci/redis.sh"
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install 'ragkv[redis]')"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
        client.ping()
        client.close()
        return None
    except Exception as err:  # noqa: BLE001 - any failure means: skip
        return f"Redis at {url} not reachable: {type(err).__name__}: {err}"


def payloads_of(root: Path, keys) -> list[Path]:
    """The disk tier's payload files under `root` that hold `keys` (not the prompt prefix's or others'), sorted."""
    digests = {k.digest for k in keys}
    return sorted(p for p in Path(root).rglob("*.kv") if p.name.split(".")[0] in digests)
