"""FusedKVStore: fused prompt KV published by ragkv along a hand-off path and found again by the exact
prompt token ids; entries pinned (bounded by bytes) until the consumer acks the load or the request ends."""

from __future__ import annotations

import json
import stat
import time

import pytest
import torch

from ragkv.server.fused_store import FusedKVStore, HandoffRefused, KVShape, prompt_hash

SHAPE = KVShape(num_layers=3, num_kv_heads=2, head_dim=4)
IDS = [5, 9, 11, 3, 7, 2, 8]  # N = 7: the entry holds 6 rows
ENTRY_BYTES = 3 * 6 * 2 * 8 * 4  # layers * rows * H * 2D * fp32


def _kv(rows: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, SHAPE.num_kv_heads, rows, SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    values = [torch.randn(1, SHAPE.num_kv_heads, rows, SHAPE.head_dim, generator=g) for _ in range(SHAPE.num_layers)]
    return keys, values


def _store(tmp_path, **kw) -> FusedKVStore:
    return FusedKVStore(tmp_path / "fused", shm_dir=tmp_path / "shm", **kw)


@pytest.mark.parametrize("handoff", ["shm", "file"])
def test_round_trip_holds_all_but_the_last_token_in_vllm_cell_layout(tmp_path, handoff):
    store = _store(tmp_path, model="m", handoff=handoff)
    keys, values = _kv()
    record = store.publish(IDS, keys, values)
    assert record.path == handoff and record.fallback == () and record.nbytes == ENTRY_BYTES
    assert store.path(IDS).name == prompt_hash(IDS) + ".json"
    entry = store.find(IDS, SHAPE)
    assert entry is not None and entry.num_rows == len(IDS) - 1 and entry.shape == SHAPE and entry.path == handoff
    kv = store.open_kv(entry)
    assert kv.shape == (3, 6, 2, 8)
    for layer in range(SHAPE.num_layers):
        assert torch.equal(kv[layer, :, :, :4], keys[layer][0, :, :6].transpose(0, 1))
        assert torch.equal(kv[layer, :, :, 4:], values[layer][0, :, :6].transpose(0, 1))


def test_the_record_says_which_path_was_taken_and_why_not_the_better_one(tmp_path):
    blocker = tmp_path / "shm"
    blocker.write_text("a file where the shared-memory folder should be")
    store = FusedKVStore(tmp_path / "fused", shm_dir=blocker)
    record = store.publish(IDS, *_kv())
    assert record.path == "file" and len(record.fallback) == 1 and record.fallback[0].startswith("shm: ")
    on_disk = json.loads(store.path(IDS).read_text())
    assert on_disk["path"] == "file" and on_disk["token_ids"] == IDS and on_disk["dtype"] == "float32"
    assert on_disk["shape"] == {"num_layers": 3, "num_kv_heads": 2, "head_dim": 4}
    keys, _ = _kv()
    assert torch.equal(store.open_kv(store.find(IDS))[1, :, :, :4], keys[1][0, :, :6].transpose(0, 1))


def test_publish_converts_dtype(tmp_path):
    store = _store(tmp_path)
    keys, values = _kv()
    store.publish(IDS, keys, values, dtype=torch.bfloat16)
    entry = store.find(IDS)
    assert entry.dtype == "bfloat16" and store.open_kv(entry).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "other",
    [IDS[:-1], IDS + [4], [IDS[0] + 1] + IDS[1:], list(reversed(IDS))],
    ids=["prefix", "longer", "first-differs", "reordered"],
)
def test_other_token_ids_do_not_match(tmp_path, other):
    store = _store(tmp_path)
    store.publish(IDS, *_kv())
    assert store.find(other) is None


def test_a_record_under_the_right_name_with_other_ids_is_a_miss(tmp_path):
    """A hash collision (simulated by renaming) must not hand over another prompt's KV."""
    store = _store(tmp_path)
    store.publish([1, 2, 3, 4, 5, 6, 7], *_kv())
    store.path([1, 2, 3, 4, 5, 6, 7]).rename(store.path(IDS))
    assert store.find(IDS) is None


def test_stale_entries_are_misses(tmp_path, monkeypatch):
    _store(tmp_path, model="model-a").publish(IDS, *_kv())
    assert _store(tmp_path, model="model-b").find(IDS) is None  # published for another model
    store = _store(tmp_path, model="model-a")
    assert store.find(IDS, KVShape(3, 2, 8)) is None  # another head size
    assert store.find(IDS, KVShape(4, 2, 4)) is None  # another layer count
    assert store.find(IDS, SHAPE, max_age_s=60) is not None
    later = time.time() + 120
    monkeypatch.setattr(time, "time", lambda: later)
    assert store.find(IDS, SHAPE, max_age_s=60) is None  # older than max_age_s


def test_missing_corrupt_and_truncated_entries_are_misses_or_load_errors(tmp_path):
    store = _store(tmp_path, handoff="shm")
    assert store.find(IDS) is None  # nothing published
    record = store.publish(IDS, *_kv())
    (tmp_path / "shm" / record.locator["file"]).write_bytes(b"short")
    with pytest.raises(ValueError, match="holds 5 bytes"):
        store.open_kv(store.find(IDS))  # the connector turns this into failed blocks
    store.path(IDS).write_bytes(b"{not json")
    assert store.find(IDS) is None
    store.path(IDS).write_bytes(b"")
    assert store.find(IDS) is None
    assert store.remove(IDS) and not store.remove(IDS)
    assert not list((tmp_path / "shm").iterdir())  # the data went with the record


def test_a_record_naming_a_file_outside_the_store_is_refused(tmp_path):
    store = _store(tmp_path, handoff="file")
    store.publish(IDS, *_kv())
    body = json.loads(store.path(IDS).read_text())
    body["locator"] = {"file": "../../etc/passwd"}
    store.path(IDS).write_text(json.dumps(body))
    with pytest.raises(ValueError, match="plain file name"):
        store.open_kv(store.find(IDS))


def test_entries_stay_pinned_until_loaded_and_the_budget_is_bytes(tmp_path):
    store = _store(tmp_path, budget_bytes=2 * ENTRY_BYTES)
    prompts = [[i, i + 1, i + 2, i + 3, i + 4, i + 5, i + 6] for i in range(3)]
    store.publish(prompts[0], *_kv())
    store.publish(prompts[1], *_kv(seed=1))
    with pytest.raises(HandoffRefused, match="budget full"):
        store.publish(prompts[2], *_kv(seed=2))  # refused: nothing unloaded is evicted for it
    assert store.find(prompts[0]) is not None and store.find(prompts[1]) is not None
    assert store.ledger.held_bytes == 2 * ENTRY_BYTES
    store.ack(prompts[0])  # the consumer loaded the first one
    store.publish(prompts[2], *_kv(seed=2))  # now it fits: the acked entry was released
    assert store.find(prompts[0]) is None and store.find(prompts[2]) is not None
    assert store.remove(prompts[1]) and store.find(prompts[1]) is None  # the upstream answered
    assert store.ledger.held_bytes == ENTRY_BYTES


def test_pins_expire_after_max_pin_s(tmp_path):
    store = _store(tmp_path, budget_bytes=ENTRY_BYTES, max_pin_s=60)
    now = [1000.0]
    store.ledger.clock = lambda: now[0]
    store.publish(IDS, *_kv())
    with pytest.raises(HandoffRefused):
        store.publish(IDS[::-1], *_kv())
    now[0] += 61  # the consumer never came
    store.publish(IDS[::-1], *_kv())
    assert store.find(IDS) is None and store.find(IDS[::-1]) is not None


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_entry_permissions_are_configurable(tmp_path, mode):
    store = _store(tmp_path, entry_mode=mode, handoff="shm")
    record = store.publish(IDS, *_kv())
    assert stat.S_IMODE(store.path(IDS).stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "shm" / record.locator["file"]).stat().st_mode) == mode


def test_an_unreadable_record_is_a_logged_miss_not_a_silent_one(tmp_path, monkeypatch, caplog):
    store = _store(tmp_path)
    store.publish(IDS, *_kv())
    real = type(store.path(IDS)).read_bytes

    def denied(path):
        if path.suffix == ".json":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(type(store.path(IDS)), "read_bytes", denied)
    with caplog.at_level("WARNING", logger="ragkv.fused"):
        assert store.find(IDS) is None
    assert "not readable" in caplog.text and "entry_mode" in caplog.text


def test_bad_input_is_refused_with_what_is_accepted(tmp_path):
    store = _store(tmp_path)
    keys, values = _kv()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        store.publish([1], keys, values)
    with pytest.raises(ValueError, match="one key and one value tensor per layer"):
        store.publish(IDS, keys, values[:2])
    with pytest.raises(ValueError, match=r"R >= 6 rows"):
        store.publish(IDS, [k[:, :, :3] for k in keys], [v[:, :, :3] for v in values])
    with pytest.raises(ValueError, match=r"accepted: \[H_kv, R, D\]"):
        store.publish(IDS, [k[0, 0] for k in keys], [v[0, 0] for v in values])
    with pytest.raises(ValueError, match="hand-off path 'nvlink' is unknown"):
        FusedKVStore(tmp_path, handoff="nvlink")
    with pytest.raises(ValueError, match="budget must be >= 1 byte"):
        FusedKVStore(tmp_path, budget_bytes=0)
    assert not any((tmp_path / "fused").glob(".publishing-*"))


def test_requests_of_the_same_prompt_share_one_entry_until_the_last_ends(tmp_path):
    store = _store(tmp_path, budget_bytes=ENTRY_BYTES, handoff="shm")
    first = store.publish(IDS, *_kv())
    again = store.publish(IDS, *_kv())  # in flight twice: no second copy, no budget refusal
    assert again == first and store.ledger.pins[prompt_hash(IDS)].users == 2
    assert store.remove(IDS) and store.find(IDS) is not None  # the other request may still load it
    assert store.remove(IDS) and store.find(IDS) is None and not list((tmp_path / "shm").iterdir())
    store.publish(IDS, *_kv())
    store.publish(IDS, *_kv())
    store.ack(IDS)  # loaded: freed for every request (a later one that misses is prefilled by vLLM)
    assert store.reap() == [prompt_hash(IDS)] and store.find(IDS) is None and store.ledger.held_bytes == 0
