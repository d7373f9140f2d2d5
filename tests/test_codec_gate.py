"""The answer gate refuses a codec that changes answers and accepts lossless ones (tiny model, CPU)."""

import pytest
from tiny_engine import PASSAGES, tiny_engine

from ragkv.chunk_cache import ChunkKV
from ragkv.compression import EncodedKV
from ragkv.compression.identity import IdentityCodec
from ragkv.eval.codec_gate import CodecVerdict, GatePrompt, Outcome, gate_table, run_gate


class ScaledCodec(IdentityCodec):
    """A lossy test codec: V scaled by `factor` (K kept), so attention outputs shrink everywhere."""

    name = "scaled"
    lossless = False

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def encode(self, kv: ChunkKV) -> EncodedKV:
        x = kv.kv.clone()
        x[1] = x[1] * self.factor
        return super().encode(ChunkKV(x, kv.pos0))


def _prompts(engine):
    questions = ["where does the river bend?", "what lines the quartz road?", "what is delta?"]
    chunks = tuple(tuple(c) for c in engine.tokenize_chunks(PASSAGES))
    return [GatePrompt(f"q{i}", q, chunks[i:] + chunks[:i]) for i, q in enumerate(questions)]


def test_gate_refuses_a_codec_that_changes_answers_and_accepts_lossless_ones():
    engine = tiny_engine()
    codecs = {"identity": "identity", "lz4": "lz4", "scaled": ScaledCodec(0.0)}
    verdicts = {v.codec: v for v in run_gate(engine, _prompts(engine), codecs, "naive", new_tokens=8)}
    for lossless in ("identity", "lz4"):
        v = verdicts[lossless]
        assert v.passes and v.same_answers == 3 and v.kl_ratio == 1.0 and v.bit_exact == 3
    scaled = verdicts["scaled"]
    assert scaled.changed, "V zeroed in every cached row must change some greedy answer"
    assert not scaled.passes and scaled.bit_exact == 0
    table = gate_table(verdicts.values())
    assert "| scaled |" in table and "| NO |" in table and "| lz4 |" in table


def test_same_answers_are_not_enough_kl_must_stay_within_tolerance():
    base = [Outcome((5, 6), 0.10, 16.0), Outcome((7,), 0.20, 16.0)]

    def verdict(kls, answers=((5, 6), (7,))):
        outcomes = [Outcome(a, k, 2.5) for a, k in zip(answers, kls)]
        changed = [f"q{i}" for i, (o, b) in enumerate(zip(outcomes, base)) if o.answer != b.answer]
        return CodecVerdict("c", outcomes, base, changed)

    assert verdict([0.11, 0.21]).passes  # 1.07x
    assert not verdict([0.12, 0.24]).passes  # 1.2x, answers the same
    assert not verdict([0.10, 0.20], answers=((5, 9), (7,))).passes  # kl equal, one answer changed
    assert verdict([0.12, 0.24]).kl_ratio == pytest.approx(1.2)
