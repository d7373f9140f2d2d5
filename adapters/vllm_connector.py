"""RagkvConnector: a vLLM v1 KV connector that loads the prompt KV ragkv fused, so that vLLM prefills
only the last prompt token of a fused prompt and then decodes as usual.

Start vLLM with it (the class is built on first access, so `import ragkv` never needs vLLM)::

    vllm serve MODEL --no-enable-prefix-caching --kv-transfer-config '{"kv_connector": "RagkvConnector",
        "kv_connector_module_path": "ragkv.adapters.vllm_connector", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"fused_dir": "/dev/shm/ragkv-fused"}}'

Scheduler side: for a new request it looks up the `FusedKVStore` record of the request's exact prompt
token ids (missing, stale, of another shape or of another model: no match, vLLM prefills normally)
and reports N - 1 - (locally cached tokens) external tokens, loaded asynchronously: the request waits
in WAITING_FOR_REMOTE_KVS while other requests keep stepping. Worker side: `start_load_kv` hands the
load to a background thread (`vllm_loader.AsyncLoads`), which maps the entry (CUDA IPC, shared memory
or file, as its record says) and writes its rows into the request's paged-cache slots through the
attention backend's own cache writer; `get_finished` reports the request once its load is over, and
`get_block_ids_with_load_errors` the blocks of a failed one (vLLM recomputes them under
`kv_load_failure_policy: recompute`).

Extra config: `fused_dir` (required); `model` (the name entries must carry; default vLLM's served
model name; "*" accepts any); `shm_dir` (default: `fused_dir` when under /dev/shm, else
/dev/shm/ragkv-fused); `max_age_s`; `load_async` (default true; false loads inside the step, before
the forward). vLLM's prefix caching must be off (a later prompt would reuse blocks fused for another
prompt): the connector refuses to start with it.
Tensor/pipeline parallelism is not supported (one worker holds all heads and layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..server.fused_store import FusedKVStore, KVShape
from .vllm_loader import (
    AsyncLoads,
    FusedPromptMatcher,
    LoadSpec,
    inject_rows,
    layer_index,
    slot_mapping,
    write_with_backend,
)

__all__ = [
    "FusedPromptMatcher",
    "LoadSpec",
    "connector_settings",
    "inject_rows",
    "layer_index",
    "slot_mapping",
    "write_with_backend",
]  # + RagkvConnector (lazy)

PREFIX_CACHING_REFUSED = (
    "RagkvConnector needs vLLM's prefix caching off (--no-enable-prefix-caching): the blocks it loads "
    "hold KV fused for one prompt, which a later prompt sharing those blocks would reuse"
)


@dataclass(frozen=True)
class ConnectorSettings:
    fused_dir: str
    model: str  # "" = any
    shm_dir: str | None
    max_age_s: float | None
    load_async: bool


def connector_settings(extra: dict | None, served_model_name, prefix_caching: bool, tp: int, pp: int):
    """The connector's settings from `kv_connector_extra_config` and vLLM's config; ValueError with
    what to change for a setup the connector cannot serve correctly."""
    extra = extra or {}
    if not extra.get("fused_dir"):
        raise ValueError("RagkvConnector needs kv_connector_extra_config.fused_dir: the folder ragkv publishes to")
    if tp != 1 or pp != 1:
        raise ValueError("RagkvConnector supports tensor_parallel_size = pipeline_parallel_size = 1 only")
    if prefix_caching:
        raise ValueError(PREFIX_CACHING_REFUSED)
    if isinstance(served_model_name, (list, tuple)):
        served_model_name = served_model_name[0] if served_model_name else ""
    model = str(extra.get("model", served_model_name or ""))
    max_age = extra.get("max_age_s")
    return ConnectorSettings(
        fused_dir=str(extra["fused_dir"]),
        model="" if model == "*" else model,
        shm_dir=extra.get("shm_dir", "default"),
        max_age_s=None if max_age is None else float(max_age),
        load_async=bool(extra.get("load_async", True)),
    )


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
        """Loads ragkv's fused prompt KV (all but the last token) published beside vLLM."""

        def __init__(self, vllm_config, role, kv_cache_config=None):
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            par, mc = vllm_config.parallel_config, vllm_config.model_config
            self.settings = s = connector_settings(
                self._kv_transfer_config.kv_connector_extra_config,
                getattr(mc, "served_model_name", ""),
                bool(getattr(vllm_config.cache_config, "enable_prefix_caching", False)),
                par.tensor_parallel_size,
                par.pipeline_parallel_size,
            )
            shape = KVShape(mc.get_num_layers(par), mc.get_total_num_kv_heads(), mc.get_head_size())
            store = FusedKVStore(s.fused_dir, model=s.model, shm_dir=s.shm_dir)
            self.matcher = FusedPromptMatcher(store, shape, vllm_config.cache_config.block_size, s.max_age_s)
            self.model_dtype = mc.dtype
            self.kv_caches: dict[str, torch.Tensor] = {}
            self.loads = AsyncLoads(self.matcher)

        # -- scheduler side ------------------------------------------------------------------------
        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            n = self.matcher.num_new_matched_tokens(request.prompt_token_ids, num_computed_tokens)
            return n, n > 0 and self.settings.load_async

        def update_state_after_alloc(self, request, blocks, num_external_tokens):
            if num_external_tokens > 0:
                table = blocks.get_block_ids()[0] if blocks is not None else ()
                self.matcher.after_alloc(request.request_id, request.prompt_token_ids, num_external_tokens, table)

        def build_connector_meta(self, scheduler_output):
            tables = {r.req_id: r.block_ids[0] for r in scheduler_output.scheduled_new_reqs}
            return RagkvConnectorMetadata(self.matcher.take_loads(tables))

        def request_finished(self, request, block_ids):
            self.matcher.forget(request.request_id)
            return False, None  # vLLM itself holds a loading request's blocks until get_finished reports it

        # -- worker side ---------------------------------------------------------------------------
        def register_kv_caches(self, kv_caches):
            self.kv_caches = dict(kv_caches)

        def _caches_and_writer(self, forward_context):
            layers = getattr(forward_context, "no_compile_layers", None) or {}
            caches = {}
            for name, layer in layers.items():
                kv = self.kv_caches.get(name, getattr(layer, "kv_cache", None))
                if isinstance(kv, (list, tuple)) and kv:  # older vLLM: one cache per virtual engine
                    kv = kv[0]
                if isinstance(kv, torch.Tensor) and kv.numel() > 0:
                    caches[name] = kv
            bs, dtype = self.matcher.block_size, self.model_dtype

            def write(name, kv, rows, blocks, offsets):
                write_with_backend(layers[name], kv, rows, blocks, offsets, bs, dtype)

            return caches, write

        def start_load_kv(self, forward_context, **kwargs):
            meta = self._get_connector_metadata()
            if not meta.loads:
                return
            caches, write = self._caches_and_writer(forward_context)
            for spec in meta.loads:
                if self.settings.load_async:
                    self.loads.submit(spec, caches, write)
                else:
                    self.matcher.load_one(spec, caches, write)

        def get_finished(self, finished_req_ids):
            done = self.loads.finished()
            return None, (done or None)

        def wait_for_layer_load(self, layer_name):
            return  # loads complete before vLLM schedules their request (async) or before the forward (sync)

        def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
            return  # a consumer: ragkv writes the fused KV, vLLM only reads it

        def wait_for_save(self):
            return

        def get_block_ids_with_load_errors(self):
            return self.matcher.take_failed_blocks()

        def shutdown(self):
            self.loads.shutdown()

    for cls in (RagkvConnector, RagkvConnectorMetadata):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    globals()["RagkvConnectorMetadata"] = RagkvConnectorMetadata
    return RagkvConnector
