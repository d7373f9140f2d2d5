"""The real-run sample of a trace replay: a few trace requests run for real through the Engine / blend
path, each strategy against a full prefill of the same prompt (eval/runner.py's `evaluate_sample`:
kl_mean and top-1 teacher-forced on full's answer).

The trace has no text, so each id gets deterministic text of its token length: a window of the
tokenized demo documents shipped with the CLI (cli/demo/*.txt, read as files), starting at an offset
derived from the id (so a passage is the same tokens in every request). Passages are the chunks; the
question is the history turns and the user input; the system prompt is the engine's template's own
(the trace's system prompt is reused as an exact prefix by every strategy, so it does not change what
chunk fusion gets wrong).

`cachecraft` recomputes, per request, the number of chunk tokens the replay's budget rule gave it (the
overlaps of the variants the simulated store held for its chunks; a chunk the store missed counts as the
context-free entry the real store holds: overlap 1 if it is the first passage, else 0); the engine's
`cachecraft` picks which tokens from recorded chunk metadata. The real store holds one context-free
entry per chunk (no variants), so a chunk the replay served from a matching variant is fused here from
the context-free KV: cachecraft's kl_mean is pessimistic for those chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..engine.engine import Engine
from .datasets import Sample
from .metrics import TEACHER_TOKENS
from .runner import Spec, evaluate_sample, summarize
from .trace import Segment, TraceRequest
from .trace_replay import RequestOutcome, SimStrategy, craft_recompute

CORPUS_DIR = Path(__file__).resolve().parents[1] / "cli" / "demo"


def corpus_ids(engine: Engine, directory: Path = CORPUS_DIR) -> list[int]:
    """Token ids of the demo documents, concatenated in name order."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.txt"))]
    if not texts:
        raise FileNotFoundError(f"no corpus documents (*.txt) in {directory}")
    return list(engine.tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])


def segment_ids(corpus: Sequence[int], segment: Segment) -> list[int]:
    """`segment.tokens` ids of the corpus from an offset fixed by the segment's id (wrapping around)."""
    start = (segment.id * 2654435761) % len(corpus)
    return [corpus[(start + i) % len(corpus)] for i in range(segment.tokens)]


def choose_sample(requests: Sequence[TraceRequest], n: int, max_tokens: int) -> list[int]:
    """`n` request indices evenly spread over the trace's second half (a warm store), among requests with
    at least two passages and at most `max_tokens` tokens of passages, history and user input."""
    half = len(requests) // 2
    eligible = [
        r.index
        for r in requests[half:]
        if len(r.passages) >= 2 and sum(s.tokens for s in r.passages + r.history + r.user_input) <= max_tokens
    ]
    if n <= 0 or not eligible:
        return []
    count = min(n, len(eligible))
    return [eligible[int(i * len(eligible) / count)] for i in range(count)]


def craft_ratio(req: TraceRequest, outcome: RequestOutcome | None, alpha: float, cci: float) -> float:
    """The share of the request's chunk tokens the replay's cachecraft budget recomputes (see module doc;
    no outcome: every chunk as a miss)."""
    total = recomputed = 0
    overlaps = outcome.chunk_overlaps if outcome is not None else [None] * len(req.passages)
    for i, (p, best) in enumerate(zip(req.passages, overlaps)):
        ov = best if best is not None else (1.0 if i == 0 else 0.0)
        recomputed += craft_recompute(p.tokens, ov, alpha, cci)
        total += p.tokens
    return recomputed / total if total else 0.0


def run_sample(
    engine: Engine,
    requests: Sequence[TraceRequest],
    indices: Sequence[int],
    craft: dict[int, RequestOutcome],
    strategies: Sequence[SimStrategy],
    alpha: float,
    cci: float,
    progress=None,
) -> dict:
    """Run the requests `indices` for real (`craft`: their replayed cachecraft outcomes, if replayed)."""
    corpus = corpus_ids(engine)
    rows, ratios = [], {}
    for index in progress(indices) if progress else indices:
        req = requests[index]
        ratios[index] = craft_ratio(req, craft.get(index), alpha, cci)
        specs = [Spec("full")]
        for s in strategies:
            specs.append(Spec(s.name, ratios[index] if s.name == "cachecraft" else s.ratio or 0.0))
        chunks = tuple(tuple(segment_ids(corpus, p)) for p in req.passages)
        question_ids = [t for s in req.history + req.user_input for t in segment_ids(corpus, s)]
        question = engine.tokenizer.decode(question_ids, skip_special_tokens=True)
        sample = Sample(f"trace-{index}", question, tuple(engine.tokenizer.decode(c) for c in chunks), (), chunks)
        out = evaluate_sample(engine, sample, specs, TEACHER_TOKENS)
        renamed = {}
        for spec, s in zip(specs[1:], strategies):
            renamed[s.label] = out[spec.label]
        rows.append({"full": out["full"], **renamed})
    summary = summarize(rows) if rows else {}
    return {
        "requests": list(indices),
        "cachecraft_ratio": ratios,
        "results": {
            label: {
                k: row[k]
                for k in ("kl_mean", "top1_agreement", "recompute_fraction", "ttft_ms_median", "prompt_tokens_mean")
            }
            for label, row in summary.items()
        },
        "samples": [
            {label: {k: v for k, v in row.items() if k != "parts_ms"} for label, row in r.items()} for r in rows
        ],
    }
