"""Export ragkv's fused prompt KV into LMCache's storage layout, so a `vllm serve` running LMCache's
own `LMCacheConnectorV1` with an `fs://` remote backend finds the fused prompt as a cache hit.

The layout, read from lmcache 0.5.6's source (`lmcache/utils.py` CacheEngineKey, `lmcache/v1/
token_database.py` ChunkedTokenDatabase, `lmcache/v1/protocol.py` RemoteMetadata, `lmcache/v1/
storage_backend/connector/fs_connector.py` FSConnector):

- the prompt is cut into `chunk_size` (256) token chunks; only full chunks unless `save_unfull_chunk`;
- chunk i's hash is `hash((h_{i-1}, tuple(chunk_i_tokens), ()))` with Python's builtin hash (the
  default `pre_caching_hash_algorithm: builtin`), starting from NONE_HASH = `hash(str(seed))` computed
  under `PYTHONHASHSEED=seed` (vLLM's `init_none_hash`; the seed must be the vLLM process's
  PYTHONHASHSEED, which LMCache requires to be set for shared caches). A tuple of ints hashes the same
  under any seed, so only NONE_HASH needs the seed: it is computed in a subprocess when it differs;
- the key is `model@world_size@worker_id@<hex chunk hash>@<dtype>` (dtype names: float, half,
  bfloat16), the file `<root>/<key with '/' as '-SEP->.data`;
- the file is a RemoteMetadata header (int32s: byte length, memory format 1 = KV_2LTD, dtype code,
  4 shape dims) followed by the chunk's KV as a contiguous [2, L, T, H_kv * D] tensor.

`redis://` is not written (the same bytes under the same key would do; not done here).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

KV_2LTD = 1  # lmcache.v1.memory_management.MemoryFormat.KV_2LTD
DTYPE_NAMES = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}  # TORCH_DTYPE_TO_STR_DTYPE
DTYPE_CODES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 3}  # protocol.DTYPE_TO_INT


@dataclass(frozen=True)
class LMCacheLayout:
    """What LMCache's keys depend on; set these as the vLLM + LMCache deployment runs."""

    model_name: str  # vLLM's model_config.model (the path or HF id given to `vllm serve`)
    hash_seed: str = "0"  # the vLLM process's PYTHONHASHSEED
    world_size: int = 1
    worker_id: int = 0
    chunk_size: int = 256
    dtype: torch.dtype = torch.bfloat16  # vLLM's KV cache dtype
    save_unfull_chunk: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {self.dtype} is not exported; accepted: {', '.join(map(str, DTYPE_NAMES))}")
        if not self.hash_seed.isdigit() or int(self.hash_seed) > 4294967295:
            raise ValueError(f"hash_seed {self.hash_seed!r} must be a PYTHONHASHSEED integer in [0, 4294967295]")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


def none_hash(seed: str) -> int:
    """NONE_HASH of a vLLM process started with PYTHONHASHSEED=seed: `hash(seed)` under that seed."""
    if os.environ.get("PYTHONHASHSEED") == seed:
        return hash(seed)
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", f"print(hash({seed!r}))"], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def chunk_spans(num_tokens: int, layout: LMCacheLayout) -> list[tuple[int, int]]:
    """[start, end) of each stored chunk of a `num_tokens` prompt."""
    end = num_tokens if layout.save_unfull_chunk else num_tokens - num_tokens % layout.chunk_size
    return [(s, min(s + layout.chunk_size, num_tokens)) for s in range(0, end, layout.chunk_size)]


def chunk_hashes(token_ids: Sequence[int], layout: LMCacheLayout, seed_hash: int | None = None) -> list[int]:
    """The prefix-hash chain of the stored chunks (LMCache's ChunkedTokenDatabase with builtin hash)."""
    h = none_hash(layout.hash_seed) if seed_hash is None else seed_hash
    ids = [int(t) for t in token_ids]
    hashes = []
    for start, end in chunk_spans(len(ids), layout):
        h = hash((h, tuple(ids[start:end]), ()))
        hashes.append(h)
    return hashes


def key_string(chunk_hash: int, layout: LMCacheLayout) -> str:
    """CacheEngineKey.to_string()."""
    return f"{layout.model_name}@{layout.world_size}@{layout.worker_id}@{chunk_hash:x}@{DTYPE_NAMES[layout.dtype]}"


def file_name(chunk_hash: int, layout: LMCacheLayout) -> str:
    """FSConnector's file name of a key."""
    return key_string(chunk_hash, layout).replace("/", "-SEP-") + ".data"


def encode_chunk(kv: torch.Tensor) -> bytes:
    """RemoteMetadata header + the bytes of `kv` [2, L, T, H_kv * D] (a KV_2LTD memory object)."""
    if kv.dim() != 4 or kv.shape[0] != 2 or kv.dtype not in DTYPE_CODES:
        raise ValueError(f"chunk KV {tuple(kv.shape)} {kv.dtype}: expected [2, L, T, H_kv * D] in {list(DTYPE_CODES)}")
    data = kv.contiguous().cpu().view(torch.uint8).numpy().tobytes()
    header = struct.pack("iiiiiii", len(data), KV_2LTD, DTYPE_CODES[kv.dtype], *kv.shape)
    return header + data


def fused_kv_2ltd(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Per-layer K/V [1, H_kv, R, D] or [H_kv, R, D] (R >= num_tokens) -> [2, L, num_tokens, H_kv * D]."""
    out = []
    for part in (keys, values):
        layers = []
        for t in part:
            t = t[0] if t.dim() == 4 else t
            if t.dim() != 3 or t.shape[1] < num_tokens:
                raise ValueError(f"KV {tuple(t.shape)}: expected [H_kv, R, D] with R >= {num_tokens}")
            layers.append(t[:, :num_tokens].transpose(0, 1).reshape(num_tokens, -1))  # [T, H*D]
        out.append(torch.stack(layers))  # [L, T, H*D]
    return torch.stack(out)


def export_fs(
    root: str | os.PathLike,
    token_ids: Sequence[int],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    layout: LMCacheLayout,
) -> list[Path]:
    """Write the fused KV of the prompt `token_ids` (all N rows, as in `BlendResult.keys/values`) as
    LMCache fs:// chunk files under `root`; returns the files (atomic: temp file, then rename)."""
    ids = [int(t) for t in token_ids]
    kv = fused_kv_2ltd(keys, values, len(ids)).to(layout.dtype)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for (start, end), h in zip(chunk_spans(len(ids), layout), chunk_hashes(ids, layout)):
        path = root / file_name(h, layout)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(encode_chunk(kv[:, :, start:end]))
        os.replace(tmp, path)
        written.append(path)
    return written
