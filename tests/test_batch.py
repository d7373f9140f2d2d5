"""Several requests at once (engine/batch.py): fusing and decoding them together gives each request
what it gets alone."""

from __future__ import annotations

import torch
from tiny_engine import PASSAGES, tiny_engine

from ragkv.engine.batch import fuse_many, start_stream, step_many

QUESTION = "Where does the river bend?"
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _alone(engine, request):
    fusion = engine.fuse(request)
    answer = list(engine.answer_ids(fusion.run.blend, request.max_new_tokens))
    fusion.release()
    return fusion.run.logits, answer


def test_streams_of_different_lengths_decode_as_each_alone():
    engine = tiny_engine()
    requests = [
        engine.request(QUESTION, PASSAGES, strategy="cacheblend", max_new_tokens=5),
        engine.request("Another question?", PASSAGES[:1], strategy="naive", max_new_tokens=3),
        engine.request(QUESTION, PASSAGES[::-1], strategy="full", max_new_tokens=4),
    ]
    expected = [_alone(engine, r) for r in requests]
    fusions = fuse_many(engine, requests)
    streams = [start_stream(f) for f in fusions]
    for s, (logits, _) in zip(streams, expected):
        torch.testing.assert_close(s.logits, logits, **TOL)
    while not all(s.done for s in streams):
        step_many(engine, streams)
    for f in fusions:
        f.release()
    eos = engine.eos_ids
    for s, (_, answer), r in zip(streams, expected, requests):
        got = [t for t in s.tokens if t not in eos]
        assert got == answer and len(s.tokens) <= r.max_new_tokens
