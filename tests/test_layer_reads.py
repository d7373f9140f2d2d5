"""Disk entries read layer by layer (`FileLayers`): the loader reads each section from its file straight into
its buffer and checks it there; a damaged section found mid-blend drops the entry and that chunk is
recomputed (blend/recover.py), so the answer is the undamaged one's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from ragkv.blend import blend, make_plan, make_strategy
from ragkv.blend.loader import LayerLoader
from ragkv.blend.recover import recovering
from ragkv.chunk_cache import ChunkKey, precompute, precompute_many
from ragkv.models import adapter_for
from ragkv.storage import DiskTier, TieredStore
from ragkv.storage.layered import FileLayers


@pytest.fixture(scope="module")
def model():
    return adapter_for(tiny_model("llama"), sink_ids=(1,))


def _chunks(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (23, 31, 17)]


def _store(tmp_path, codec, kvs):
    tier = DiskTier(tmp_path / codec, 1 << 30, codec)
    keys = [ChunkKey.of("layer-reads", codec, [i]) for i in range(len(kvs))]
    store = TieredStore([tier], promote=False)
    for key, kv in zip(keys, kvs):
        store.put(key, kv)
    return store, tier, keys


def _damage(tier, key, layer):
    """Flip a byte in the middle of `layer`'s section of `key`'s payload file."""
    row = tier._index[key]
    path = tier.root / row.file
    data = bytearray(path.read_bytes())
    offsets = tier.get(key)._meta["offsets"]
    payload_at = len(data) - offsets[-1]
    data[payload_at + (offsets[layer] + offsets[layer + 1]) // 2] ^= 0x20
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ["int8", "packed"])
def test_sections_go_from_the_file_into_the_loader_buffer(tmp_path, model, codec):
    kvs = precompute_many(model, _chunks())
    store, tier, keys = _store(tmp_path, codec, kvs)
    sources = store.get_layered_many(keys)
    assert all(isinstance(s, FileLayers) and s.bytes_read == 0 for s in sources)  # the header only, so far
    loader = LayerLoader(sources, model.num_layers, torch.device("cpu"), torch.float32, device_decode=True)
    for layer, rows in enumerate(loader):
        want = torch.cat([s.layer(layer).float() for s in sources], dim=1)  # the host decoder, read again
        assert torch.equal(rows, want), layer
    payload = sum(s._meta["offsets"][-1] for s in sources)
    assert loader.file_bytes == payload  # every section read once, straight into the loader's buffer


def test_a_damaged_section_on_the_device_path_is_recomputed(tmp_path, model):
    chunks = _chunks(1)
    kvs = precompute_many(model, chunks)
    store, tier, keys = _store(tmp_path, "int8", kvs)
    _damage(tier, keys[1], 2)
    plan = make_plan([1], chunks, [5, 6, 7])
    found = store.get_layered_many(keys)
    sources = recovering(model, plan, list(zip([s for s, _ in plan.chunk_spans], found)))
    loader = LayerLoader([kv for _, kv in sources], model.num_layers, torch.device("cpu"), torch.float32, True)
    fresh = precompute(model, chunks[1])
    for layer, rows in enumerate(loader):
        middle = rows[:, kvs[0].num_tokens : kvs[0].num_tokens + kvs[1].num_tokens]
        if layer < 2:  # read before the damage: the stored (int8) rows
            assert torch.equal(middle, found[1].layer(layer).float()), layer  # fd still open on the dropped file
        else:  # from the damaged layer on: the chunk recomputed
            assert torch.equal(middle, fresh.layer(layer)), layer
        assert torch.equal(rows[:, : kvs[0].num_tokens], found[0].layer(layer).float())
    assert tier.corrupt == 1 and not tier.lookup(keys[1]) and tier.lookup(keys[0])


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("name", ["cacheblend", "cacheblend+query"])
def test_the_answer_with_a_damaged_section_is_the_undamaged_ones(tmp_path, model, layer, name):
    chunks = _chunks(2)
    kvs = precompute_many(model, chunks, max_tokens_per_pass=0)  # one chunk per pass: as a recompute does
    store, tier, keys = _store(tmp_path, "identity", kvs)
    plan = make_plan([1], chunks, [5, 6, 7])
    strategy = make_strategy(name, 0.2)  # +query: the scout pass reads the damaged layer before the loop
    starts = [s for s, _ in plan.chunk_spans]
    want = blend(model, plan, strategy, list(zip(starts, store.get_layered_many(keys))))
    _damage(tier, keys[2], layer)
    got = blend(model, plan, strategy, list(zip(starts, store.get_layered_many(keys))))
    assert torch.equal(got.logits, want.logits) and got.recompute_fraction == want.recompute_fraction
    assert tier.corrupt == 1 and not tier.lookup(keys[2])
    assert store.get_layered(keys[2]) is None  # never served again: the next request recomputes it
