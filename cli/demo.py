"""`ragkv demo`: the main job on embedded defaults, and what it buys. Ten shipped passages are ingested
(chunked, embedded, indexed, chunk KV precomputed and stored); then each shipped question retrieves
its chunks and is answered with a full prefill and with blended reuse, each timed three times (median,
after a warm-up). The table puts TTFT and speedup beside the agreement with the full prefill: the
same first token (top-1), the KL divergence of the first-token distributions, the same greedy answer,
the share of the full prefill's answer repeated before the first difference, the share of chunk
tokens the strategy recomputed (an adaptive budget picks it per question), and `exact`: the answer
step from which the answer guard decided on exact KV after a near-tie (`-`: none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

from .options import add_settings_args, load_engine, settings_of

SETTINGS = ("strategy", "recompute_ratio", "max_new_tokens")  # the flags that set settings (by name)
ANSWER_TOKENS = 24  # the demo's answer length unless --max-new-tokens (settings.max_new_tokens is not read)
NAMESPACE = "demo"  # the demo's catalog and index live apart from the user's (DATA_DIR/tenants/demo)
SMALL_MODEL_NOTE = (
    "Note: SmolLM2-135M is a very small model. It can copy a name or a place that sits in the passage next to "
    "the question's words, but it often drifts into a nearby fact or repeats itself, with a full prefill as well; "
    "judge the blended answers by how closely they follow the full prefill's, not by the gold answers."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="answer shipped questions with full prefill vs blended reuse",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--strategy", default=None, help="fusion strategy to compare with full (default: the configured one)"
    )
    p.add_argument(
        "--ratio",
        dest="recompute_ratio",
        type=float,
        default=None,
        help="recompute ratio, a cap for adaptive budgets (default 0.15)",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"answer length (default {ANSWER_TOKENS})")
    p.add_argument("-k", type=int, default=3, help="chunks retrieved per question (default 3)")
    p.add_argument("--questions", type=int, default=10, help="how many of the 10 shipped questions (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per strategy; the median is shown (default 3)")
    add_settings_args(p, SETTINGS, namespace=False)  # the demo keeps its documents in its own namespace
    p.set_defaults(func=run)


def shipped_demo() -> tuple[list[str], list[dict]]:
    """The shipped demo: its passages' file paths (sorted) and its questions (`id`, `question`, `answers`)."""
    demo = resources.files("ragkv.cli") / "demo"
    paths = sorted(str(p) for p in demo.iterdir() if p.name.endswith(".txt"))
    lines = (demo / "questions.jsonl").read_text().splitlines()
    return paths, [json.loads(line) for line in lines if line.strip()]


class Progress:
    """One line on stderr, rewritten in place while the model works (only on a terminal)."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()

    def __call__(self, text: str) -> None:
        if self.live:
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        self("")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.questions <= 10 or args.repeats < 1 or args.k < 1:
        raise ValueError("--questions must be in 1..10, --repeats and -k at least 1")
    from ..engine.ingest import IngestConfig
    from ..eval.metrics import agree_prefix, kl_per_position

    settings = settings_of(args)
    strategy, ratio = settings.blend.strategy, settings.blend.recompute_ratio
    max_new = args.max_new_tokens or ANSWER_TOKENS
    label = f"{strategy}@{ratio:g}"
    paths, questions = shipped_demo()
    questions = questions[: args.questions]
    t_start = time.perf_counter()
    engine = load_engine(settings)
    progress = Progress()
    progress(f"ingesting {len(paths)} passages (chunk, embed, precompute chunk KV) ...")
    t0 = time.perf_counter()
    report = engine.ingest(paths, namespace=NAMESPACE, config=IngestConfig(progress=False))
    progress.done()
    print(f"ingested {len(paths)} passages in {time.perf_counter() - t0:.1f} s: {report.summary()}")

    def answer(q: dict, chunks, name: str, tokens: int):
        return engine.generate(
            q["question"],
            chunks=chunks,
            strategy=name,
            recompute_ratio=ratio,
            max_new_tokens=tokens,
            namespace=NAMESPACE,
        )

    progress("warming up (the first forward passes of a process are slow) ...")
    warm = [h.token_ids for h in engine.retrieve(questions[0]["question"], args.k, namespace=NAMESPACE)]
    for name in ("full", strategy):
        answer(questions[0], warm, name, 1)
    progress.done()
    print(
        f"\n{len(questions)} questions, {args.k} retrieved chunks each; full prefill vs {label}, TTFT the median "
        f"of {args.repeats} runs\n"
    )
    rows = []
    for i, q in enumerate(questions, start=1):
        hits = engine.retrieve(q["question"], args.k, namespace=NAMESPACE)
        chunks = [h.token_ids for h in hits]
        ttft: dict[str, list[float]] = {"full": [], strategy: []}
        first: dict[str, object] = {}
        for rep in range(args.repeats):  # interleaved, so drift of a shared machine hits both alike
            for name in ("full", strategy):
                progress(f"[{i}/{len(questions)}] {name}: run {rep + 1} of {args.repeats} ...")
                a = answer(q, chunks, name, max_new if rep == 0 else 1)  # later runs time the first token only
                ttft[name].append(a.ttft_ms)
                first.setdefault(name, a)
        progress.done()
        full, fused = first["full"], first[strategy]
        row = dict(
            id=q["id"],
            prompt_tokens=full.prompt_tokens,
            full_ms=statistics.median(ttft["full"]),
            fused_ms=statistics.median(ttft[strategy]),
            top1=bool(full.first_logits.argmax() == fused.first_logits.argmax()),
            kl=float(kl_per_position(full.first_logits[None], fused.first_logits[None])[0]),
            same=full.token_ids == fused.token_ids,
            agree=agree_prefix(full.token_ids, fused.token_ids),
            recomputed=fused.recompute_fraction,
            exact_from=fused.exact_from,  # the answer guard's near-tie: exact KV from this step on (None: none)
        )
        row["speedup"] = row["full_ms"] / row["fused_ms"]
        rows.append(row)
        sources = ", ".join(Path(h.doc_id).stem for h in hits)
        print(f"[{i}] {q['question']}\n    gold: {' / '.join(q['answers'])}    (chunks: {sources})")
        print(f"    {'full':16s} {row['full_ms']:7.0f} ms          {full.text!r}")
        print(f"    {label:16s} {row['fused_ms']:7.0f} ms  {row['speedup']:4.2f}x  {fused.text!r}")
    print()
    print(table(rows, label))
    print(f"\n{SMALL_MODEL_NOTE}")
    print(f"(demo took {time.perf_counter() - t_start:.0f} s)")
    engine.close()
    return 0


def table(rows: list[dict], label: str) -> str:
    """The per-question table and its summary line (median speedup and KL, agreement counts)."""
    head = (
        f"{'question':15s} {'prompt':>6s} {'full ms':>8s} {label + ' ms':>19s} {'speedup':>7s} "
        f"{'top-1':>5s} {'KL':>7s} {'recomp':>6s} {'exact':>5s} {'agree':>5s}  same answer"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['id']:15s} {r['prompt_tokens']:6d} {r['full_ms']:8.0f} {r['fused_ms']:19.0f} {r['speedup']:6.2f}x "
            f"{'yes' if r['top1'] else 'no':>5s} {r['kl']:7.3f} {r['recomputed']:6.2f} "
            f"{'-' if r.get('exact_from') is None else r['exact_from']:>5} {r['agree']:5.2f}  "
            f"{'yes' if r['same'] else 'no'}"
        )
    n = len(rows)
    out.append("-" * len(head))
    out.append(
        f"{'median / count':15s} {'':6s} {statistics.median(r['full_ms'] for r in rows):8.0f} "
        f"{statistics.median(r['fused_ms'] for r in rows):19.0f} "
        f"{statistics.median(r['speedup'] for r in rows):6.2f}x {sum(r['top1'] for r in rows):>3d}/{n} "
        f"{statistics.median(r['kl'] for r in rows):7.3f} {statistics.fmean(r['recomputed'] for r in rows):6.2f} "
        f"{sum(r.get('exact_from') is not None for r in rows):>3d}/{n} "
        f"{statistics.fmean(r['agree'] for r in rows):5.2f}  {sum(r['same'] for r in rows)}/{n}"
    )
    return "\n".join(out)
