"""Evaluation datasets as one record type: a question, its passages (chunks) and gold answers.

Formats: the generic JSONL (`{"id", "question", "chunks": [str], "answers": [str]}` per line), and
readers for CacheBlend's MuSiQue / 2WikiMQA JSON, LongBench Multi-News, MiniLongBench SAMSum and
NQ-open (lost-in-the-middle).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("jsonl", "musique", "wikimqa", "multinews", "samsum", "nq")


@dataclass(frozen=True)
class Sample:
    """One evaluation question."""

    id: str
    question: str
    chunks: tuple[str, ...]
    answers: tuple[str, ...]
    chunk_ids: tuple[tuple[int, ...], ...] | None = None  # token ids, when chunks come from a retriever


def load_samples(path: str | Path, fmt: str, limit: int | None = None, max_chunks: int | None = None) -> list[Sample]:
    """Read `limit` samples of format `fmt`, keeping at most `max_chunks` passages each."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; accepted: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    out = []
    for sample in _READERS[fmt](path):
        chunks = sample.chunks[:max_chunks] if max_chunks else sample.chunks
        if not chunks or not sample.question.strip():
            continue
        out.append(Sample(sample.id, sample.question, tuple(chunks), sample.answers))
        if limit and len(out) >= limit:
            break
    return out


def jsonl_records(path: Path) -> Iterator[dict]:
    """The JSON objects of a JSONL file (gzipped when it ends in .gz), blank lines skipped; a bad line
    fails naming the file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: invalid JSON ({err.msg})") from None


def _jsonl(path: Path) -> Iterator[Sample]:
    for n, rec in enumerate(jsonl_records(path), 1):
        missing = [k for k in ("question", "chunks", "answers") if k not in rec]
        if missing:
            raise ValueError(
                f"{path}:{n}: missing field(s) {', '.join(missing)}; "
                'expected {"id", "question", "chunks": [str], "answers": [str]}'
            )
        yield Sample(str(rec.get("id", n)), rec["question"], tuple(rec["chunks"]), tuple(rec["answers"]))


def _cacheblend(path: Path) -> Iterator[Sample]:
    """CacheBlend's inputs: `[{"ctxs": [{"title", "text"}], "question", "answers"}]`; 2WikiMQA nests answers."""
    records = json.loads(path.read_text())
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and "ctxs" in r and "question" in r for r in records
    ):
        raise ValueError(f"{path}: expected a JSON list of {{ctxs: [{{title, text}}], question, answers}} records")
    for n, rec in enumerate(records, 1):
        answers = [a for group in rec["answers"] for a in (group if isinstance(group, list) else [group])]
        chunks = tuple((c.get("title", "") + "\n\n" if c.get("title") else "") + c["text"] for c in rec["ctxs"])
        yield Sample(str(n), rec["question"], chunks, tuple(answers))


def _multinews(path: Path) -> Iterator[Sample]:
    """LongBench multi_news: `context` holds the documents separated by 'Passage N:' markers."""
    import re

    for n, rec in enumerate(jsonl_records(path), 1):
        docs = [d.strip() for d in re.split(r"Passage \d+:\n?", rec["context"]) if d.strip()]
        yield Sample(
            str(rec.get("_id", n)), "Write a one-page summary of all the news.", tuple(docs), tuple(rec["answers"])
        )


def _samsum(path: Path) -> Iterator[Sample]:
    """MiniLongBench SAMSum: `{"i": {"origin_prompt", "gold"}}`; the few-shot "Dialogue: ..." blocks are the
    reusable chunks, the last block is the dialogue to summarise, `gold` is a repr'd list of one summary."""
    import ast

    for key, rec in json.loads(path.read_text()).items():
        blocks = rec["origin_prompt"].split("Dialogue: ")
        shots = tuple("Dialogue: " + b.strip() + "\n" for b in blocks[1:-1])
        target = "Summarize the last dialogue in a few short sentences.\nDialogue: " + blocks[-1].strip()
        gold = rec["gold"]
        if isinstance(gold, str):
            gold = ast.literal_eval(gold) if gold.startswith("[") else [gold]
        yield Sample(str(key), target, shots, tuple(gold))


def _nq(path: Path, distractors: int = 9) -> Iterator[Sample]:
    """lost-in-the-middle NQ-open (one gold passage per record): each question gets its gold passage
    plus the next records' passages as distractors, the gold at a position that cycles."""
    records = list(jsonl_records(path))
    passages = [f"{r['ctxs'][0].get('title', '')}\n{r['ctxs'][0]['text']}".strip() for r in records]
    for n, rec in enumerate(records):
        others = [passages[(n + j) % len(records)] for j in range(1, distractors + 1)]
        at = n % (distractors + 1)
        chunks = tuple(others[:at] + [passages[n]] + others[at:])
        yield Sample(str(n), rec["question"], chunks, tuple(rec["answers"]))


_READERS = {
    "jsonl": _jsonl,
    "musique": _cacheblend,
    "wikimqa": _cacheblend,
    "multinews": _multinews,
    "samsum": _samsum,
    "nq": _nq,
}
