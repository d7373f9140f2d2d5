"""The evaluation runner: every strategy on every sample, measured against a full prefill of the
same prompt in the same run (TTFT ratios, KL / top-1 teacher-forced on full's answer, F1, ROUGE-L),
and against the model's own transformers forward on the same token ids (`hf`, the honest baseline).
Answer-level fidelity: `same_answer` (the greedy answer is full's, token for token), `agree_prefix`
(share of full's answer repeated before the first difference) and `f1_vs_full`, of the answer a user
reads: with the engine's answer guard (`blend.answer_guard`: near-ties decided on exact KV; its
prefill counted in the TTFT when the first step was the tie), read whole (tokens the fused KV had
decided off the exact path before a switch are taken back, as `Engine.generate()` does). `*_streamed`
are what a streaming reader gets (no take-back), `*_unguarded` the fused KV's own answer's (the
selection's quality); `exact_switch` the share of answers the guard moved to exact KV, `taken_back` the
share that took tokens back."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..blend.config import RATIO_FREE, split_name, strategy_label
from ..engine.answer_guard import margin
from ..engine.decode import read_whole
from ..engine.engine import Engine
from ..engine.stopwatch import Stopwatch
from .context import record_sample_context
from .datasets import Sample
from .metrics import (
    TEACHER_TOKENS,
    agree_prefix,
    f1,
    first_difference,
    kl_per_position,
    rouge_l,
    same_answer,
    top1_agreement,
)


@dataclass(frozen=True)
class Spec:
    """One evaluated configuration: a strategy at a recompute ratio."""

    strategy: str
    ratio: float = 0.0

    @property
    def label(self) -> str:
        return strategy_label(self.strategy, self.ratio)


def parse_specs(strategies: Sequence[str], ratios: Sequence[float]) -> list[Spec]:
    """`full` first (the reference), then each strategy; ratio-taking ones once per ratio."""
    specs = [Spec("full")]
    for name in strategies:
        if name == "full":
            continue
        specs.extend([Spec(name)] if split_name(name)[0] in RATIO_FREE else [Spec(name, r) for r in ratios])
    return specs


@torch.inference_mode()
def hf_ttft_ms(engine: Engine, question: str, chunks: Sequence[Sequence[int]]) -> float:
    """TTFT of the model's own transformers forward on the prompt the engine builds (same token ids),
    timed like `Engine.run`: template and plan, then `model(ids, logits_to_keep=1)`, device synchronized."""
    watch = Stopwatch(engine.model.device)
    ids = engine.plan(question, chunks).input_ids[None].to(engine.model.device)  # [1, N]
    engine.model.model(ids, logits_to_keep=1)
    watch.lap("hf")
    return watch.elapsed_ms()


@torch.inference_mode()
def evaluate_sample(
    engine: Engine,
    sample: Sample,
    specs: Sequence[Spec],
    max_new_tokens: int,
    context: str = "reversed",
) -> dict[str, dict]:
    """Per spec: ttft_ms, quality vs gold, fidelity vs the full prefill (the first spec must be full),
    and speedups against full and against the model's own forward on the same token ids (`hf`).
    `context`: the chunk order of the context pass that records cachecraft's metadata (eval/context.py)."""
    assert specs and specs[0].strategy == "full", "the full prefill is the reference and runs first"
    chunks = sample_chunks(engine, sample)
    engine.ensure_cached(chunks)  # chunk KV in the store before timing: TTFT is the cache-hit path
    if any(s.strategy.startswith("cachecraft") for s in specs):  # its chunk metadata is recorded before timing
        record_sample_context(engine, sample.question, chunks, context)
    out: dict[str, dict] = {}
    reference = None
    hf_ms = None
    for spec in specs:
        run = engine.run(
            sample.question,
            chunks=chunks,
            strategy=spec.strategy,
            recompute_ratio=spec.ratio,
            reserve=max(max_new_tokens, TEACHER_TOKENS),
        )
        n = run.prompt_tokens
        chunk_tokens = sum(end - start for start, end in run.plan.chunk_spans)  # rows a layer may recompute
        guard = engine.answer_guard(run)
        answer_ids = read_whole(engine.answer_ids(run.blend, max_new_tokens, guard=guard))
        switched = guard is not None and guard.switched_at is not None
        fused_ids = list(engine.answer_ids(run.blend, max_new_tokens)) if switched else answer_ids
        left_at = guard.left_at if switched else None
        # a streamed answer keeps the fused tokens up to the switch: it is the fused one up to and with its
        # first token off the exact path (`left_at`), which decides both metrics
        streamed_ids = answer_ids if left_at is None else fused_ids[: left_at + 1]
        # the fused path's margin at each step, the step that picked EOS included: what any other guard
        # threshold would have done with it (experiments/guard_thresholds.py)
        fused_steps = fused_ids + ([min(engine.eos_ids)] if len(fused_ids) < max_new_tokens else [])
        fused_margins = (
            [margin(row) for row in engine.teacher_forced_logits(run.blend, torch.tensor(fused_steps))]
            if guard is not None and fused_steps
            else []
        )
        guard_first_ms = guard.first_token_ms if guard is not None else 0.0  # its prefill before the first token
        ttft_ms = run.ttft_ms + guard_first_ms
        text = engine.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        if reference is None:
            hf_ms = hf_ttft_ms(engine, sample.question, chunks)  # right after full: same machine state
            forced = torch.tensor(answer_ids[:TEACHER_TOKENS] or [int(run.logits.argmax())])
            reference = (forced, engine.teacher_forced_logits(run.blend, forced), text, answer_ids)
        forced, ref_logits, ref_text, ref_ids = reference
        logits = engine.teacher_forced_logits(run.blend, forced)  # [P, vocab]
        kl = kl_per_position(ref_logits, logits)
        out[spec.label] = {
            "strategy": spec.strategy,
            "ratio": spec.ratio,
            "same_answer": float(same_answer(ref_ids, answer_ids)),
            "agree_prefix": agree_prefix(ref_ids, answer_ids),
            "f1_vs_full": f1(text, [ref_text]) if ref_text else float(text == ref_text),
            "same_answer_streamed": float(same_answer(ref_ids, streamed_ids)),
            "agree_prefix_streamed": agree_prefix(ref_ids, streamed_ids),
            "same_answer_unguarded": float(same_answer(ref_ids, fused_ids)),
            "agree_prefix_unguarded": agree_prefix(ref_ids, fused_ids),
            "exact_switch": float(switched),
            "taken_back": float(left_at is not None),
            "fused_margins": fused_margins,
            "fused_turn": first_difference(ref_ids, fused_ids),
            "exact_from": guard.switched_at if switched else None,
            "guard_ms": guard.switch_ms if switched else 0.0,
            "ttft_ms": ttft_ms,
            "hf_ttft_ms": hf_ms,
            "parts_ms": {**run.parts_ms, "guard": guard_first_ms},
            "recompute_fraction": run.blend.recompute_fraction,
            "f1": f1(text, sample.answers),
            "rouge_l": rouge_l(text, sample.answers),
            "kl_first_token": float(kl[0]),
            "kl_mean": float(kl.mean()),
            "top1_agreement": top1_agreement(ref_logits, logits),
            "rouge_l_vs_full": rouge_l(text, [ref_text]) if ref_text else float(text == ref_text),
            "answer": text,
            "prompt_tokens": n,
            "misses": run.misses,
            "recomputed_chunk_tokens": run.blend.recompute_fraction * chunk_tokens,
            "variants_used": sum(d.used_variant for d in run.blend.chunk_decisions),
        }
    full_ttft = out["full"]["ttft_ms"]
    for row in out.values():
        row["speedup_vs_full"] = full_ttft / row["ttft_ms"]
        row["speedup_vs_hf"] = hf_ms / row["ttft_ms"]
    return out


def summarize(per_sample: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Means of the quality metrics and medians of TTFT and speedup, per spec label."""
    labels = list(per_sample[0]) if per_sample else []
    mean_keys = (
        "same_answer",
        "agree_prefix",
        "f1_vs_full",
        "same_answer_streamed",
        "agree_prefix_streamed",
        "same_answer_unguarded",
        "agree_prefix_unguarded",
        "exact_switch",
        "taken_back",
        "guard_ms",
        "f1",
        "rouge_l",
        "kl_first_token",
        "kl_mean",
        "top1_agreement",
        "rouge_l_vs_full",
        "recompute_fraction",
        "recomputed_chunk_tokens",
        "variants_used",
    )
    summary = {}
    for label in labels:
        rows = [s[label] for s in per_sample]
        kept = [k for k in mean_keys if all(k in r for r in rows)]  # rows of an older run may lack newer keys
        summary[label] = {k: statistics.fmean(r[k] for r in rows) for k in kept}
        summary[label].update(strategy=rows[0]["strategy"], ratio=rows[0]["ratio"])
        summary[label]["ttft_ms_median"] = statistics.median(r["ttft_ms"] for r in rows)
        summary[label]["speedup_vs_full"] = statistics.median(r["speedup_vs_full"] for r in rows)
        summary[label]["speedup_vs_hf"] = statistics.median(r["speedup_vs_hf"] for r in rows)
        summary[label]["hf_ttft_ms_median"] = statistics.median(r["hf_ttft_ms"] for r in rows)
        summary[label]["prompt_tokens_mean"] = statistics.fmean(r["prompt_tokens"] for r in rows)
    return summary


def retrieve_in_the_loop(
    engine: Engine, samples: Sequence[Sample], k: int, namespace: str = "eval-corpus"
) -> list[Sample]:
    """Pool every sample's passages into one ingested corpus, then give each question the `k` chunks
    the retriever finds for it (with their token ids) instead of its own passages."""
    from ..retriever import Document

    texts = dict.fromkeys(c for s in samples for c in s.chunks)  # distinct passages, in order
    engine.ingest(documents=[Document(id=f"p{i}", text=t) for i, t in enumerate(texts)], namespace=namespace)
    out = []
    for s in samples:
        hits = engine.retrieve(s.question, k, namespace=namespace)
        out.append(replace(s, chunks=tuple(h.text for h in hits), chunk_ids=tuple(h.token_ids for h in hits)))
    return out


def run_eval(
    engine: Engine,
    samples: Sequence[Sample],
    specs: Sequence[Spec],
    max_new_tokens: int = 24,
    progress: Callable | None = None,
    context: str = "reversed",
    neighbours: int = 0,
) -> tuple[dict[str, dict], list[dict[str, dict]]]:
    """Evaluate every sample; returns (summary, per-sample rows). With `neighbours` = k > 0 every sample's
    chunks first get neighbour variants (engine/neighbour_variants.py), their k nearest drawn from every
    evaluated sample's passages: the corpus, as ingestion would find them (one embedding of it)."""
    if neighbours:  # ingestion's offline step, for chunks given directly: once, before any timing
        engine.store_neighbour_variants([c for s in samples for c in sample_chunks(engine, s)], k=neighbours)
    rows = []
    for sample in progress(samples) if progress else samples:
        rows.append(evaluate_sample(engine, sample, specs, max_new_tokens, context))
    return summarize(rows), rows


def sample_chunks(engine: Engine, sample: Sample) -> list[list[int]]:
    """A sample's passages as token ids (given, or tokenized as the engine does)."""
    return [list(c) for c in sample.chunk_ids] if sample.chunk_ids else engine.tokenize_chunks(sample.chunks)
