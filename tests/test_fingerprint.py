"""Chunk keys survive what does not change the KV (paths, library versions, a moved data directory)
and change with what does (weights, sink ids, tokenizer)."""

from __future__ import annotations

import shutil

import pytest
import torch
from retriever_fakes import HashEmbedder, byte_tokenizer
from tiny_engine import PASSAGES, VOCAB_SIZE, tiny_engine_adapter, tiny_tokenizer
from tiny_models import tiny_model

from ragkv.chunk_cache import chunk_key
from ragkv.engine.config import EngineConfig
from ragkv.engine.engine import Engine
from ragkv.models import adapter_for, load_adapter
from ragkv.retriever import Document


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model and tokenizer saved to one folder and copied to another."""
    root = tmp_path_factory.mktemp("models")
    adapter = tiny_engine_adapter()
    adapter.model.save_pretrained(root / "a")
    adapter.tokenizer.save_pretrained(root / "a")
    shutil.copytree(root / "a", root / "b")
    return adapter, root / "a", root / "b"


def _ids(adapter) -> tuple[str, str]:
    return adapter.fingerprint, adapter.tokenizer_fingerprint


def test_same_weights_from_two_paths_give_the_same_keys(saved):
    adapter, a, b = saved
    from_a, from_b = load_adapter(str(a)), load_adapter(str(b))
    assert from_a.model.config._name_or_path != from_b.model.config._name_or_path
    assert _ids(from_a) == _ids(from_b) == _ids(adapter)
    assert chunk_key(from_a, [5, 6, 7]) == chunk_key(from_b, [5, 6, 7])


def test_library_version_and_name_fields_do_not_change_keys():
    base = tiny_engine_adapter()
    model = tiny_model("llama", vocab_size=VOCAB_SIZE)
    model.config.transformers_version = "4.0.0"
    model.config._name_or_path = "/somewhere/else"
    model.config._attn_implementation = "sdpa"
    assert _ids(adapter_for(model, tiny_tokenizer())) == _ids(base)


def test_different_weights_sinks_or_tokenizer_change_keys():
    base = tiny_engine_adapter()
    assert tiny_engine_adapter(seed=1).fingerprint != base.fingerprint
    nudged = tiny_model("llama", vocab_size=VOCAB_SIZE)
    with torch.no_grad():
        nudged.model.layers[2].mlp.down_proj.weight.add_(1e-3)  # one tensor deep inside
    assert adapter_for(nudged, tiny_tokenizer()).fingerprint != base.fingerprint
    model = tiny_model("llama", vocab_size=VOCAB_SIZE)
    assert adapter_for(model, tiny_tokenizer(), sink_ids=(1, 3)).fingerprint != base.fingerprint
    assert adapter_for(model, byte_tokenizer()).tokenizer_fingerprint != base.tokenizer_fingerprint
    half = adapter_for(tiny_model("llama", vocab_size=VOCAB_SIZE).to(torch.bfloat16), tiny_tokenizer())
    assert half.fingerprint != base.fingerprint  # KV computed in another dtype is another KV


def test_a_moved_data_dir_opens_its_index_and_hits_its_disk_cache(saved, tmp_path):
    _, a, b = saved
    config = EngineConfig(data_dir=str(tmp_path / "data"))
    before = Engine(load_adapter(str(a)), _store(config), config, embedder=HashEmbedder())
    before.ingest(documents=[Document(f"d{i}", text) for i, text in enumerate(PASSAGES)])
    hits = before.retrieve("river bend stone bridge", k=2)
    before.close()
    shutil.move(tmp_path / "data", tmp_path / "moved")
    config = EngineConfig(data_dir=str(tmp_path / "moved"))
    after = Engine(load_adapter(str(b)), _store(config), config, embedder=HashEmbedder())
    again = after.retrieve("river bend stone bridge", k=2)  # the catalog binds: same fingerprints
    assert [h.token_ids for h in again] == [h.token_ids for h in hits]
    run = after.run("Where does the river bend?", k=2)
    assert run.misses == 0 and run.hits == {"disk": 2}
    after.close()


def _store(config: EngineConfig):
    from ragkv.storage.build import build_store

    return build_store(config.storage_config())
