"""The answer guard's look back (engine/answer_guard.py): at a switch, the exact pass over the answer so
far finds where the fused KV had already left the exact path. An answer read whole takes its tokens back
from there and is the full prefill's answer; a streamed one keeps what its reader has and says so."""

from __future__ import annotations

import json

import pytest
import torch
from asgi_helpers import KEYS, post
from tiny_engine import PASSAGES, tiny_engine

from ragkv.blend import BlendConfig
from ragkv.engine import answer_guard
from ragkv.engine.answer_guard import first_departure
from ragkv.engine.batch import fuse_many, start_stream, step_many
from ragkv.engine.decode import TakeBack, read_whole
from ragkv.eval.datasets import Sample
from ragkv.eval.runner import Spec, evaluate_sample
from ragkv.server.app import create_app
from ragkv.server.settings import load_settings

QUESTION = "Where does the river bend?"
NEW = 8
SWITCH = 4  # the constructed near-tie: the guard switches before this answer step


@pytest.fixture
def near_tie_at_switch(monkeypatch):
    """Every guard sees a near-tie at answer step SWITCH and clear margins elsewhere."""
    real = answer_guard.AnswerGuard.check

    def check(self, logits, tokens):
        self.threshold = 1e9 if len(tokens) == SWITCH else -1.0
        return real(self, logits, tokens)

    monkeypatch.setattr(answer_guard.AnswerGuard, "check", check)


def _engine():
    return tiny_engine(blend=BlendConfig(strategy="naive", answer_guard=0.1), max_new_tokens=NEW)


def _fused_and_full(engine):
    chunks = engine.tokenize_chunks(PASSAGES)
    engine.ensure_cached(chunks)
    run = engine.run(QUESTION, chunks=chunks, reserve=NEW + 1)
    fused = list(engine.answer_ids(run.blend, NEW))
    full = list(engine.answer_ids(engine.run(QUESTION, chunks=chunks, strategy="full", reserve=NEW + 1).blend, NEW))
    left = next(i for i, (a, b) in enumerate(zip(fused, full)) if a != b)
    assert left < SWITCH  # the setting this file is about: the fused answer left before the switch
    return chunks, run, fused, full, left


def test_first_departure_finds_the_first_token_exact_kv_would_not_pick():
    steps = [torch.tensor([0.0, 2.0, 1.0]), torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 5.0])]
    assert first_departure([1, 0], steps) is None
    assert first_departure([1, 2], steps) == 1
    assert first_departure([2, 2], steps) == 0
    assert first_departure([], steps[:1]) is None


def test_an_answer_read_whole_takes_back_what_left_the_exact_path(near_tie_at_switch):
    engine = _engine()
    chunks, run, fused, full, left = _fused_and_full(engine)
    guard = engine.answer_guard(run)  # a library request is read whole by default
    steps = list(engine.answer_ids(run.blend, NEW, guard=guard))
    assert TakeBack(left) in steps and guard.switched_at == SWITCH and guard.left_at == left
    assert read_whole(steps) == full != fused
    answer = engine.generate(QUESTION, chunks=chunks)
    assert answer.token_ids == full and answer.exact_from == SWITCH and answer.taken_back_from == left
    assert not answer.warnings


def test_a_streamed_answer_keeps_its_tokens_and_says_where_it_left(near_tie_at_switch):
    engine = _engine()
    chunks, run, fused, full, left = _fused_and_full(engine)
    *pieces, answer = engine.generate(QUESTION, chunks=chunks, stream=True)
    assert answer.token_ids[:SWITCH] == fused[:SWITCH] and answer.token_ids != full
    assert "".join(pieces).strip() == answer.text  # nothing it sent was taken back
    assert answer.exact_from == SWITCH and answer.taken_back_from is None
    assert any(f"from step {left}" in w for w in answer.warnings), answer.warnings


def test_batched_streams_take_back_like_the_library(near_tie_at_switch):
    engine = _engine()
    chunks, _, fused, full, _ = _fused_and_full(engine)
    requests = [engine.request(QUESTION, chunks=chunks, max_new_tokens=NEW, stream=s) for s in (False, True)]
    fusions = fuse_many(engine, requests)
    streams = [start_stream(f, engine.answer_guard(f.run)) for f in fusions]
    while not all(s.done for s in streams):
        step_many(engine, streams)
    for f in fusions:
        f.release()
    whole, streamed = ([t for t in s.tokens if t not in engine.eos_ids] for s in streams)
    assert whole == full and streamed[:SWITCH] == fused[:SWITCH] and streamed != full


@pytest.mark.parametrize("scheduler", ["batch", "one"])
def test_the_sidecar_takes_back_only_when_not_streaming(tmp_path, near_tie_at_switch, scheduler):
    engine = _engine()
    *_, full, _ = _fused_and_full(engine)
    full_text = engine.tokenizer.decode(full, skip_special_tokens=True).strip()
    settings = dict(
        api_keys=KEYS,
        data_dir=str(tmp_path),
        max_new_tokens=NEW,
        max_tokens_limit=NEW,
        queue_size=8,
        scheduler=scheduler,
    )
    app = create_app(load_settings(**settings), engine)
    assert app.state.worker.batched == (scheduler == "batch")
    try:
        body = {
            "messages": [{"role": "user", "content": QUESTION}],
            "documents": PASSAGES,
            "max_tokens": NEW,
            "blend": {"strategy": "naive"},
        }
        r = post(app, "/v1/chat/completions", json.dumps(body))
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["choices"][0]["message"]["content"] == full_text
        assert reply["ragkv"]["exact_from"] == SWITCH and reply["ragkv"]["taken_back_from"] is not None
        r = post(app, "/v1/chat/completions", json.dumps({**body, "stream": True}))
        assert r.status_code == 200 and "not the full prefill's" in r.text, r.text
    finally:
        app.state.worker.close()


def test_the_eval_reports_the_answer_read_whole_and_the_streamed_one(near_tie_at_switch):
    engine = _engine()
    *_, fused, full, left = _fused_and_full(engine)
    sample = Sample("s1", QUESTION, tuple(PASSAGES), ("the stone bridge",))
    naive = evaluate_sample(engine, sample, [Spec("full"), Spec("naive")], max_new_tokens=NEW)["naive"]
    assert naive["same_answer"] == 1.0 and naive["taken_back"] == 1.0 and naive["exact_from"] == SWITCH
    assert naive["same_answer_streamed"] == 0.0 and naive["agree_prefix_streamed"] == pytest.approx(left / len(full))
    assert naive["same_answer_unguarded"] == 0.0
    assert naive["fused_turn"] == left and len(naive["fused_margins"]) == NEW  # a margin per step it decoded


def test_the_eval_records_the_margin_of_the_step_that_picked_eos():
    """An answer that ended at EOS: the EOS step was checked by the guard too, so its margin is recorded."""
    engine = _engine()
    chunks = engine.tokenize_chunks(PASSAGES)
    engine.ensure_cached(chunks)
    fused = list(engine.answer_ids(engine.run(QUESTION, chunks=chunks, reserve=NEW + 1).blend, NEW))
    eos = fused[2]  # the third token of the fused answer counts as EOS: the answer ends there
    engine.tokenizer.eos_token_id = eos
    sample = Sample("s1", QUESTION, tuple(PASSAGES), ("the stone bridge",))
    naive = evaluate_sample(engine, sample, [Spec("full"), Spec("naive")], max_new_tokens=NEW)["naive"]
    assert len(naive["fused_margins"]) == 3  # two tokens, then the step that picked EOS
