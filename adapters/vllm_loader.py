"""The logic of ragkv's vLLM connector, free of vLLM types: which requests match a fused entry (the
scheduler side), and writing an entry's rows into a paged KV cache (the worker side), synchronously
or on a background thread (`AsyncLoads`) so the copy overlaps other requests' steps.

A paged layer is laid out as vLLM's FlashAttention and CPU backends expose it: [blocks, H_kv,
block_size, D_k + D_v]; when the layer object has the backend's own cache writer
(`impl.do_kv_cache_update`, the call vLLM's forward makes), it is used, so the backend's physical
layout is right by construction. Every error inside a load marks that request's blocks failed
(vLLM recomputes them under `kv_load_failure_policy: recompute`); so does a load that would leave a
layer of the entry unwritten.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..server.fused_store import FusedKVStore, FusedRecord, KVShape

log = logging.getLogger("ragkv.vllm")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")

Writer = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]  # name, cache, rows, blk, off


def layer_index(layer_name: str) -> int:
    """The decoder layer number in a vLLM attention layer name (`model.layers.7.self_attn.attn` -> 7)."""
    m = _LAYER.search(layer_name)
    if m is None:
        raise ValueError(f"cannot find the layer number in {layer_name!r}; expected a name with 'layers.<n>.'")
    return int(m.group(1))


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset in block) of prompt positions [start, end) given the request's block table."""
    pos = torch.arange(start, end)
    if end > len(block_ids) * block_size:
        raise ValueError(f"positions up to {end} need more than the {len(block_ids)} blocks of {block_size} given")
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long)[pos // block_size]
    return blocks, pos % block_size


def inject_rows(kv_layer: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
    """Write `rows` [T, H_kv, D_k + D_v] into the paged layer view `kv_layer` [B, H_kv, block_size, C]."""
    if kv_layer.dim() != 4 or rows.dim() != 3 or rows.shape[1:] != (kv_layer.shape[1], kv_layer.shape[3]):
        raise ValueError(
            f"fused rows {tuple(rows.shape)} do not fit the paged cache {tuple(kv_layer.shape)}: expected rows "
            "[T, H_kv, C] for a cache [blocks, H_kv, block_size, C]"
        )
    dev = kv_layer.device
    kv_layer[blocks.to(dev), :, offsets.to(dev)] = rows.to(dev, kv_layer.dtype, non_blocking=True)


def write_with_backend(layer, kv_layer: torch.Tensor, rows: torch.Tensor, blocks, offsets, block_size: int, dtype):
    """Write rows [T, H_kv, 2 D] through the attention backend's own cache writer
    (`layer.impl.do_kv_cache_update`, as vLLM's forward does); plain `inject_rows` for a layer without one."""
    impl = getattr(layer, "impl", None)
    if impl is None or not hasattr(impl, "do_kv_cache_update"):
        return inject_rows(kv_layer, rows, blocks, offsets)
    d = rows.shape[-1] // 2
    rows = rows.to(kv_layer.device, dtype, non_blocking=True)
    slots = (blocks * block_size + offsets).to(kv_layer.device)
    impl.do_kv_cache_update(layer, rows[..., :d].contiguous(), rows[..., d:].contiguous(), kv_layer, slots)


def _inject(name, kv, rows, blocks, offsets) -> None:
    inject_rows(kv, rows, blocks, offsets)


@dataclass
class LoadSpec:
    """One request's load: prompt rows [start, end) of the entry for `token_ids` into `block_ids`."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int

    def block_ids_in_range(self, block_size: int) -> set[int]:
        return set(self.block_ids[self.start // block_size : (self.end + block_size - 1) // block_size])


@dataclass
class FusedPromptMatcher:
    """The connector's decisions: matches on the scheduler, loads on the worker."""

    store: FusedKVStore
    shape: KVShape
    block_size: int
    max_age_s: float | None = None
    pending: dict[str, LoadSpec] = field(default_factory=dict)  # req -> load, blocks known at alloc
    failed_blocks: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- scheduler side --------------------------------------------------------------------------
    def find(self, token_ids: Sequence[int] | None) -> FusedRecord | None:
        if not token_ids or len(token_ids) < 2:
            return None
        return self.store.find(token_ids, self.shape, self.max_age_s)

    def num_new_matched_tokens(self, token_ids: Sequence[int] | None, num_computed_tokens: int) -> int:
        """External tokens beyond `num_computed_tokens`: N - 1 - computed for a fused prompt, else 0."""
        entry = self.find(token_ids)
        if entry is None:
            return 0
        return max(0, entry.num_rows - num_computed_tokens)

    def after_alloc(self, req_id: str, token_ids: Sequence[int], num_external_tokens: int, block_ids=()) -> None:
        """Remember to load the last `num_external_tokens` rows before the prompt's last token into
        `block_ids` (the request's whole block table after the allocation)."""
        if num_external_tokens > 0:
            end = len(token_ids) - 1
            self.pending[req_id] = LoadSpec(req_id, list(token_ids), list(block_ids), end - num_external_tokens, end)

    def take_loads(self, block_ids_of: dict[str, list[int]] | None = None) -> list[LoadSpec]:
        """The pending loads, handed to the worker once. `block_ids_of` (req_id -> block table) fills
        or replaces the tables of requests scheduled now; a load with no table yet waits."""
        loads = []
        for req_id, spec in list(self.pending.items()):
            if block_ids_of and req_id in block_ids_of:
                spec.block_ids = list(block_ids_of[req_id])
            if spec.block_ids:
                loads.append(self.pending.pop(req_id))
        return loads

    def forget(self, req_id: str) -> None:
        self.pending.pop(req_id, None)

    # -- worker side -----------------------------------------------------------------------------
    def load_one(self, spec: LoadSpec, kv_caches: dict[str, torch.Tensor], write: Writer | None = None) -> int:
        """Write one load's rows into `kv_caches` (layer name -> paged view) with `write` (default
        `inject_rows`) and ack it to the producer. Any error, an entry that vanished, or a layer of
        the entry that no cache receives marks the request's blocks failed (vLLM recomputes them).
        Returns the rows loaded (0 on failure)."""
        write = write or _inject
        try:
            entry = self.find(spec.token_ids)
            if entry is None:
                raise FileNotFoundError("the fused entry is gone or stale")
            layers = [(name, layer_index(name), kv) for name, kv in kv_caches.items()]
            covered = sorted(index for _, index, _ in layers)
            if covered != list(range(entry.shape.num_layers)):
                raise ValueError(f"paged caches cover layers {covered}, the entry has {entry.shape.num_layers}")
            kv = self.store.open_kv(entry)
            blocks, offsets = slot_mapping(spec.block_ids, self.block_size, spec.start, spec.end)
            # host rows (shm, file) go up as pageable copies: registering a read-only mapping as pinned
            # memory may fail, and a failed CUDA runtime call would surface in an unrelated later kernel
            for name, index, cache in layers:
                write(name, cache, kv[index, spec.start : spec.end], blocks, offsets)
            if layers[0][2].device.type == "cuda":
                torch.cuda.current_stream(layers[0][2].device).synchronize()  # copies done before the ack
            del kv
            self.store.ack(spec.token_ids)
            return spec.end - spec.start
        except Exception as err:  # noqa: BLE001 - every failure is reported, and vLLM recomputes
            log.warning(
                "fused KV load of request %s failed, vLLM recomputes it: %s: %s", spec.req_id, type(err).__name__, err
            )
            with self._lock:
                self.failed_blocks |= spec.block_ids_in_range(self.block_size)
            return 0

    def load(self, loads: Sequence[LoadSpec], kv_caches: dict[str, torch.Tensor], write: Writer | None = None) -> int:
        """`load_one` for every load; rows loaded."""
        return sum(self.load_one(spec, kv_caches, write) for spec in loads)

    def take_failed_blocks(self) -> set[int]:
        with self._lock:
            failed, self.failed_blocks = self.failed_blocks, set()
        return failed


class AsyncLoads:
    """Loads run on one background thread (on a side CUDA stream when the caches are on a GPU);
    `finished` reports each request once its load is over, loaded or failed (vLLM needs both)."""

    def __init__(self, matcher: FusedPromptMatcher) -> None:
        self.matcher = matcher
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragkv-load")
        self.running: dict[str, Future] = {}
        self.stream = None

    def submit(self, spec: LoadSpec, kv_caches: dict[str, torch.Tensor], write: Writer | None = None) -> None:
        self.running[spec.req_id] = self.pool.submit(self._run, spec, kv_caches, write)

    def _run(self, spec: LoadSpec, kv_caches: dict[str, torch.Tensor], write: Writer | None) -> int:
        device = next(iter(kv_caches.values())).device if kv_caches else torch.device("cpu")
        if device.type != "cuda":
            return self.matcher.load_one(spec, kv_caches, write)
        self.stream = self.stream or torch.cuda.Stream(device)
        with torch.cuda.stream(self.stream):
            rows = self.matcher.load_one(spec, kv_caches, write)
        self.stream.synchronize()
        return rows

    def finished(self) -> set[str]:
        """Requests whose load is over since the last call (their failed blocks are already in the
        matcher's `failed_blocks`, which vLLM reads in the same step)."""
        done = {req for req, fut in self.running.items() if fut.done()}
        for req in done:
            self.running.pop(req).result()  # load_one never raises; this surfaces a bug loudly
        return done

    def wait_all(self) -> set[str]:
        for fut in list(self.running.values()):
            fut.exception()
        return self.finished()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
