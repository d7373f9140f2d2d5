"""End to end with the real models: `ragkv ingest` then `ragkv retrieve --json`, and the MiniLM embedder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest


def _cli(argv):
    from ragkv.cli import ingest, retrieve

    parser = argparse.ArgumentParser(prog="ragkv")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (ingest, retrieve):
        module.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.slow
def test_hf_embedder_batches_and_ranks():
    from ragkv.retriever import HFEmbedder

    emb = HFEmbedder(batch_size=2)
    texts = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.", "A kitten is sleeping on a rug.", "x"]
    vecs = emb.embed(texts)
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb.embed(texts[2:3])[0], vecs[2], atol=1e-5)  # batching/padding does not matter
    assert vecs[0] @ vecs[2] > vecs[0] @ vecs[1] + 0.2
    with pytest.raises(ValueError, match="not a local Hugging Face model folder"):
        HFEmbedder("/nonexistent/encoder")


@pytest.mark.slow
def test_cli_ingest_then_retrieve(tmp_path, capsys, smollm2):
    data_dir = tmp_path / "data"
    data_dir.mkdir()  # the converted SmolLM2 comes from the shared model cache
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "paris.txt").write_text("Paris is the capital of France. The Eiffel Tower was finished in 1889.")
    (docs / "tokyo.md").write_text("# Tokyo\n\nTokyo is the capital of Japan and its largest city.")
    (docs / "bad.bin").write_bytes(b"\x00\x01")
    assert _cli(["ingest", str(docs), "--data-dir", str(data_dir), "--quiet", "--json"]) == 1  # bad.bin failed
    report = json.loads(capsys.readouterr().out)
    assert report["documents_added"] == 2 and len(report["errors"]) == 1 and "bad.bin" in report["errors"][0]["path"]
    assert report["kv_computed"] == 2 and (data_dir / "cache").is_dir()  # KV went to the persistent disk tier
    assert _cli(["ingest", str(docs / "paris.txt"), "--data-dir", str(data_dir), "--quiet", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["documents_unchanged"] == 1 and again["kv_cached"] == 1 and again["kv_computed"] == 0
    assert _cli(["retrieve", "When was the Eiffel Tower built?", "-k", "2", "--data-dir", str(data_dir), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [Path(h["doc_id"]).name for h in hits] == ["paris.txt", "tokyo.md"]
    assert hits[0]["score"] > hits[1]["score"] and "Eiffel" in hits[0]["text"] and hits[0]["key"].startswith("default/")
