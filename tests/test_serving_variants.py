"""Serving-path KV variants (engine/serving_variants.py): a recurring prompt is answered from exact
variants, with the full prefill's logits; nothing approximate is stored; the policy bounds the work."""

from __future__ import annotations

import pytest
import torch
from tiny_engine import PASSAGES, tiny_engine

from ragkv.blend import BlendConfig
from ragkv.engine.prompt import PromptTemplate
from ragkv.eval.datasets import Sample
from ragkv.eval.runner import Spec, evaluate_sample
from ragkv.storage.metadata import metadata_store

QUESTION = "Where does the river bend?"
TOL = dict(atol=2e-5, rtol=2e-5)


def _craft(engine, question=QUESTION, passages=PASSAGES):
    return engine.run(question, passages, strategy="cachecraft", recompute_ratio=0.15)


def _variant_count(engine) -> int:
    return sum(len(rs) for rs in metadata_store(engine.store).variants_of(_keys(engine)))


def _keys(engine):
    return [engine.supply.key(c, engine.config.namespace) for c in engine.tokenize_chunks(PASSAGES)]


def test_a_recurring_prompt_is_reused_exactly_from_its_third_occurrence():
    engine = tiny_engine(blend=BlendConfig(craft_serve="recurring"))
    full = engine.run(QUESTION, PASSAGES, strategy="full")
    first = _craft(engine)
    assert not any(d.used_variant for d in first.blend.chunk_decisions)
    assert _variant_count(engine) == 0  # first occurrence: remembered, nothing computed or stored
    second = _craft(engine)
    assert not any(d.used_variant for d in second.blend.chunk_decisions)
    assert _variant_count(engine) == len(PASSAGES)  # second occurrence: the exact completion, after the answer
    third = _craft(engine)
    decisions = third.blend.chunk_decisions
    assert all(d.used_variant and d.reason == "exact variant" and d.recomputed == 0 for d in decisions)
    # exactness claimed for every chunk: the first-token logits are the full prefill's
    torch.testing.assert_close(third.logits, full.logits, **TOL)
    assert not torch.allclose(first.logits, full.logits, **TOL)  # the blend itself was approximate
    # another question over the same passages has the same prefix and chunks: reused exactly too
    other = _craft(engine, "What is delta?")
    assert all(d.reason == "exact variant" for d in other.blend.chunk_decisions)
    torch.testing.assert_close(other.logits, engine.run("What is delta?", PASSAGES, strategy="full").logits, **TOL)


def test_always_stores_after_the_first_request_and_off_never():
    always = tiny_engine(blend=BlendConfig(craft_serve="always"))
    _craft(always)
    assert _variant_count(always) == len(PASSAGES)
    assert all(d.used_variant for d in _craft(always).blend.chunk_decisions)
    off = tiny_engine(blend=BlendConfig(craft_serve="off"))
    for _ in range(3):
        run = _craft(off)
    assert _variant_count(off) == 0 and not any(d.used_variant for d in run.blend.chunk_decisions)


def test_another_order_or_another_template_does_not_count_as_exact():
    engine = tiny_engine(blend=BlendConfig(craft_serve="always"))
    _craft(engine)
    reordered = _craft(engine, passages=PASSAGES[::-1])
    assert not any(d.reason == "exact variant" for d in reordered.blend.chunk_decisions[1:])
    # the same store read by an engine whose prompt prefix differs: variants keyed by another prefix
    other = tiny_engine(blend=BlendConfig(craft_serve="off"))
    other.store = engine.store
    other.template = PromptTemplate(instruction="Read the passages, then answer.\n")
    run = _craft(other)
    assert not any(d.used_variant for d in run.blend.chunk_decisions)


@pytest.mark.parametrize("mode", ["recurring", "always"])
def test_variants_stay_within_the_per_chunk_limit(mode):
    engine = tiny_engine(blend=BlendConfig(craft_serve=mode, craft_variants=1))
    orders = [PASSAGES, PASSAGES[::-1], PASSAGES[1:] + PASSAGES[:1]]
    for order in orders * 2:
        _craft(engine, passages=order)
    assert all(len(rs) <= 1 for rs in metadata_store(engine.store).variants_of(_keys(engine)))


def test_eval_served_context_answers_a_recurring_prompt_as_the_full_prefill():
    engine = tiny_engine()  # craft_serve defaults to recurring
    sample = Sample("s1", QUESTION, tuple(PASSAGES), ("the stone bridge",))
    rows = evaluate_sample(engine, sample, [Spec("full"), Spec("cachecraft", 0.15)], max_new_tokens=6, context="served")
    craft = rows["cachecraft@0.15"]
    assert craft["variants_used"] == len(PASSAGES) and craft["recomputed_chunk_tokens"] == 0
    assert craft["kl_mean"] < 1e-6 and craft["top1_agreement"] == 1.0 and craft["answer"] == rows["full"]["answer"]
