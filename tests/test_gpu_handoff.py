"""The CUDA part of the hand-off (`pytest -m gpu` on a CUDA machine; skipped without CUDA): the fused KV
published as CUDA IPC handles is mapped by another process on the same GPU and copied device to device
into its paged cache, exactly; the producer's tensor stays alive while pinned and is freed when released;
a GPU tensor published along shm or file arrives exactly too."""

from __future__ import annotations

import time

import pytest
import torch
from checkout_path import checkout_first_on_sys_path

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def consumer(tmp_path, monkeypatch):
    """A consumer process (bench_handoff's) with this checkout importable, and its store folder."""
    checkout_first_on_sys_path(tmp_path, monkeypatch)
    from bench_handoff import Consumer

    from ragkv.server.fused_store import FusedKVStore, KVShape

    shape = KVShape(4, 2, 64)
    store = FusedKVStore(tmp_path / "fused", shm_dir=tmp_path / "fused", budget_bytes=1 << 30)
    store.root.mkdir()
    proc = Consumer(store.root, store.root, shape, 600, "cuda", "bfloat16")
    yield store, proc, shape
    proc.close()
    store.ledger.release_all()


def _kv(shape, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda: torch.randn(1, shape.num_kv_heads, n, shape.head_dim, generator=g, device="cuda")  # noqa: E731
    return [make().bfloat16() for _ in range(shape.num_layers)], [make().bfloat16() for _ in range(shape.num_layers)]


@pytest.mark.parametrize("path", ["cuda_ipc", "shm", "file"])
def test_another_process_loads_the_exact_rows(consumer, path):
    from bench_handoff import check_sample

    from ragkv.server.fused_store import stack_rows

    store, proc, shape = consumer
    ids = list(range(3, 3 + 517))
    keys, values = _kv(shape, len(ids))
    store.handoff = path
    record = store.publish(ids, keys, values)
    assert record.path == path and record.fallback == ()
    got = proc.load(ids)
    assert got["rows"] == len(ids) - 1 and got["failed"] == 0
    assert check_sample(got["sample"], stack_rows(ids, keys, values, None))
    assert store.reap() == [store.path(ids).stem]  # the consumer acked: released


def test_the_ipc_tensor_lives_while_pinned_and_is_freed_when_released(consumer):
    store, proc, shape = consumer
    ids = list(range(10, 400))
    keys, values = _kv(shape, len(ids), seed=1)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    store.handoff = "cuda_ipc"
    record = store.publish(ids, keys, values)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before >= record.nbytes  # the published copy is held
    assert proc.load(ids)["rows"] == len(ids) - 1
    held = torch.cuda.memory_allocated()
    assert store.remove(ids)
    deadline = time.monotonic() + 10
    while torch.cuda.memory_allocated() > held - record.nbytes and time.monotonic() < deadline:
        torch.cuda.ipc_collect()  # torch frees a shared block once the consumer dropped its mapping
        time.sleep(0.05)
    assert torch.cuda.memory_allocated() <= held - record.nbytes  # released: the producer's copy is gone
