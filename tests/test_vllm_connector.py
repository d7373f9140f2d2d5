"""The vLLM connector's logic without vLLM (tests/test_vllm_connector_class.py binds the class to a fake
of vLLM's types): matching, loading into paged slots, failures as failed blocks, and the end-to-end identity:
the fused rows loaded into a paged cache, plus the last prompt token prefilled by transformers, give
ragkv's own first-token logits."""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from tiny_models import cache_kwarg

from ragkv.adapters import vllm_connector as vc
from ragkv.server.fused_store import FusedKVStore, KVShape
from ragkv.server.fused_store import prompt_hash as prompt_key

SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=4)
BLOCK = 4
IDS = list(range(100, 111))  # N = 11: 10 fused rows


def _store(tmp_path, model=""):
    return FusedKVStore(tmp_path, model=model, shm_dir=tmp_path / "shm")


def _publish(store: FusedKVStore, ids=IDS, seed=0, model=None):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(SHAPE.num_kv_heads, len(ids), SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    values = [torch.randn(SHAPE.num_kv_heads, len(ids), SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    store.publish(ids, keys, values, model=model)
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
    store = _store(tmp_path)
    _publish(store)
    m = vc.FusedPromptMatcher(store, SHAPE, BLOCK)
    assert m.num_new_matched_tokens(IDS, 0) == len(IDS) - 1
    assert m.num_new_matched_tokens(IDS, 8) == len(IDS) - 1 - 8  # vLLM had 2 blocks locally
    assert m.num_new_matched_tokens(IDS, 12) == 0
    assert m.num_new_matched_tokens(IDS[:-1], 0) == 0  # another prompt: vLLM prefills normally
    assert m.num_new_matched_tokens(None, 0) == 0  # prompt embeddings: no ids
    assert vc.FusedPromptMatcher(store, KVShape(2, 2, 8), BLOCK).num_new_matched_tokens(IDS, 0) == 0  # stale


def test_loaded_rows_land_in_the_request_slots_and_nowhere_else(tmp_path):
    store = _store(tmp_path)
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
    store = _store(tmp_path)
    _publish(store)
    m = vc.FusedPromptMatcher(store, SHAPE, BLOCK)
    m.after_alloc("r1", IDS, len(IDS) - 1)
    [spec] = m.take_loads({"r1": [5, 2, 7]})
    store.remove(IDS)  # deleted between the scheduler's match and the worker's load
    caches = _paged()
    assert m.load([spec], caches) == 0
    assert m.take_failed_blocks() == {5, 2, 7} and m.take_failed_blocks() == set()
    assert not any(kv.any() for kv in caches.values())


def _one_load(tmp_path, table=(5, 2, 7)):
    store = _store(tmp_path)
    _publish(store)
    m = vc.FusedPromptMatcher(store, SHAPE, BLOCK)
    m.after_alloc("r1", IDS, len(IDS) - 1, table)
    [spec] = m.take_loads()
    return store, m, spec


def test_a_load_that_writes_no_layer_fails_its_blocks(tmp_path):
    """Hazard (a): no cache tensor recognised -> failed blocks, never "loaded" over unwritten KV."""
    _, m, spec = _one_load(tmp_path)
    assert m.load_one(spec, {}) == 0
    assert m.take_failed_blocks() == {5, 2, 7}
    _, m, spec = _one_load(tmp_path)
    half = dict(list(_paged().items())[:1])  # layer 1 of the entry has no cache to go to
    assert m.load_one(spec, half) == 0 and m.take_failed_blocks() == {5, 2, 7}


@pytest.mark.parametrize(
    "breakage",
    ["bad layer name", "writer raises", "writer raises KeyError", "table too short", "unreadable data"],
)
def test_every_error_inside_a_load_fails_its_blocks(tmp_path, breakage):
    """Hazard (b): every error inside the load is reported as failed blocks (vLLM recomputes them)."""
    store, m, spec = _one_load(tmp_path)
    caches, write = _paged(), None
    if breakage == "bad layer name":
        caches = {"model.attn0": caches.popitem()[1], **caches}
    elif breakage == "writer raises":
        write = lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))  # noqa: E731
    elif breakage == "writer raises KeyError":
        write = lambda *a: {}["missing layer"]  # noqa: E731
    elif breakage == "table too short":
        spec.block_ids = [5]
    else:
        for f in (tmp_path / "shm").iterdir():
            f.write_bytes(b"torn")
    assert m.load_one(spec, caches, write) == 0
    assert m.take_failed_blocks() == spec.block_ids_in_range(BLOCK) != set()


def test_a_successful_load_acks_so_the_producer_can_free_the_entry(tmp_path):
    store, m, spec = _one_load(tmp_path)
    assert prompt_key(IDS) in store.ledger.pins
    assert m.load_one(spec, _paged()) == len(IDS) - 1
    assert store.reap() == [prompt_key(IDS)] and store.find(IDS) is None and store.ledger.held_bytes == 0


def test_async_loads_report_each_request_once_loaded_or_failed(tmp_path):
    store, m, spec = _one_load(tmp_path)
    want = store.open_kv(store.find(IDS)).clone()
    loads = vc.AsyncLoads(m)
    caches = _paged()
    loads.submit(spec, caches)
    bad = vc.LoadSpec("r2", [1, 2, 3], [4], 0, 2)  # no entry for these ids
    loads.submit(bad, caches)
    assert loads.wait_all() == {"r1", "r2"} and loads.finished() == set()
    assert m.take_failed_blocks() == {4}
    for layer, kv in enumerate(caches.values()):
        assert torch.equal(_gather(kv, [5, 2, 7], 0, len(IDS) - 1), want[layer])
    loads.shutdown()


def test_rows_that_do_not_fit_the_paged_cache_are_refused():
    with pytest.raises(ValueError, match=r"expected rows \[T, H_kv, C\]"):
        vc.inject_rows(torch.zeros(2, 2, 4, 8), torch.zeros(3, 2, 6), torch.zeros(3, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="more than the 1 blocks"):
        vc.slot_mapping([0], 4, 0, 5)


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
    store = _store(tmp_path)
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
            **cache_kwarg(hf, DynamicCache(ddp_cache_data=layers)),
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
