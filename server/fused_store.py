"""FusedKVStore: a shared folder of fused prompt KV, addressed by the exact prompt token ids.

The sidecar's proxy mode (`server.upstream`) publishes here what ragkv fused for a prompt; an
inference server's KV connector (`adapters.vllm_connector`) reads it back for the same token ids.
One entry is one safetensors file `<root>/<sha256 of the ids>.safetensors` holding

- `token_ids` int64 [N]: the whole prompt (checked on read, so a hash collision is a miss),
- `kv.<l>` [N - 1, H_kv, D_k + D_v] per layer l: keys (re-rotated to their final positions) then
  values of every prompt token but the last, the cell layout of vLLM's paged cache,

and header metadata (format, model, shape, dtype, creation time). A file is written under a temporary
name and renamed, so a reader sees a whole entry or none. A missing, unreadable or stale entry (other
format, model or shape, other ids, older than `max_age_s`) is a miss: the server then prefills itself.
This module needs only torch, numpy and safetensors, so the connector can load it inside vLLM.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "ragkv-fused-kv/1"
_SUFFIX = ".safetensors"


def prompt_hash(token_ids: Sequence[int]) -> str:
    """Hex sha256 of the token ids as little-endian int64: the entry's name."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class KVShape:
    """What a reader's model caches per token and layer; an entry of another shape is stale."""

    num_layers: int
    num_kv_heads: int
    head_dim: int  # of keys and of values (D_k = D_v)


@dataclass(frozen=True)
class FusedEntry:
    """A found, current entry: its file and how many prompt rows it holds (N - 1)."""

    path: Path
    num_tokens: int  # prompt tokens N
    shape: KVShape
    dtype: str
    model: str

    @property
    def num_rows(self) -> int:
        return self.num_tokens - 1


class FusedKVStore:
    """Publish and find fused prompt KV under `root` (created if missing)."""

    def __init__(self, root: str | os.PathLike, model: str = "", max_entries: int | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 or None (unbounded), got {max_entries}")
        self.root = Path(root)
        self.model = model
        self.max_entries = max_entries

    def path(self, token_ids: Sequence[int]) -> Path:
        return self.root / (prompt_hash(token_ids) + _SUFFIX)

    # -- writer ----------------------------------------------------------------------------------
    def publish(
        self,
        token_ids: Sequence[int],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Store the KV of all but the last of `token_ids`. `keys`/`values` are per layer [H_kv, R, D]
        or [1, H_kv, R, D] with R >= N - 1 rows (extra rows, e.g. the last token or decode room, are
        dropped); `dtype` converts (default: keep). Returns the entry's path."""
        ids = [int(t) for t in token_ids]
        n = len(ids)
        if n < 2:
            raise ValueError(f"a fused entry needs a prompt of at least 2 tokens, got {n}")
        if len(keys) != len(values) or not keys:
            raise ValueError(f"need one key and one value tensor per layer, got {len(keys)} and {len(values)}")
        tensors = {"token_ids": torch.tensor(ids, dtype=torch.int64)}
        shape = None
        for layer, (k, v) in enumerate(zip(keys, values)):
            k, v = _heads_rows_dim(k, f"keys[{layer}]"), _heads_rows_dim(v, f"values[{layer}]")
            if k.shape != v.shape or k.shape[1] < n - 1:
                raise ValueError(
                    f"layer {layer}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both be "
                    f"[H_kv, R, D] with R >= {n - 1} rows (the prompt minus its last token)"
                )
            cell = torch.cat([k[:, : n - 1], v[:, : n - 1]], dim=-1).transpose(0, 1)  # [N-1, H, 2D]
            tensors[f"kv.{layer}"] = cell.to(dtype or cell.dtype).contiguous().cpu()
            shape = shape or KVShape(len(keys), k.shape[0], k.shape[2])
        meta = {
            "format": FORMAT,
            "model": self.model,
            "num_tokens": str(n),
            "num_layers": str(shape.num_layers),
            "num_kv_heads": str(shape.num_kv_heads),
            "head_dim": str(shape.head_dim),
            "dtype": str(tensors["kv.0"].dtype).removeprefix("torch."),
            "created": repr(time.time()),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(ids)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".publishing-", suffix=_SUFFIX)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, final)  # atomic: readers see the old entry, the new one, or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._evict(keep=final)
        return final

    def remove(self, token_ids: Sequence[int]) -> bool:
        """Delete the entry of `token_ids`; whether there was one."""
        try:
            self.path(token_ids).unlink()
            return True
        except FileNotFoundError:
            return False

    def _evict(self, keep: Path) -> None:
        if self.max_entries is None:
            return
        entries = sorted(self.root.glob("*" + _SUFFIX), key=_mtime)
        for old in entries[: max(0, len(entries) - self.max_entries)]:
            if old != keep:
                old.unlink(missing_ok=True)

    # -- reader ----------------------------------------------------------------------------------
    def find(
        self, token_ids: Sequence[int], shape: KVShape | None = None, max_age_s: float | None = None
    ) -> FusedEntry | None:
        """The current entry for exactly `token_ids`, or None (missing, unreadable or stale)."""
        ids = [int(t) for t in token_ids]
        path = self.path(ids)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or (self.model and meta.get("model") != self.model):
                    return None
                found = KVShape(int(meta["num_layers"]), int(meta["num_kv_heads"]), int(meta["head_dim"]))
                if shape is not None and found != shape:
                    return None
                if max_age_s is not None and time.time() - float(meta["created"]) > max_age_s:
                    return None
                if f.get_tensor("token_ids").tolist() != ids:
                    return None
                return FusedEntry(path, len(ids), found, meta["dtype"], meta.get("model", ""))
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError):  # missing, partial, foreign
            return None

    @staticmethod
    def read_layer(entry: FusedEntry, layer: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) of layer `layer`: [end - start, H_kv, 2 D] (keys then values on the last dim)."""
        end = entry.num_rows if end is None else end
        if not 0 <= start <= end <= entry.num_rows:
            raise ValueError(f"rows [{start}, {end}) are outside the entry's {entry.num_rows} rows")
        if not 0 <= layer < entry.shape.num_layers:
            raise ValueError(f"layer {layer} is outside the entry's {entry.shape.num_layers} layers")
        with safe_open(str(entry.path), framework="pt") as f:
            return f.get_slice(f"kv.{layer}")[start:end]


def _heads_rows_dim(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; accepted: [H_kv, R, D] or [1, H_kv, R, D]")
    return t


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0
