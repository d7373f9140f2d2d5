"""The answer gate: a codec may hold a tier's chunk KV by default only if it changes no answer.

For each prompt of an eval set, the chunks' KV is computed once and stored in fp16 (as the resident
tier holds it: "uncompressed"); then, per codec, the same entries go into a one-tier store with that
codec and the Engine answers the prompt from it (the serving path: lookup, lazy per-layer decode,
the configured strategy and ratio, the one greedy decode loop). A codec passes when, over the set,

- every greedy answer of `new_tokens` tokens is the uncompressed answer, token for token, and
- its kl_mean against the full prefill (teacher-forced on the full prefill's answer, as `ragkv eval`)
  is within `KL_TOLERANCE` x the uncompressed kl_mean.

A codec whose round trip returns every chunk's fp16 KV bit for bit (identity, lz4) gives the blend the
same tensors, so its outcome is the uncompressed one without answering again (`bit_exact`).
`ragkv calibrate --gate` prints the table; every tier's default codec must pass it (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..chunk_cache import ChunkKV
from ..compression import Codec, get_codec
from ..engine.engine import Engine
from ..storage import MemoryTier, TieredStore
from .metrics import TEACHER_TOKENS, kl_per_position

GATE_TOKENS = 24  # greedy answer tokens compared
KL_TOLERANCE = 1.1  # a codec's kl_mean may be at most this times the uncompressed one
KL_FLOOR = 1e-6  # nats: below this a kl difference is rounding, not harm (the full strategy has kl 0)
UNCOMPRESSED = "uncompressed"


@dataclass(frozen=True)
class GatePrompt:
    """One question over its chunks (token ids, in prompt order)."""

    sample_id: str
    question: str
    chunks: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Outcome:
    """One prompt answered from one store."""

    answer: tuple[int, ...]  # greedy answer ids, EOS excluded
    kl_mean: float  # against the full prefill, teacher-forced on its answer
    bits: float  # stored bits per KV value


@dataclass
class CodecVerdict:
    """A codec over the gate's prompts."""

    codec: str
    outcomes: list[Outcome] = field(default_factory=list)
    reference: list[Outcome] = field(default_factory=list)  # the uncompressed outcomes, same prompts
    changed: list[str] = field(default_factory=list)  # sample ids whose answer differs
    bit_exact: int = 0  # prompts whose round trip was bit for bit (not answered again)

    @property
    def prompts(self) -> int:
        return len(self.outcomes)

    @property
    def same_answers(self) -> int:
        return self.prompts - len(self.changed)

    @property
    def kl_mean(self) -> float:
        return _mean(o.kl_mean for o in self.outcomes)

    @property
    def kl_uncompressed(self) -> float:
        return _mean(o.kl_mean for o in self.reference)

    @property
    def kl_ratio(self) -> float:
        base = self.kl_uncompressed
        if base < KL_FLOOR:
            return 1.0 if self.kl_mean < KL_FLOOR else float("inf")
        return self.kl_mean / base

    @property
    def bits(self) -> float:
        return _mean(o.bits for o in self.outcomes)

    @property
    def passes(self) -> bool:
        return self.prompts > 0 and not self.changed and self.kl_mean <= KL_TOLERANCE * self.kl_uncompressed + KL_FLOOR

    def row(self) -> dict:
        return {
            "codec": self.codec,
            "prompts": self.prompts,
            "same_answers": self.same_answers,
            "kl_mean": self.kl_mean,
            "kl_uncompressed": self.kl_uncompressed,
            "kl_ratio": self.kl_ratio,
            "bits": self.bits,
            "passes": self.passes,
            "changed": list(self.changed),
            "bit_exact": self.bit_exact,
        }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def codec_engine(engine: Engine, codec: str | Codec) -> Engine:
    """An Engine over `engine`'s model and settings whose one tier (in memory, fp16 like the resident
    tier) stores entries with `codec`."""
    tier = MemoryTier(1 << 40, codec=codec, name="gate", dtype=torch.float16)
    return Engine(engine.model, TieredStore([tier], promote=False), engine.config, engine.template, engine.embedder)


def round_trip(codec: Codec, kvs: Sequence[ChunkKV]) -> tuple[bool, float]:
    """(whether `codec` returns every chunk's fp16 KV bit for bit, its stored bits per value)."""
    encoded = [codec.encode(kv) for kv in kvs]
    exact = all(torch.equal(codec.decode(e).kv, kv.kv) for e, kv in zip(encoded, kvs))
    return exact, 8 * sum(e.nbytes for e in encoded) / max(sum(kv.kv.numel() for kv in kvs), 1)


@torch.inference_mode()
def answer_from(
    engine: Engine,
    prompt: GatePrompt,
    kvs: Sequence[ChunkKV],
    forced: torch.Tensor,
    reference_logits: torch.Tensor,
    new_tokens: int,
    strategy: str | None,
    ratio: float | None,
) -> Outcome:
    """`prompt` answered by `engine` (a `codec_engine`) with `kvs` put into its store first."""
    chunks = [list(c) for c in prompt.chunks]
    for chunk, kv in zip(chunks, kvs):
        engine.store.put(engine.supply.key(chunk, engine.config.namespace), kv)
    values = sum(kv.kv.numel() for kv in kvs)
    bits = 8 * engine.store.tiers[0].nbytes / max(values, 1)
    run = engine.run(
        prompt.question,
        chunks=chunks,
        strategy=strategy,
        recompute_ratio=ratio,
        reserve=max(new_tokens, TEACHER_TOKENS),
    )
    answer = tuple(engine.answer_ids(run.blend, new_tokens))
    kl = kl_per_position(reference_logits, engine.teacher_forced_logits(run.blend, forced))
    return Outcome(answer, float(kl.mean()), bits)


@torch.inference_mode()
def run_gate(
    engine: Engine,
    prompts: Sequence[GatePrompt],
    codecs: dict[str, str | Codec],
    strategy: str | None = None,
    ratio: float | None = None,
    new_tokens: int = GATE_TOKENS,
    progress: Callable[[str], None] | None = None,
) -> list[CodecVerdict]:
    """One verdict per codec (`codecs`: label -> name or instance) over `prompts`, answered with
    `strategy` at `ratio` (None: the engine's defaults) against the uncompressed fp16 KV."""
    resolved = {label: get_codec(c) if isinstance(c, str) else c for label, c in codecs.items()}
    verdicts = {label: CodecVerdict(label) for label in resolved}
    for prompt in prompts:
        chunks = [list(c) for c in prompt.chunks]
        full = engine.run(prompt.question, chunks=chunks, strategy="full", reserve=max(new_tokens, TEACHER_TOKENS))
        full_answer = list(engine.answer_ids(full.blend, TEACHER_TOKENS))
        forced = torch.tensor(full_answer or [int(full.logits.argmax())])
        reference_logits = engine.teacher_forced_logits(full.blend, forced)
        kvs = [ChunkKV(kv.kv.half(), kv.pos0) for kv in engine.supply.compute(chunks)]
        args = (forced, reference_logits, new_tokens, strategy, ratio)
        base = answer_from(codec_engine(engine, "identity"), prompt, kvs, *args)
        for label, codec in resolved.items():
            verdict = verdicts[label]
            exact, bits = round_trip(codec, kvs)
            if exact:
                outcome = Outcome(base.answer, base.kl_mean, bits)
                verdict.bit_exact += 1
            else:
                outcome = answer_from(codec_engine(engine, codec), prompt, kvs, *args)
            verdict.outcomes.append(outcome)
            verdict.reference.append(base)
            if outcome.answer != base.answer:
                verdict.changed.append(prompt.sample_id)
            if progress:
                same = "same answer" if outcome.answer == base.answer else "ANSWER CHANGED"
                progress(
                    f"{prompt.sample_id} {label}: {same}, kl {outcome.kl_mean:.4f} (uncompressed {base.kl_mean:.4f})"
                )
    return list(verdicts.values())


def gate_table(verdicts: Sequence[CodecVerdict], title: str = "") -> str:
    """A markdown table: codec | bits/value | same answers | kl ratio | passes."""
    lines = [
        f"{title}" if title else "",
        "| codec | bits/value | same answers | kl_mean (uncompressed) | kl ratio | passes |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for v in verdicts:
        lines.append(
            f"| {v.codec} | {v.bits:.2f} | {v.same_answers}/{v.prompts} | {v.kl_mean:.4f} ({v.kl_uncompressed:.4f}) "
            f"| {v.kl_ratio:.2f}x | {'yes' if v.passes else 'NO'} |"
        )
    return "\n".join(lines)
