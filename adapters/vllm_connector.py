"""RagkvConnector: a vLLM v1 KV connector that loads the prompt KV ragkv fused, so that vLLM prefills
only the last prompt token of a fused prompt and then decodes as usual.

Start vLLM with it (the class is built on first access, so `import ragkv` never needs vLLM)::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "RagkvConnector",
        "kv_connector_module_path": "ragkv.adapters.vllm_connector", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"fused_dir": "/dev/shm/ragkv-fused"}}'

Scheduler side: for a new request it looks up the `FusedKVStore` entry of the request's exact
prompt token ids (missing, stale or of another shape: no match, vLLM prefills normally) and reports
N - 1 - (locally cached tokens) external tokens. Worker side: `start_load_kv` writes those rows of
every layer into the request's paged-cache slots through the attention backend's own cache writer
(`do_kv_cache_update`, the call vLLM's forward makes; the CPU backend keeps a block's keys then its
values per head, not vLLM's generic [blocks, H_kv, block_size, D_k + D_v] K|V rows); a failed read
is reported with `get_block_ids_with_load_errors`, which vLLM recomputes under
`kv_load_failure_policy: recompute`. Extra config: `fused_dir` (required), `model` (entries
published for another model name are stale; default: not checked), `max_age_s`.
Tensor/pipeline parallelism is not supported (one worker holds all heads and layers).

The logic lives in plain classes (`FusedPromptMatcher`, `LoadSpec`, `inject_rows`) that tests drive
without vLLM; `RagkvConnector` only binds them to `KVConnectorBase_V1`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError

from ..server.fused_store import FusedEntry, FusedKVStore, KVShape

__all__ = ["FusedPromptMatcher", "LoadSpec", "inject_rows", "layer_index", "slot_mapping"]  # + RagkvConnector (lazy)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


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
    kv_layer[blocks.to(kv_layer.device), :, offsets.to(kv_layer.device)] = rows.to(kv_layer.device, kv_layer.dtype)


Writer = Callable[
    [str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None
]  # name, cache, rows, blocks, offs


def write_with_backend(layer, kv_layer: torch.Tensor, rows: torch.Tensor, blocks, offsets, block_size: int, dtype):
    """Write rows [T, H_kv, 2 D] through the attention backend's own cache writer
    (`layer.impl.do_kv_cache_update`, as vLLM's forward does), so the backend's block layout (e.g. the
    CPU backend's K block then V block per head) is right by construction; plain `inject_rows` for a
    layer without one."""
    impl = getattr(layer, "impl", None)
    if impl is None or not hasattr(impl, "do_kv_cache_update"):
        return inject_rows(kv_layer, rows, blocks, offsets)
    d = rows.shape[-1] // 2
    rows = rows.to(kv_layer.device, dtype)
    slots = (blocks * block_size + offsets).to(kv_layer.device)
    impl.do_kv_cache_update(layer, rows[..., :d].contiguous(), rows[..., d:].contiguous(), kv_layer, slots)


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
    """The connector's decisions, free of vLLM types: matches on the scheduler, loads on the worker."""

    store: FusedKVStore
    shape: KVShape
    block_size: int
    max_age_s: float | None = None
    pending: dict[str, tuple[list[int], int, int]] = field(default_factory=dict)  # req -> (ids, start, end)
    failed_blocks: set[int] = field(default_factory=set)

    # -- scheduler side --------------------------------------------------------------------------
    def find(self, token_ids: Sequence[int] | None) -> FusedEntry | None:
        if not token_ids or len(token_ids) < 2:
            return None
        return self.store.find(token_ids, self.shape, self.max_age_s)

    def num_new_matched_tokens(self, token_ids: Sequence[int] | None, num_computed_tokens: int) -> int:
        """External tokens beyond `num_computed_tokens`: N - 1 - computed for a fused prompt, else 0."""
        entry = self.find(token_ids)
        if entry is None:
            return 0
        return max(0, entry.num_rows - num_computed_tokens)

    def after_alloc(self, req_id: str, token_ids: Sequence[int], num_external_tokens: int) -> None:
        """Remember to load the last `num_external_tokens` rows before the prompt's last token."""
        if num_external_tokens > 0:
            end = len(token_ids) - 1
            self.pending[req_id] = (list(token_ids), end - num_external_tokens, end)

    def take_loads(self, block_ids_of: dict[str, list[int]]) -> list[LoadSpec]:
        """LoadSpecs of the pending requests scheduled now (`block_ids_of`: req_id -> block table)."""
        loads = []
        for req_id in [r for r in self.pending if r in block_ids_of]:
            ids, start, end = self.pending.pop(req_id)
            loads.append(LoadSpec(req_id, ids, list(block_ids_of[req_id]), start, end))
        return loads

    def forget(self, req_id: str) -> None:
        self.pending.pop(req_id, None)

    # -- worker side -----------------------------------------------------------------------------
    def load(self, loads: Sequence[LoadSpec], kv_caches: dict[str, torch.Tensor], write: Writer | None = None) -> int:
        """Write every load's rows into `kv_caches` (layer name -> paged view) with `write` (default
        `inject_rows`). A load whose entry has vanished or does not fit marks its blocks failed (vLLM
        recomputes them). Returns rows loaded."""
        write = write or (lambda name, kv, rows, blocks, offsets: inject_rows(kv, rows, blocks, offsets))
        layers = [(name, layer_index(name), kv) for name, kv in kv_caches.items()]
        done = 0
        for spec in loads:
            try:
                entry = self.find(spec.token_ids)
                if entry is None:
                    raise FileNotFoundError("the fused entry is gone or stale")
                blocks, offsets = slot_mapping(spec.block_ids, self.block_size, spec.start, spec.end)
                for name, index, kv in layers:
                    write(name, kv, FusedKVStore.read_layer(entry, index, spec.start, spec.end), blocks, offsets)
                done += spec.end - spec.start
            except (OSError, ValueError, RuntimeError, SafetensorError):
                self.failed_blocks |= spec.block_ids_in_range(self.block_size)
        return done

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed


def __getattr__(name: str):
    if name in ("RagkvConnector", "RagkvConnectorMetadata"):  # pickled metadata names the latter
        globals()["RagkvConnector"] = _connector_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _connector_class():
    """Build `RagkvConnector` on `KVConnectorBase_V1` (imports vLLM; only vLLM's loader asks for it)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
    )

    @dataclass
    class RagkvConnectorMetadata(KVConnectorMetadata):
        loads: list[LoadSpec] = field(default_factory=list)

    class RagkvConnector(KVConnectorBase_V1):
        """Loads ragkv's fused prompt KV (all but the last token) from a shared folder."""

        def __init__(self, vllm_config, role, kv_cache_config=None):
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            extra = self._kv_transfer_config.kv_connector_extra_config or {}
            if not extra.get("fused_dir"):
                raise ValueError(
                    "RagkvConnector needs kv_connector_extra_config.fused_dir: the folder ragkv publishes to"
                )
            par = vllm_config.parallel_config
            if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
                raise ValueError("RagkvConnector supports tensor_parallel_size = pipeline_parallel_size = 1 only")
            mc = vllm_config.model_config
            shape = KVShape(mc.get_num_layers(par), mc.get_total_num_kv_heads(), mc.get_head_size())
            max_age = extra.get("max_age_s")
            self.matcher = FusedPromptMatcher(
                FusedKVStore(extra["fused_dir"], model=str(extra.get("model", ""))),
                shape,
                vllm_config.cache_config.block_size,
                None if max_age is None else float(max_age),
            )
            self.model_dtype = mc.dtype
            self.requests: dict = {}  # req_id -> Request, pending a load (scheduler side)

        # scheduler side
        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            return self.matcher.num_new_matched_tokens(request.prompt_token_ids, num_computed_tokens), False

        def update_state_after_alloc(self, request, blocks, num_external_tokens):
            if num_external_tokens > 0:
                self.matcher.after_alloc(request.request_id, request.prompt_token_ids, num_external_tokens)

        def build_connector_meta(self, scheduler_output):
            tables = {r.req_id: r.block_ids[0] for r in scheduler_output.scheduled_new_reqs}
            cached = scheduler_output.scheduled_cached_reqs
            for i, req_id in enumerate(cached.req_ids):  # resumed after preemption: its whole table is new
                if req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                    tables[req_id] = cached.new_block_ids[i][0]
            return RagkvConnectorMetadata(self.matcher.take_loads(tables))

        def request_finished(self, request, block_ids):
            self.matcher.forget(request.request_id)
            return False, None

        # worker side
        def start_load_kv(self, forward_context, **kwargs):
            meta = self._get_connector_metadata()
            if not meta.loads:
                return
            caches, layers = {}, forward_context.no_compile_layers
            for name, layer in layers.items():
                kv = getattr(layer, "kv_cache", None)
                if isinstance(kv, torch.Tensor) and kv.dim() == 4:
                    caches[name] = kv
            bs, dtype = self.matcher.block_size, self.model_dtype

            def write(name, kv, rows, blocks, offsets):
                write_with_backend(layers[name], kv, rows, blocks, offsets, bs, dtype)

            self.matcher.load(meta.loads, caches, write)

        def wait_for_layer_load(self, layer_name):
            return

        def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
            return  # a consumer: ragkv writes the fused KV, vLLM only reads it

        def wait_for_save(self):
            return

        def get_block_ids_with_load_errors(self):
            return self.matcher.take_failed_blocks()

    for cls in (RagkvConnector, RagkvConnectorMetadata):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    globals()["RagkvConnectorMetadata"] = RagkvConnectorMetadata
    return RagkvConnector
