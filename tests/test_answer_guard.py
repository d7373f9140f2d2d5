"""The answer guard (engine/answer_guard.py): a greedy step whose fused margin is a near-tie moves the
answer onto exact KV, so from that step on it is the full prefill's greedy continuation; alone, batched,
in the library's answers and in the eval."""

from __future__ import annotations

import pytest
import torch
from tiny_engine import PASSAGES, tiny_engine

from ragkv.blend import BlendConfig
from ragkv.engine.answer_guard import margin
from ragkv.engine.batch import fuse_many, start_stream, step_many
from ragkv.engine.run_result import PARTS

QUESTION = "Where does the river bend?"
NEW = 8
ALWAYS = 1e9  # every step is a near-tie: the guard switches before the first token


def _engine(threshold: float):
    return tiny_engine(blend=BlendConfig(strategy="naive", answer_guard=threshold), max_new_tokens=NEW)


def _greedy_after(engine, prompt_ids: list[int], forced: list[int], n: int) -> list[int]:
    """The model's own greedy continuation (transformers forward, no ragkv buffers) of prompt + forced."""
    ids = list(prompt_ids) + list(forced)
    out: list[int] = []
    for _ in range(n):
        logits = engine.model.model(torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        if token in engine.eos_ids:
            break
        out.append(token)
        ids.append(token)
    return out


def _fused(engine, strategy="naive"):
    chunks = engine.tokenize_chunks(PASSAGES)
    engine.ensure_cached(chunks)
    return chunks, engine.run(QUESTION, chunks=chunks, strategy=strategy, reserve=NEW + 1)


def test_margin_is_the_gap_between_the_two_best_logits():
    assert margin(torch.tensor([3.0, 1.0, 2.5])) == pytest.approx(0.5)
    assert margin(torch.tensor([1.0, 1.0])) == 0.0


def test_a_guard_switching_before_the_first_token_answers_as_the_full_prefill():
    engine = _engine(ALWAYS)
    chunks, run = _fused(engine)
    full = list(engine.answer_ids(engine.run(QUESTION, chunks=chunks, strategy="full", reserve=NEW + 1).blend, NEW))
    guard = engine.answer_guard(run)
    guarded = list(engine.answer_ids(run.blend, NEW, guard=guard))
    assert guard.switched_at == 0 and guard.first_token_ms > 0
    assert guarded == full != list(engine.answer_ids(run.blend, NEW))  # the fused KV alone answers otherwise
    assert guarded == _greedy_after(engine, run.plan.input_ids.tolist(), [], NEW)


@torch.inference_mode()
def test_the_guard_switches_at_the_first_near_tie_and_continues_exactly():
    engine = _engine(ALWAYS)
    _, run = _fused(engine)
    fused = list(engine.answer_ids(run.blend, NEW))  # no guard
    steps = engine.teacher_forced_logits(run.blend, torch.tensor(fused))
    margins = [margin(row) for row in steps]
    # a step whose margin is below every earlier one: a threshold between them switches exactly there
    k = next(k for k in range(1, len(margins)) if margins[k] < min(margins[:k]))
    threshold = (margins[k] + min(margins[:k])) / 2
    guard = engine.answer_guard(run)
    guard.threshold = threshold
    guarded = list(engine.answer_ids(run.blend, NEW, guard=guard))
    assert guard.switched_at == k and guard.first_token_ms == 0.0
    assert guarded[:k] == fused[:k]
    assert guarded[k:] == _greedy_after(engine, run.plan.input_ids.tolist(), fused[:k], NEW - k)


def test_no_guard_when_off_sampled_or_exact():
    off = _engine(0.0)
    assert off.answer_guard(_fused(off)[1]) is None
    engine = _engine(ALWAYS)
    chunks = engine.tokenize_chunks(PASSAGES)
    for strategy in ("full", "prefix"):
        assert engine.answer_guard(engine.run(QUESTION, chunks=chunks, strategy=strategy)) is None
    sampled = engine.run(engine.request(QUESTION, chunks=chunks, temperature=0.7))
    assert engine.answer_guard(sampled) is None


def test_no_guard_when_every_chunk_was_exact_already():
    """One chunk computed after this prompt's own prefix: its KV is the full prefill's, so the fused
    answer is the full prefill's and a switch would pay a prefill for nothing."""
    engine = _engine(ALWAYS)
    one = engine.tokenize_chunks(PASSAGES[:1])
    engine.ensure_cached(one)
    run = engine.run(QUESTION, chunks=one, reserve=NEW + 1)
    assert run.plan.exact_chunks == (0,)
    assert engine.answer_guard(run) is None
    full = engine.run(QUESTION, chunks=one, strategy="full", reserve=NEW + 1)
    assert list(engine.answer_ids(run.blend, NEW)) == list(engine.answer_ids(full.blend, NEW))
    _, two = _fused(engine)  # two chunks, the second's KV computed apart: guarded
    assert len(two.plan.chunk_spans) > 1 and engine.answer_guard(two) is not None


def test_an_unmet_threshold_leaves_the_fused_answer_alone():
    engine = _engine(1e-12)
    _, run = _fused(engine)
    guard = engine.answer_guard(run)
    assert list(engine.answer_ids(run.blend, NEW, guard=guard)) == list(engine.answer_ids(run.blend, NEW))
    assert guard.switched_at is None


def test_the_library_answer_reports_the_switch_and_counts_it_in_the_ttft():
    engine = _engine(ALWAYS)
    chunks = engine.tokenize_chunks(PASSAGES)
    answer = engine.generate(QUESTION, chunks=chunks)
    full = engine.generate(QUESTION, chunks=chunks, strategy="full")
    assert answer.exact_from == 0 and full.exact_from is None
    assert answer.token_ids == full.token_ids
    assert tuple(answer.parts_ms) == PARTS and answer.parts_ms["guard"] > 0
    assert sum(answer.parts_ms.values()) == pytest.approx(answer.ttft_ms)


def test_batched_streams_are_guarded_each_on_its_own():
    engine = _engine(ALWAYS)
    docs = [PASSAGES, PASSAGES[::-1], PASSAGES[:2]]
    requests = [engine.request(QUESTION, d, max_new_tokens=NEW) for d in docs]
    want = [engine.generate(r.question, r.documents, strategy="full").token_ids for r in requests]
    fusions = fuse_many(engine, requests)
    streams = [start_stream(f, engine.answer_guard(f.run)) for f in fusions]
    fused_bytes = [s.kv_bytes for s in streams]
    while not all(s.done for s in streams):
        step_many(engine, streams)
    for f in fusions:
        f.release()
    got = [[t for t in s.tokens if t not in engine.eos_ids] for s in streams]
    assert got == want
    assert all(s.guard.switched_at == 0 and s.kv_bytes == 2 * b for s, b in zip(streams, fused_bytes))


def test_each_token_is_handed_out_before_the_next_token_pass(monkeypatch):
    """A server sends a token as soon as it is picked: a stream's first token does not wait for the
    batch's next-token pass. A stream that meets a near-tie switches to exact KV in its pick (or,
    through `go_exact`, before it) and is cheap to pick from then on."""
    import ragkv.engine.batch as batch_module

    engine = _engine(ALWAYS)
    docs = [PASSAGES, PASSAGES[::-1], PASSAGES[:2]]
    requests = [engine.request(QUESTION, d, max_new_tokens=NEW) for d in docs]
    fusions = fuse_many(engine, requests)
    streams = [start_stream(f, engine.answer_guard(f.run) if i else None) for i, f in enumerate(fusions)]
    assert [s.costly_pick for s in streams] == [False, True, True]
    batch_module.go_exact(streams[2])
    assert streams[2].guard.switched_at == 0 and not streams[2].costly_pick
    events = []
    real = batch_module.extend_many
    monkeypatch.setattr(batch_module, "extend_many", lambda *a: events.append("next-token pass") or real(*a))
    picked = step_many(engine, streams, lambda i, token: events.append((i, token)))
    assert events == [(0, picked[0]), (1, picked[1]), (2, picked[2]), "next-token pass"]
    assert streams[1].guard.switched_at == 0 and not any(s.costly_pick for s in streams)
    for f in fusions:
        f.release()


def test_a_request_sets_its_own_guard_and_the_sidecar_checks_it(tmp_path):
    import json

    from asgi_helpers import post, tiny_app

    engine = _engine(ALWAYS)
    chunks = engine.tokenize_chunks(PASSAGES)
    assert engine.generate(QUESTION, chunks=chunks, answer_guard=0.0).exact_from is None  # off for this request
    with pytest.raises(ValueError, match="answer_guard"):
        engine.request(QUESTION, chunks=chunks, answer_guard=-1.0)
    app = tiny_app(tmp_path)
    try:
        body = {"messages": [{"role": "user", "content": QUESTION}], "documents": PASSAGES, "max_tokens": 4}
        for bad in (-0.5, "0.1"):  # negative, or a number in a string: refused, naming the field
            r = post(app, "/v1/chat/completions", json.dumps({**body, "blend": {"answer_guard": bad}}))
            assert r.status_code == 400 and r.json()["error"]["param"] == "blend.answer_guard", r.text
        r = post(app, "/v1/chat/completions", json.dumps({**body, "blend": {"answer_guard": 1000}}))
        assert r.status_code == 200 and r.json()["ragkv"]["exact_from"] == 0, r.text
        r = post(app, "/v1/chat/completions", json.dumps({**body, "blend": {"answer_guard": 0}}))
        assert r.status_code == 200 and r.json()["ragkv"]["exact_from"] is None, r.text
    finally:
        app.state.worker.close()


def test_a_failed_exact_prefill_leaves_the_answer_fused_and_says_so(monkeypatch):
    from ragkv.engine import answer_guard

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(answer_guard, "full_prefill", out_of_memory)
    engine = _engine(ALWAYS)
    chunks = engine.tokenize_chunks(PASSAGES)
    _, run = _fused(engine)
    answer = engine.generate(QUESTION, chunks=chunks)
    assert answer.exact_from is None and answer.token_ids == list(engine.answer_ids(run.blend, NEW))
    assert any("exact prefill failed" in w and "out of memory" in w for w in answer.warnings)
