"""The hand-off's CPU-testable parts: the record (what it carries, what it refuses), which path is tried
in which order, the pin ledger's byte bound and lifetime, and the CUDA IPC locator's checks (the
mapping itself needs two processes on one GPU: tests/test_gpu_handoff.py)."""

from __future__ import annotations

import json

import pytest
import torch

from ragkv.server import fused_ipc
from ragkv.server.fused_ledger import PinLedger
from ragkv.server.fused_record import FusedRecord, KVShape, candidate_paths

SHAPE = KVShape(num_layers=32, num_kv_heads=8, head_dim=128)  # the Llama-3.1-8B shape


def _locator(**over):
    loc = {
        "device_uuid": "GPU-1234",
        "handle": "ab" * 32,
        "storage_size": 4096,
        "storage_offset": 512,
        "ref_counter_handle": "cd" * 8,
        "ref_counter_offset": 0,
        "event_handle": "ef" * 16,
        "event_sync_required": True,
        "dtype": "bfloat16",
        "shape": [32, 4, 8, 256],
        "stride": [8192, 2048, 256, 1],
        "offset": 0,
    }
    return {**loc, **over}


def test_the_record_round_trips_and_sizes_the_entry():
    record = FusedRecord(tuple(range(20_001)), SHAPE, "bfloat16", "llama-8b", "cuda_ipc", _locator(), ("x: y",))
    assert record.num_rows == 20_000
    assert record.nbytes == 32 * 20_000 * 8 * 256 * 2  # 128 KiB per token, as the issue measured
    again = FusedRecord.from_json(record.to_json())
    assert again == record
    assert json.loads(record.to_json())["path"] == "cuda_ipc"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.update(format="ragkv-fused-kv/1"), "not a ragkv-fused-kv/2 record"),
        (lambda b: b.pop("token_ids"), "malformed"),
        (lambda b: b.update(path="rdma"), "hand-off path 'rdma' is unknown"),
        (lambda b: b.update(dtype="int8"), "dtype 'int8' is not accepted"),
        (lambda b: b.update(token_ids=[7]), "at least 2 tokens"),
        (lambda b: b.update(locator=[1, 2]), "locator must be an object"),
    ],
)
def test_a_malformed_record_is_refused(mutate, message):
    body = json.loads(FusedRecord((1, 2, 3), SHAPE, "float16", "m", "file", {"file": "x"}).to_json())
    mutate(body)
    with pytest.raises(ValueError, match=message):
        FusedRecord.from_json(json.dumps(body))


def test_paths_are_tried_best_first_and_file_always_remains():
    assert candidate_paths("cuda") == ["cuda_ipc", "shm", "file"]
    assert candidate_paths("cpu") == ["shm", "file"]
    assert candidate_paths("cuda", shm_available=False) == ["cuda_ipc", "file"]
    assert candidate_paths("cuda", "shm") == ["shm", "file"]
    assert candidate_paths("cpu", "cuda_ipc") == ["file"]  # CPU tensors cannot travel by CUDA IPC
    assert candidate_paths("cuda", "file") == ["file"]
    with pytest.raises(ValueError, match="accepted: auto, cuda_ipc, shm, file"):
        candidate_paths("cuda", "nvlink")


def test_the_ledger_bounds_bytes_and_never_drops_an_unloaded_entry():
    released = []
    now = [0.0]
    ledger = PinLedger(budget_bytes=100, max_pin_s=30, clock=lambda: now[0])
    assert ledger.admit("a", 60) is None
    ledger.pin("a", 60, lambda: released.append("a"))
    assert "60 of 100 bytes pinned by 1 entries" in ledger.admit("b", 50)
    assert ledger.admit("a", 100) is None  # a re-publish of the same prompt replaces it
    assert ledger.admit("b", 40) is None
    ledger.pin("b", 40, lambda: released.append("b"))
    assert released == [] and ledger.held_bytes == 100
    assert ledger.release("a") and not ledger.release("a") and released == ["a"]
    now[0] = 31.0
    assert ledger.expire() == ["b"] and released == ["a", "b"] and ledger.held_bytes == 0
    ledger.pin("c", 10, lambda: released.append("c"))
    ledger.pin("c", 20, lambda: released.append("c2"))  # replaced: the old holding is released
    assert released[-1] == "c" and ledger.held_bytes == 20
    with pytest.raises(ValueError, match=">= 1 byte"):
        PinLedger(0)


def test_the_ipc_locator_is_checked_before_any_cuda_call():
    assert fused_ipc.check_locator(_locator()) == _locator()
    with pytest.raises(ValueError, match="'handle' must be a str"):
        fused_ipc.check_locator(_locator(handle=None))
    with pytest.raises(ValueError):
        fused_ipc.check_locator(_locator(handle="not hex"))
    with pytest.raises(ValueError, match="cannot be handed off"):
        fused_ipc.check_locator(_locator(dtype="int64"))
    with pytest.raises(ValueError, match="must be int lists"):
        fused_ipc.check_locator(_locator(stride=[1]))


def test_the_consumer_maps_the_producers_gpu_by_uuid_not_by_index():
    assert fused_ipc.local_device_for("GPU-b", ["GPU-a", "GPU-b"]) == 1  # CUDA_VISIBLE_DEVICES reordered
    with pytest.raises(ValueError, match="does not see"):
        fused_ipc.local_device_for("GPU-c", ["GPU-a", "GPU-b"])


def test_only_cuda_tensors_are_exported_and_only_float_kv():
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        fused_ipc.export_cuda(torch.zeros(2))
    assert fused_ipc.dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="accepted: float32, float16, bfloat16"):
        fused_ipc.dtype_name(torch.int8)
