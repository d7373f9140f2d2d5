"""The batch budget (engine/batch_budget.py): fuse_many splits a batch over the budget, an oversized
request runs alone, `fits` tells a scheduler what may join, and the budget is a setting."""

from __future__ import annotations

import pytest
import torch
from test_batch import MORE, QUESTION, _alone, _requests, _spy_packed, _warm
from tiny_engine import PASSAGES, tiny_engine

from ragkv.engine.batch import fuse_many, start_stream
from ragkv.engine.batch_budget import (
    CPU_KV_BYTES,
    CPU_TOKENS,
    BatchBudget,
    RequestSize,
    estimate,
    fits,
    kv_bytes_per_row,
    size_of,
    split,
)
from ragkv.engine.config import EngineConfig


def _tokens(engine, request):
    return engine.plan(request.question, engine.tokenize_chunks(request.documents)).num_tokens


def test_split_keeps_order_and_gives_an_oversized_request_a_batch_of_its_own():
    budget = BatchBudget(tokens=100, kv_bytes=10_000)
    sizes = [RequestSize(40, 1000), RequestSize(50, 1000), RequestSize(300, 1000), RequestSize(30, 9000)]
    sizes += [RequestSize(20, 500)]
    assert split(sizes, budget) == [[0, 1], [2], [3, 4]]  # 3+4: 50 tokens, 9500 bytes
    assert split([RequestSize(10, 20_000), RequestSize(10, 10)], budget) == [[0], [1]]  # over the KV budget
    with pytest.raises(ValueError, match="tokens >= 1"):
        BatchBudget(0, 1)


def test_a_request_over_the_budget_is_fused_alone_and_the_rest_together(monkeypatch):
    engine = tiny_engine()
    requests = _requests(engine, "cacheblend")
    budget = BatchBudget(tokens=sum(_tokens(engine, r) for r in requests), kv_bytes=1 << 40)  # all four fit
    docs = PASSAGES + MORE
    while _tokens(engine, engine.request(QUESTION, docs)) <= budget.tokens:
        docs = docs + PASSAGES + MORE
    huge = engine.request(QUESTION, docs, strategy="cacheblend", max_new_tokens=4)  # over it on its own
    batch = requests[:2] + [huge] + requests[2:]
    _warm(engine, batch)
    passes = _spy_packed(monkeypatch)
    fusions = fuse_many(engine, batch, budget=budget)
    assert passes == [2, 1, 2]  # two together, the huge one alone, the next two together
    for f, r in zip(fusions, batch):
        torch.testing.assert_close(f.run.logits, _alone(engine, r)[0].logits, rtol=1e-5, atol=1e-5)
        f.release()
    passes.clear()
    for f in fuse_many(engine, requests, budget=BatchBudget(tokens=1, kv_bytes=1)):  # every request over it
        f.release()
    assert passes == [1, 1, 1, 1]


def test_fits_estimates_sizes_and_counts_the_buffers_still_held():
    engine = tiny_engine()
    requests = _requests(engine, "naive")
    sizes = [estimate(engine, r) for r in requests]
    row = kv_bytes_per_row(engine.model)
    assert row == 2 * 4 * 2 * 16 * 4  # K and V, 4 layers, 2 KV heads of 16 fp32 values
    for r, s in zip(requests, sizes):  # exact for given documents
        assert s == size_of(engine, _tokens(engine, r), r.reserve)
        assert s.kv_bytes == (s.tokens + r.reserve) * row
    total = sum(s.tokens for s in sizes)
    budget = BatchBudget(tokens=total, kv_bytes=sum(s.kv_bytes for s in sizes))
    assert fits(engine, requests, budget)
    assert not fits(engine, requests, BatchBudget(total - 1, budget.kv_bytes))
    assert not fits(engine, requests, budget, held_kv_bytes=1)
    assert fits(engine, requests[:1], BatchBudget(1, 1))  # alone, an oversized request runs
    assert not fits(engine, requests[:1], BatchBudget(1, 1), held_kv_bytes=1)  # ... once nothing is held
    fusion = fuse_many(engine, requests[:1])[0]
    stream = start_stream(fusion)
    fusion.release()
    assert stream.kv_bytes == sizes[0].kv_bytes  # the buffers a scheduler counts as held
    assert fits(engine, [engine.request(QUESTION, [""])])  # a bad request is sized; fuse_many reports it
    retrieving = engine.request("What bends?", k=3)  # an upper bound: k chunks of the largest size
    assert estimate(engine, retrieving).tokens >= 3 * engine.config.retriever.chunk_max_tokens


def test_the_budget_is_a_setting_with_a_default_per_device(monkeypatch):
    engine = tiny_engine()
    assert BatchBudget.of(engine) == BatchBudget(CPU_TOKENS, CPU_KV_BYTES)
    assert BatchBudget.of(tiny_engine(batch_tokens=512)) == BatchBudget(512, CPU_KV_BYTES)
    monkeypatch.setenv("RAGKV_BATCH_KV_BYTES", "2GiB")
    config = EngineConfig.load(batch_tokens=4096)
    assert (config.batch_tokens, config.batch_kv_bytes) == (4096, 2 << 30)
    with pytest.raises(ValueError, match="batch_tokens"):
        EngineConfig.load(batch_tokens=0)
