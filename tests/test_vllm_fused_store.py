"""FusedKVStore: fused prompt KV published by ragkv and found again by the exact prompt token ids."""

from __future__ import annotations

import time

import pytest
import torch

from ragkv.server.fused_store import FusedKVStore, KVShape, prompt_hash

SHAPE = KVShape(num_layers=3, num_kv_heads=2, head_dim=4)
IDS = [5, 9, 11, 3, 7, 2, 8]  # N = 7: the entry holds 6 rows


def _kv(rows: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, SHAPE.num_kv_heads, rows, SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    values = [torch.randn(1, SHAPE.num_kv_heads, rows, SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    return keys, values


def test_round_trip_holds_all_but_the_last_token_in_vllm_cell_layout(tmp_path):
    store = FusedKVStore(tmp_path, model="m")
    keys, values = _kv()
    path = store.publish(IDS, keys, values)
    assert path.name == prompt_hash(IDS) + ".safetensors"
    entry = store.find(IDS, SHAPE)
    assert entry is not None and entry.num_rows == len(IDS) - 1 and entry.shape == SHAPE
    for layer in range(SHAPE.num_layers):
        rows = FusedKVStore.read_layer(entry, layer)  # [N-1, H, 2D]
        assert rows.shape == (6, 2, 8)
        assert torch.equal(rows[..., :4], keys[layer][0, :, :6].transpose(0, 1))
        assert torch.equal(rows[..., 4:], values[layer][0, :, :6].transpose(0, 1))
    assert torch.equal(FusedKVStore.read_layer(entry, 1, 2, 5), FusedKVStore.read_layer(entry, 1)[2:5])


def test_publish_converts_dtype(tmp_path):
    store = FusedKVStore(tmp_path)
    keys, values = _kv()
    store.publish(IDS, keys, values, dtype=torch.bfloat16)
    entry = store.find(IDS)
    assert entry.dtype == "bfloat16"
    assert FusedKVStore.read_layer(entry, 0).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "other",
    [IDS[:-1], IDS + [4], [IDS[0] + 1] + IDS[1:], list(reversed(IDS))],
    ids=["prefix", "longer", "first-differs", "reordered"],
)
def test_other_token_ids_do_not_match(tmp_path, other):
    store = FusedKVStore(tmp_path)
    store.publish(IDS, *_kv())
    assert store.find(other) is None


def test_a_file_under_the_right_name_with_other_ids_is_a_miss(tmp_path):
    """A hash collision (simulated by renaming) must not hand over another prompt's KV."""
    store = FusedKVStore(tmp_path)
    other = [1, 2, 3, 4, 5, 6, 7]
    store.publish(other, *_kv()).rename(store.path(IDS))
    assert store.find(IDS) is None


def test_stale_entries_are_misses(tmp_path, monkeypatch):
    FusedKVStore(tmp_path, model="model-a").publish(IDS, *_kv())
    assert FusedKVStore(tmp_path, model="model-b").find(IDS) is None  # published for another model
    store = FusedKVStore(tmp_path, model="model-a")
    assert store.find(IDS, KVShape(3, 2, 8)) is None  # another head size
    assert store.find(IDS, KVShape(4, 2, 4)) is None  # another layer count
    assert store.find(IDS, SHAPE, max_age_s=60) is not None
    later = time.time() + 120
    monkeypatch.setattr(time, "time", lambda: later)
    assert store.find(IDS, SHAPE, max_age_s=60) is None  # older than max_age_s


def test_missing_and_corrupt_entries_are_misses(tmp_path):
    store = FusedKVStore(tmp_path)
    assert store.find(IDS) is None  # nothing published
    store.publish(IDS, *_kv())
    store.path(IDS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert store.find(IDS) is None
    store.path(IDS).write_bytes(b"")
    assert store.find(IDS) is None
    assert store.remove(IDS) and not store.remove(IDS)


def test_publish_leaves_no_temporary_files_and_evicts_the_oldest(tmp_path):
    store = FusedKVStore(tmp_path, max_entries=2)
    prompts = [[i, i + 1, i + 2] for i in range(3)]
    for i, p in enumerate(prompts):
        store.publish(p, *_kv(seed=i))
        time.sleep(0.01)  # distinct mtimes
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(store.path(p).name for p in prompts[1:])
    assert store.find(prompts[0]) is None and store.find(prompts[2]) is not None


def test_bad_input_is_refused_with_what_is_accepted(tmp_path):
    store = FusedKVStore(tmp_path)
    keys, values = _kv()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        store.publish([1], keys, values)
    with pytest.raises(ValueError, match="one key and one value tensor per layer"):
        store.publish(IDS, keys, values[:2])
    with pytest.raises(ValueError, match=r"R >= 6 rows"):
        store.publish(IDS, [k[:, :, :3] for k in keys], [v[:, :, :3] for v in values])
    with pytest.raises(ValueError, match=r"accepted: \[H_kv, R, D\]"):
        store.publish(IDS, [k[0, 0] for k in keys], [v[0, 0] for v in values])
    with pytest.raises(ValueError, match="max_entries"):
        FusedKVStore(tmp_path, max_entries=0)
    store.publish(IDS, keys, values)
    entry = store.find(IDS)
    with pytest.raises(ValueError, match="outside the entry's 6 rows"):
        FusedKVStore.read_layer(entry, 0, 0, 7)
    with pytest.raises(ValueError, match="outside the entry's 3 layers"):
        FusedKVStore.read_layer(entry, 3)
