"""FusedKVStore: fused prompt KV handed from ragkv to an inference server's KV connector.

Producer side (`server.upstream`, ragkv's proxy mode): `publish` stores the KV of all but the last
prompt token along the best hand-off path (`fused_record.candidate_paths`: CUDA IPC for KV on a GPU,
then pinned shared memory, then a safetensors file; a path that fails falls back to the next and the
record says which was taken and why) and writes the record `<root>/<sha256 of the ids>.json` last,
atomically, so a reader sees a whole entry or none. Every entry is pinned in a `PinLedger` (bounded
by bytes) until the consumer acks the load (`<hash>.loaded`, collected by `reap`), the upstream has
answered (`remove`), or `max_pin_s` passes; an entry that does not fit beside the pinned ones is
refused (`HandoffRefused`) and the server prefills that prompt itself.

Consumer side (`adapters.vllm_connector`): `find` returns the record for exactly these ids (missing,
unreadable or stale: None, and a permission problem is logged, not silent), `open_kv` maps its KV
[layers, N - 1, H_kv, D_k + D_v], `ack` reports the load. Files are created with `entry_mode` (0600
by default; 0640/0644 let a server running as another user read them).
This module needs only torch, numpy and safetensors, so the connector can load it inside vLLM.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .fused_ipc import dtype_name, export_cuda, import_cuda, torch_dtype
from .fused_ledger import PinLedger
from .fused_record import FusedRecord, KVShape, candidate_paths, same_ids

__all__ = ["FusedKVStore", "FusedRecord", "HandoffRefused", "KVShape", "prompt_hash", "shm_dir_default"]

log = logging.getLogger("ragkv.fused")
_RECORD, _ACK, _SHM, _FILE = ".json", ".loaded", ".kv", ".safetensors"


class HandoffRefused(RuntimeError):
    """The entry was not published (budget full); the inference server prefills the prompt itself."""


def prompt_hash(token_ids: Sequence[int]) -> str:
    """Hex sha256 of the token ids as little-endian int64: the entry's name."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<i8").tobytes()).hexdigest()


def shm_dir_default(root: str | os.PathLike) -> str | None:
    """Where the shm path's files go: `root` itself when it is under /dev/shm, else
    /dev/shm/ragkv-fused; None without /dev/shm (that path is then skipped)."""
    if not os.path.isdir("/dev/shm"):
        return None
    return str(root) if Path(root).resolve().is_relative_to("/dev/shm") else "/dev/shm/ragkv-fused"


class FusedKVStore:
    """Publish (producer) and find/open (consumer) fused prompt KV under `root`."""

    def __init__(
        self,
        root: str | os.PathLike,
        model: str = "",
        budget_bytes: int = 8 << 30,
        handoff: str = "auto",
        entry_mode: int = 0o600,
        shm_dir: str | os.PathLike | None = "default",
        max_pin_s: float = 900.0,
    ) -> None:
        if not 0 <= entry_mode <= 0o777:
            raise ValueError(f"entry_mode must be a permission mode like 0o600 or 0o644, got {entry_mode:o}")
        candidate_paths("cpu", handoff)  # refuses an unknown path name
        self.root = Path(root)
        self.model = model
        self.handoff = handoff
        self.entry_mode = entry_mode
        shm = shm_dir_default(root) if shm_dir == "default" else shm_dir
        self.shm_dir = None if shm is None else Path(shm)
        self.ledger = PinLedger(budget_bytes, max_pin_s)
        self._warned: set[str] = set()

    def path(self, token_ids: Sequence[int]) -> Path:
        """The entry's record file."""
        return self.root / (prompt_hash(token_ids) + _RECORD)

    # -- producer --------------------------------------------------------------------------------
    def publish(
        self,
        token_ids: Sequence[int],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        dtype: torch.dtype | None = None,
        model: str | None = None,
    ) -> FusedRecord:
        """Publish the KV of all but the last of `token_ids`. `keys`/`values` are per layer [H_kv, R, D]
        or [1, H_kv, R, D] with R >= N - 1 rows (extra rows are dropped); `dtype` converts (default:
        keep); `model` names the model in the record (default: the store's). Raises ValueError on bad
        input, HandoffRefused when the budget is full."""
        ids = [int(t) for t in token_ids]
        key = prompt_hash(ids)
        self.reap()
        if self.ledger.retain(key):  # the same prompt is in flight: share its entry
            try:
                return FusedRecord.from_json(self.path(ids).read_bytes())
            except (OSError, ValueError):
                self.ledger.release(key)  # its record is gone: publish afresh
        kv = stack_rows(ids, keys, values, dtype)  # [L, N-1, H, 2D] on the fused device
        refused = self.ledger.admit(key, kv.numel() * kv.element_size())
        if refused is not None:
            raise HandoffRefused(refused)
        shape = KVShape(kv.shape[0], kv.shape[2], kv.shape[3] // 2)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.joinpath(key + _ACK).unlink(missing_ok=True)
        tried: list[str] = []
        for path in candidate_paths(kv.device.type, self.handoff, self.shm_dir is not None):
            try:
                locator, release = self._write(path, key, kv)
                break
            except (OSError, RuntimeError, ValueError, AttributeError) as err:  # the next path still works
                tried.append(f"{path}: {type(err).__name__}: {err}")
        else:
            raise OSError("every hand-off path failed: " + "; ".join(tried))
        name = self.model if model is None else model
        record = FusedRecord(tuple(ids), shape, dtype_name(kv.dtype), name, path, locator, tuple(tried))
        try:
            self._write_atomic(self.path(ids), record.to_json().encode())
        except BaseException:
            release()
            raise
        self.ledger.pin(key, record.nbytes, lambda: self._drop(key, release))
        return record

    def _write(self, path: str, key: str, kv: torch.Tensor):
        """Store `kv` along `path`: (locator, release)."""
        if path == "cuda_ipc":
            held = [kv]  # the tensor stays alive (and mapped by the consumer) until released
            return export_cuda(kv), held.clear
        if path == "shm":
            target = self.shm_dir / (key + _SHM)
            self.shm_dir.mkdir(parents=True, exist_ok=True)
            self._write_atomic(target, None, kv)
            return {"file": target.name}, lambda: target.unlink(missing_ok=True)
        target = self.root / (key + _FILE)
        self._write_atomic(target, None, kv)
        return {"file": target.name}, lambda: target.unlink(missing_ok=True)

    def _write_atomic(self, final: Path, data: bytes | None, kv: torch.Tensor | None = None) -> None:
        """Write `data` (or `kv`: raw for .kv, safetensors else) under a temporary name, set the mode, rename."""
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".publishing-", suffix=final.suffix)
        try:
            os.fchmod(fd, self.entry_mode)
            if kv is None:
                os.write(fd, data)
                os.close(fd)
            elif final.suffix == _SHM:
                os.ftruncate(fd, kv.numel() * kv.element_size())
                os.close(fd)
                write_raw(tmp, kv)
            else:
                os.close(fd)
                save_file({"kv": kv.cpu()}, tmp, metadata={"format": "ragkv-fused-kv/2"})
            os.replace(tmp, final)  # atomic: readers see the old entry, the new one, or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _drop(self, key: str, release) -> None:
        for suffix in (_RECORD, _ACK):
            self.root.joinpath(key + suffix).unlink(missing_ok=True)
        release()

    def remove(self, token_ids: Sequence[int]) -> bool:
        """A request is over: release its hold on the entry of `token_ids` (the last one deletes record,
        data and ack; an entry this store does not hold is deleted); whether there was one."""
        key = prompt_hash(token_ids)
        if self.ledger.release(key):
            return True
        existed = self.path(token_ids).exists()
        for suffix in (_RECORD, _ACK, _FILE):
            self.root.joinpath(key + suffix).unlink(missing_ok=True)
        if self.shm_dir is not None:
            self.shm_dir.joinpath(key + _SHM).unlink(missing_ok=True)
        return existed

    def reap(self) -> list[str]:
        """Release the entries whose consumer acked the load, and those pinned too long; their keys."""
        acked = [k for k in list(self.ledger.pins) if self.root.joinpath(k + _ACK).exists()]
        return [k for k in acked if self.ledger.release(k, everyone=True)] + self.ledger.expire()

    # -- consumer --------------------------------------------------------------------------------
    def find(
        self, token_ids: Sequence[int], shape: KVShape | None = None, max_age_s: float | None = None
    ) -> FusedRecord | None:
        """The current record for exactly `token_ids`, or None (missing, unreadable or stale)."""
        path = self.path(token_ids)
        try:
            record = FusedRecord.from_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except PermissionError as err:
            self._warn_once("perm", f"fused entry {path} is not readable ({err}); publish with a wider entry_mode")
            return None
        except (OSError, ValueError) as err:
            self._warn_once(path.name, f"fused entry {path} is unreadable ({err}); treated as a miss")
            return None
        if self.model and record.model != self.model:
            self._warn_once("model:" + record.model, f"fused entry for model {record.model!r}, expected {self.model!r}")
            return None
        if shape is not None and record.shape != shape:
            return None
        if max_age_s is not None and time.time() - record.created > max_age_s:
            return None
        return record if same_ids(record, token_ids) else None

    def open_kv(self, record: FusedRecord) -> torch.Tensor:
        """The record's KV [layers, N - 1, H_kv, 2 D]: mapped GPU memory (cuda_ipc), a mapping of the
        shared-memory file (shm), or read from the safetensors file (file)."""
        shape = (record.shape.num_layers, record.num_rows, record.shape.num_kv_heads, 2 * record.shape.head_dim)
        dtype = torch_dtype(record.dtype)
        if record.path == "cuda_ipc":
            kv = import_cuda(record.locator)
        elif record.path == "shm":
            if self.shm_dir is None:
                raise FileNotFoundError("the entry is in shared memory, but this store has no shm_dir")
            kv = map_raw(self.shm_dir / _own_name(record.locator), shape, dtype)
        else:
            try:
                with safe_open(str(self.root / _own_name(record.locator)), framework="pt") as f:
                    kv = f.get_tensor("kv")
            except SafetensorError as err:
                raise OSError(f"fused file unreadable: {err}") from None
        if tuple(kv.shape) != shape or kv.dtype != dtype:
            raise ValueError(f"fused KV is {tuple(kv.shape)} {kv.dtype}, its record says {shape} {dtype}")
        return kv

    def ack(self, token_ids: Sequence[int]) -> None:
        """Tell the producer the entry is loaded (it may free it now); best effort."""
        try:
            self.root.joinpath(prompt_hash(token_ids) + _ACK).touch()
        except OSError as err:
            self._warn_once("ack", f"cannot ack loads in {self.root} ({err}); entries are freed when requests end")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def stack_rows(ids: list[int], keys, values, dtype: torch.dtype | None) -> torch.Tensor:
    """Per-layer keys/values [H, R, D] (or [1, H, R, D]) -> one [L, N-1, H, 2 D] tensor (N = len(ids))."""
    n = len(ids)
    if n < 2:
        raise ValueError(f"a fused entry needs a prompt of at least 2 tokens, got {n}")
    if len(keys) != len(values) or not keys:
        raise ValueError(f"need one key and one value tensor per layer, got {len(keys)} and {len(values)}")
    cells = []
    for layer, (k, v) in enumerate(zip(keys, values)):
        k, v = _heads_rows_dim(k, f"keys[{layer}]"), _heads_rows_dim(v, f"values[{layer}]")
        if k.shape != v.shape or k.shape[1] < n - 1 or (cells and (k.shape[0], 2 * k.shape[2]) != cells[0].shape[1:]):
            raise ValueError(
                f"layer {layer}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both be [H_kv, R, D] "
                f"with R >= {n - 1} rows (the prompt minus its last token), the same H_kv and D in every layer"
            )
        cells.append(torch.cat([k[:, : n - 1], v[:, : n - 1]], dim=-1).transpose(0, 1))  # [N-1, H, 2D]
    kv = torch.stack(cells)
    return kv.to(dtype or kv.dtype).contiguous()


def write_raw(path: str | os.PathLike, kv: torch.Tensor) -> None:
    """Copy `kv` into the (already sized) file at `path` through a shared mapping; from a GPU the
    mapping is pinned first so the copy is one DMA."""
    out = torch.from_file(str(path), shared=True, size=kv.numel(), dtype=kv.dtype).view(kv.shape)
    if kv.device.type == "cuda":
        with pinned(out):
            out.copy_(kv, non_blocking=True)
            torch.cuda.current_stream(kv.device).synchronize()
    else:
        out.copy_(kv)


def map_raw(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = int(np.prod(shape))
    size = path.stat().st_size
    if size != numel * torch.empty(0, dtype=dtype).element_size():
        raise ValueError(f"shared-memory entry {path.name} holds {size} bytes, its record says {shape} {dtype}")
    return torch.from_file(str(path), shared=False, size=numel, dtype=dtype).view(shape)


class pinned:
    """Page-lock a CPU tensor's memory for the duration (cudaHostRegister), so copies to/from a GPU
    are asynchronous DMA; a no-op without CUDA."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.on = torch.cuda.is_available() and t.numel() > 0

    def __enter__(self) -> torch.Tensor:
        if self.on:
            rc = torch.cuda.cudart().cudaHostRegister(self.t.data_ptr(), self.t.numel() * self.t.element_size(), 0)
            self.on = int(rc) == 0  # not registered: the copy still works, only synchronously
        return self.t

    def __exit__(self, *exc) -> None:
        if self.on:
            torch.cuda.cudart().cudaHostUnregister(self.t.data_ptr())


def _own_name(locator: dict) -> str:
    """The locator's file name, which must be a plain name inside the store's folder."""
    name = locator.get("file")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"fused record names file {name!r}; only a plain file name in the store folder is accepted")
    return name


def _heads_rows_dim(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; accepted: [H_kv, R, D] or [1, H_kv, R, D]")
    return t
