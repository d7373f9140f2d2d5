"""Several requests at once (engine/batch.py): fusing and decoding them together gives each request
what it gets alone: the same first-token logits, recompute fraction, cachecraft decisions and greedy
tokens, whatever the strategy, prompt length and check layers of the others in the batch."""

from __future__ import annotations

import pytest
import torch
from tiny_engine import PASSAGES, tiny_engine

from ragkv.blend import BlendConfig
from ragkv.engine import batch as batch_module
from ragkv.engine.batch import fuse_many, start_stream, step_many

QUESTION = "Where does the river bend?"
TOL = {"rtol": 1e-5, "atol": 1e-5}  # packed matrix products round differently from unpacked ones, no more
MORE = [
    "Alpha, beta and gamma are letters; the orbit of the moon sets the tide twice a day.",
    "Lamp keepers meet at the bridge.",
    "You will be asked a question after reading several passages, so read the maple road notes and the "
    "quartz road notes with care before you answer.",
]
STRATEGIES = ["naive", "cacheblend", "epic", "cacheblend+query", "cachecraft", "prefix", "full", "focus"]


def _requests(engine, strategy, max_new_tokens=4):
    """Four requests of different lengths (documents, questions, ratios) with one strategy."""
    docs = [PASSAGES, PASSAGES[:1] + MORE[2:], MORE + PASSAGES[1:2], PASSAGES[::-1] + MORE[:2]]
    questions = [QUESTION, "Which letters?", "Who meets at the bridge?", "What lines the quartz road?"]
    ratios = [0.15, 0.5, 0.3, 0.15]
    return [
        engine.request(q, d, strategy=strategy, recompute_ratio=r, max_new_tokens=max_new_tokens)
        for q, d, r in zip(questions, docs, ratios)
    ]


def _alone(engine, request):
    fusion = engine.fuse(request)
    answer = list(engine.answer_ids(fusion.run.blend, request.max_new_tokens))
    fusion.release()
    return fusion.run, answer


def _decode_all(engine, streams):
    while not all(s.done for s in streams):
        step_many(engine, streams)
    eos = engine.eos_ids
    return [[t for t in s.tokens if t not in eos] for s in streams]


def _warm(engine, requests):
    """Record the documents' metadata and variants in context (cachecraft) and run each request once, so
    every entry it reads (chunks, a prefix) is cached: alone and batched runs read the same entries."""
    for r in requests:
        engine.record_context(r.question, r.documents)
        engine.run(r)


def _same_as_alone(engine, requests):
    expected = [_alone(engine, r) for r in requests]
    fusions = fuse_many(engine, requests)
    streams = [start_stream(f) for f in fusions]
    for f, (run, _) in zip(fusions, expected):
        torch.testing.assert_close(f.run.logits, run.logits, **TOL)
        assert f.run.blend.recompute_fraction == pytest.approx(run.blend.recompute_fraction)
        assert f.run.blend.chunk_decisions == run.blend.chunk_decisions
        assert f.run.prompt_tokens == run.prompt_tokens
    answers = _decode_all(engine, streams)
    for f in fusions:
        f.release()
    for got, (_, answer), r in zip(answers, expected, requests):
        assert got == answer and len(got) <= r.max_new_tokens
    return fusions, expected


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_batch_of_different_lengths_gives_each_request_what_it_gets_alone(strategy):
    engine = tiny_engine()
    requests = _requests(engine, strategy)
    assert len({engine.plan(r.question, engine.tokenize_chunks(r.documents)).num_tokens for r in requests}) == 4
    _warm(engine, requests)
    fusions, expected = _same_as_alone(engine, requests)
    if strategy in ("cacheblend", "epic", "cacheblend+query", "cachecraft", "focus"):  # ratios differ per request
        assert len({round(run.blend.recompute_fraction, 6) for run, _ in expected}) > 1
    if strategy == "cachecraft":  # the metadata (and in-context variants) was used, not the fallback
        assert any(d.used_variant for f in fusions for d in f.run.blend.chunk_decisions)


def test_mixed_strategies_with_their_own_check_layers_in_one_batch():
    engine = tiny_engine(blend=BlendConfig(check_layers=(1, 2)))  # gradual: two narrowings per request
    base = _requests(engine, "cacheblend")
    requests = [
        base[0],
        engine.request(base[1].question, base[1].documents, strategy="naive", max_new_tokens=4),
        engine.request(base[2].question, base[2].documents, strategy="full", max_new_tokens=2),
        engine.request(base[3].question, base[3].documents, strategy="cacheblend", recompute_ratio=0.6),
        engine.request(QUESTION, PASSAGES[:2], strategy="epic", recompute_ratio=0.2, max_new_tokens=0),
    ]
    _warm(engine, requests)
    _same_as_alone(engine, requests)


def test_the_scout_passes_of_a_batch_run_packed_in_one_pass(monkeypatch):
    engine = tiny_engine()
    base = _requests(engine, "focus")
    requests = [
        base[0],
        engine.request(base[1].question, base[1].documents, strategy="naive", max_new_tokens=4),
        base[2],
        engine.request(base[3].question, base[3].documents, strategy="cacheblend+query", recompute_ratio=0.3),
        engine.request(QUESTION, PASSAGES[:2], strategy="full", max_new_tokens=2),
        engine.request(QUESTION, PASSAGES[1:], strategy="focus", recompute_ratio=0.0),  # nothing to rank: no scout
    ]
    _warm(engine, requests)
    scouted, real = [], batch_module.question_attention_many
    monkeypatch.setattr(
        batch_module,
        "question_attention_many",
        lambda model, prompts, layers: scouted.append(len(prompts)) or real(model, prompts, layers),
    )
    fusions, _ = _same_as_alone(engine, requests)  # alone, each scouts itself (no spy on that path)
    assert scouted == [3]  # the two focus requests and cacheblend+query, in one packed scout
    assert [f.strategy.scouted is not None for f in fusions] == [True, False, True, True, False, False]


def test_cold_batch_computes_a_shared_chunk_once_and_counts_it_as_alone():
    alone, together = tiny_engine(), tiny_engine()
    requests = _requests(alone, "naive")[:2] + [alone.request("Again?", PASSAGES[:2], strategy="naive")]
    runs = [_alone(alone, r)[0] for r in requests]  # each alone, one after another: later ones hit
    computed = []
    precompute = together.supply.precompute
    together.supply.precompute = lambda missing: computed.append(len(missing)) or precompute(missing)
    fusions = fuse_many(together, requests)
    for f in fusions:
        f.release()
    distinct = {c for r in requests for c in map(tuple, together.tokenize_chunks(r.documents))}
    assert computed == [len(distinct)]  # one precompute of every distinct chunk
    for f, run in zip(fusions, runs):
        assert (f.run.hits, f.run.misses) == (run.hits, run.misses)
        torch.testing.assert_close(f.run.logits, run.logits, rtol=1e-3, atol=1e-3)  # packed precompute rounds


def test_step_many_lets_streams_join_and_leave_between_steps():
    engine = tiny_engine()
    requests = _requests(engine, "cacheblend", max_new_tokens=6)
    _warm(engine, requests)
    expected = [_alone(engine, r)[1] for r in requests]
    first = [start_stream(f) for f in fuse_many(engine, requests[:2])]
    step_many(engine, first)
    step_many(engine, first)
    late = [start_stream(f) for f in fuse_many(engine, requests[2:])]  # join after two steps
    streams = first + late
    picked = step_many(engine, streams)
    assert all(p is not None for p in picked[2:])
    assert _decode_all(engine, streams) == expected
    for s in streams:
        s.fusion.release()
    assert step_many(engine, streams) == [None] * 4  # finished streams pick nothing


def _spy_packed(monkeypatch):
    """How many prompts each packed pass fused."""
    passes = []
    real = batch_module.blend_many
    monkeypatch.setattr(
        batch_module, "blend_many", lambda model, states: passes.append(len(states)) or real(model, states)
    )
    return passes


def _spy_fusions(monkeypatch):
    """Every Fusion fuse_many begins."""
    made = []
    real = batch_module.begin
    monkeypatch.setattr(batch_module, "begin", lambda engine, r: made.append(real(engine, r)) or made[-1])
    return made


def _released(engine, fusions):
    return all(f.upkeep_ms is not None for f in fusions) and not any(engine.store._pins.values())


def test_a_failing_request_releases_every_fusion(monkeypatch):
    engine = tiny_engine()
    requests = _requests(engine, "naive")
    _warm(engine, requests)
    bad = engine.request(QUESTION, strategy="naive", chunks=[[]])  # an empty chunk fails its plan
    made = _spy_fusions(monkeypatch)
    with pytest.raises(ValueError, match="empty chunk"):
        fuse_many(engine, requests[:2] + [bad] + requests[2:])
    assert len(made) == 5 and _released(engine, made)
    made.clear()
    out = fuse_many(engine, requests[:2] + [bad] + requests[2:], errors="return")
    assert isinstance(out[2], ValueError) and made[2].upkeep_ms is not None
    for f, r in zip(out[:2] + out[3:], requests):
        torch.testing.assert_close(f.run.logits, _alone(engine, r)[0].logits, **TOL)
        f.release()
    assert _released(engine, made)


def test_a_failing_packed_pass_releases_every_fusion(monkeypatch):
    engine = tiny_engine()
    requests = _requests(engine, "cacheblend")
    _warm(engine, requests)
    made = _spy_fusions(monkeypatch)

    def broken(model, states):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(batch_module, "blend_many", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        fuse_many(engine, requests)
    assert len(made) == 4 and _released(engine, made)
    out = fuse_many(engine, requests, errors="return")
    assert all(isinstance(x, RuntimeError) for x in out) and _released(engine, made)
    with pytest.raises(ValueError, match="accepted: raise, return"):
        fuse_many(engine, requests, errors="ignore")
