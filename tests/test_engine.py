"""The Engine end to end on a tiny random Llama and a tiny BPE tokenizer (seconds, no SmolLM2):
TTFT parts that add up, generation equal to transformers', prefix reuse, recomputing a vanished or
corrupt entry, sampling, and store upkeep after the first token."""

from __future__ import annotations

import pytest
import torch
from storage_helpers import payloads_of
from tiny_engine import PASSAGES, tiny_engine
from tiny_models import returned_cache

from ragkv.engine.decode import decode
from ragkv.engine.run_result import PARTS
from ragkv.storage import DiskTier, MemoryTier, TieredStore

QUESTION = "Where does the river bend?"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return tiny_engine()


def _check_parts(run) -> None:
    assert list(run.parts_ms) == list(PARTS)
    assert all(ms >= 0.0 for ms in run.parts_ms.values()), run.parts_ms
    assert sum(run.parts_ms.values()) == pytest.approx(run.ttft_ms, rel=0.05)
    assert run.parts_ms["other"] < 0.5 * run.ttft_ms, run.parts_ms  # the named parts hold most of the time


def test_parts_add_up_and_name_what_they_time():
    engine = tiny_engine()
    cold = engine.run(QUESTION, PASSAGES, strategy="cacheblend", recompute_ratio=0.2)
    _check_parts(cold)
    assert cold.misses == len(PASSAGES) and cold.hits == {}
    assert cold.parts_ms["precompute"] > 0.0 and cold.parts_ms["retrieve"] < 0.05 * cold.ttft_ms
    warm = engine.run(QUESTION, PASSAGES, strategy="cacheblend", recompute_ratio=0.2)
    _check_parts(warm)
    assert warm.misses == 0 and warm.hits == {"cpu": len(PASSAGES)}
    assert warm.parts_ms["precompute"] == 0.0  # nothing computed ahead of the blend on an all-hit run
    assert warm.parts_ms["load"] > 0.0 and warm.parts_ms["rerotate"] > 0.0
    torch.testing.assert_close(warm.logits, cold.logits, **TOL)
    full = engine.run(QUESTION, PASSAGES, strategy="full")
    _check_parts(full)
    assert full.parts_ms["load"] == 0.0 and full.parts_ms["recompute"] > 0.0 and full.misses == 0


def test_full_is_the_models_own_forward(engine):
    run = engine.run(QUESTION, PASSAGES, strategy="full", reserve=4)
    n = run.prompt_tokens
    with torch.inference_mode():
        out = engine.model.model(run.plan.input_ids[None], use_cache=True)
    torch.testing.assert_close(run.logits, out.logits[0, -1].float(), **TOL)
    for layer, (k_all, v_all) in enumerate(run.blend.buffers):
        assert k_all.shape[2] == n + 4
        torch.testing.assert_close(k_all[:, :, :n], returned_cache(out).layers[layer].keys, **TOL)
        torch.testing.assert_close(v_all[:, :, :n], returned_cache(out).layers[layer].values, **TOL)


@pytest.mark.parametrize("strategy", ["full", "cacheblend"])
def test_generate_greedy_equals_transformers_generate(engine, strategy):
    answer = engine.generate(QUESTION, PASSAGES, strategy=strategy, recompute_ratio=1.0, max_new_tokens=6)
    ids = engine.run(QUESTION, PASSAGES, strategy="full").plan.input_ids[None]
    with torch.inference_mode():
        ref = engine.model.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    expected = []
    for token in ref.tolist():
        if token in engine.eos_ids:
            break
        expected.append(token)
    assert answer.token_ids == expected and answer.prompt_tokens == ids.shape[1]
    assert answer.text == engine.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert answer.ttft_ms == pytest.approx(sum(answer.parts_ms.values()), rel=0.05)


def test_streaming_yields_the_answer_text_then_the_answer(engine):
    events = list(engine.generate(QUESTION, PASSAGES, strategy="naive", max_new_tokens=5, stream=True))
    *pieces, answer = events
    assert "".join(pieces).strip() == answer.text and len(answer.token_ids) <= 5


def test_prefix_reuse_is_exact_and_cached():
    engine = tiny_engine()
    first = engine.run(QUESTION, PASSAGES, strategy="prefix")
    assert first.misses == 1 and first.parts_ms["precompute"] > 0.0  # the prefix was computed
    second = engine.run(QUESTION, PASSAGES, strategy="prefix")
    assert second.misses == 0 and second.parts_ms["precompute"] == 0.0
    full = engine.run(QUESTION, PASSAGES, strategy="full")
    torch.testing.assert_close(second.logits, full.logits, **TOL)  # an exact prefix changes nothing
    _check_parts(second)


def test_an_entry_that_vanished_after_lookup_is_recomputed(engine, monkeypatch):
    reference = engine.run(QUESTION, PASSAGES, strategy="naive")  # all cached now
    real = engine.store.get_layered_many

    def lose_the_second(keys, device=None):
        found = real(keys, device)
        found[1] = None  # evicted by another request between lookup and read
        return found

    monkeypatch.setattr(engine.store, "get_layered_many", lose_the_second)
    run = engine.run(QUESTION, PASSAGES, strategy="naive")
    assert run.misses == 1 and run.hits == {"cpu": len(PASSAGES)}
    assert run.parts_ms["precompute"] > 0.0
    torch.testing.assert_close(run.logits, reference.logits, **TOL)


def test_a_corrupt_disk_entry_is_recomputed(tmp_path):
    engine = tiny_engine(TieredStore([DiskTier(tmp_path / "cache", catalog_url=f"sqlite:///{tmp_path}/c.sqlite")]))
    reference = engine.run(QUESTION, PASSAGES, strategy="naive")
    keys = [engine.supply.key(c, "default") for c in engine.tokenize_chunks(PASSAGES)]
    payloads = payloads_of(tmp_path / "cache", keys)  # the chunks' payload files (not the prefix's, nor locks)
    assert len(payloads) == len(PASSAGES)
    data = bytearray(payloads[0].read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the KV bytes (the last layer): its CRC32 no longer matches
    payloads[0].write_bytes(bytes(data))
    run = engine.run(QUESTION, PASSAGES, strategy="naive")
    # read layer by layer, the damage shows at the last layer, mid-blend: that chunk is recomputed there,
    # a miss of this answer (lookup had counted it a hit)
    assert run.misses == 1 and run.blend.recovered == 1 and run.hits == {"disk": len(PASSAGES)}
    torch.testing.assert_close(run.logits, reference.logits, **TOL)
    assert engine.store.stats().corrupt == 1 and not payloads[0].exists()  # dropped, never served again
    again = engine.run(QUESTION, PASSAGES, strategy="naive")
    assert again.misses == 1  # recomputed as a miss and stored back
    torch.testing.assert_close(again.logits, reference.logits, **TOL)
    assert engine.run(QUESTION, PASSAGES, strategy="naive").misses == 0


def test_a_damaged_layer_section_read_whole_is_a_miss_recomputed_before_the_blend(tmp_path):
    """The same damage with the whole payload verified at `get` (`layer_reads=False`): a miss at once."""
    disk = DiskTier(tmp_path / "cache", catalog_url=f"sqlite:///{tmp_path}/c.sqlite", layer_reads=False)
    engine = tiny_engine(TieredStore([disk]))
    reference = engine.run(QUESTION, PASSAGES, strategy="naive")
    keys = [engine.supply.key(c, "default") for c in engine.tokenize_chunks(PASSAGES)]
    payload = payloads_of(tmp_path / "cache", keys)[0]
    data = bytearray(payload.read_bytes())
    data[-10] ^= 0xFF
    payload.write_bytes(bytes(data))
    run = engine.run(QUESTION, PASSAGES, strategy="naive")
    assert run.misses == 1 and run.hits == {"disk": len(PASSAGES)}  # lookup saw it; the read refused it
    torch.testing.assert_close(run.logits, reference.logits, **TOL)
    assert engine.run(QUESTION, PASSAGES, strategy="naive").misses == 0  # the recomputed entry was stored back


def test_sampling_follows_the_softmax_and_low_temperature_is_greedy(engine):
    run = engine.run(QUESTION, PASSAGES, strategy="naive", reserve=1)
    logits = run.logits.double()
    probs = torch.softmax(logits / 1.5, dim=-1)
    torch.manual_seed(0)
    draws = 4000
    counts = torch.zeros_like(probs)
    for _ in range(draws):
        counts[next(decode(engine.model, run.blend, set(), max_new_tokens=1, temperature=1.5))] += 1
    total_variation = 0.5 * float((counts / draws - probs).abs().sum())
    assert total_variation < 0.15, total_variation  # a wrong temperature or argmax would be far off
    cold = next(decode(engine.model, run.blend, set(), max_new_tokens=1, temperature=1e-4))
    assert cold == int(logits.argmax())
    torch.manual_seed(1)
    a = engine.generate(QUESTION, PASSAGES, strategy="naive", temperature=1.0, max_new_tokens=6).token_ids
    torch.manual_seed(1)
    b = engine.generate(QUESTION, PASSAGES, strategy="naive", temperature=1.0, max_new_tokens=6).token_ids
    assert a == b


def test_promotions_wait_until_the_first_token_is_out(tmp_path):
    disk = DiskTier(tmp_path / "cache", catalog_url=f"sqlite:///{tmp_path}/c.sqlite")
    warmup = tiny_engine(TieredStore([disk]))
    warmup.ensure_cached(warmup.tokenize_chunks(PASSAGES))  # on disk only
    engine = tiny_engine(TieredStore([MemoryTier(), disk]))
    events = engine.generate(QUESTION, PASSAGES, strategy="naive", max_new_tokens=4, stream=True)
    first = next(events)
    assert engine.store.stats().promotions == 0  # not before the first token
    *_, answer = [first, *events]
    assert engine.store.stats().promotions == len(PASSAGES) and answer.hits == {"disk": len(PASSAGES)}
    assert answer.decode_ms >= answer.upkeep_ms > 0.0
    run = engine.run(QUESTION, PASSAGES, strategy="naive")
    assert run.hits == {"cpu": len(PASSAGES)}
