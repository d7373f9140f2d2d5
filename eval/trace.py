"""The RAGPulse trace as prompts of token-length segments (no text): parsing for `ragkv eval --trace DIR`.

A directory holds `0_trace.jsonl` (one request a line: timestamp, input/output length, `hash_ids` with
`sys_prompt`, `passages_ids`, `history`, `web_search`, `user_input` id lists, session id) and the token
length of every id in `1_sys_prompt.jsonl` .. `5_web_search.jsonl`; blank lines are skipped. A request's
prompt is, in order: its system prompt segments, its passages (the chunks), its history, its user input.
Web-search results are kept on the request but are not part of the prompt (as the issue defines it).
Requests are returned in arrival order (timestamp, ties in file order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .datasets import jsonl_records

TRACE_FILE = "0_trace.jsonl"
LENGTH_FILES = {  # file -> its id field
    "1_sys_prompt.jsonl": "sys_prompt_id",
    "2_passages.jsonl": "passage_id",
    "3_history.jsonl": "history_id",
    "4_user_input.jsonl": "user_input_id",
    "5_web_search.jsonl": "web_search_id",
}
PROMPT_PARTS = ("sys_prompt", "passages", "history", "user_input")


@dataclass(frozen=True)
class Segment:
    """One id of a prompt part with its token length."""

    part: str  # one of PROMPT_PARTS
    id: int
    tokens: int


@dataclass(frozen=True)
class TraceRequest:
    """One request of the trace, its prompt as segments."""

    index: int  # position in arrival order
    timestamp: float
    session_id: str
    sys_prompt: tuple[Segment, ...]
    passages: tuple[Segment, ...]
    history: tuple[Segment, ...]
    user_input: tuple[Segment, ...]
    web_search: tuple[int, ...] = ()
    output_length: int = 0

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The prompt in order: system prompt, passages, history, user input."""
        return self.sys_prompt + self.passages + self.history + self.user_input

    @property
    def prompt_tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    @property
    def passage_tokens(self) -> int:
        return sum(s.tokens for s in self.passages)


def load_lengths(directory: str | Path) -> dict[int, int]:
    """Token length of every id of the length files present (ids are distinct across files)."""
    directory = Path(directory)
    lengths: dict[int, int] = {}
    for name, field in LENGTH_FILES.items():
        if (directory / name).exists():
            for row in jsonl_records(directory / name):
                lengths[int(row[field])] = int(row["token_length"])
    return lengths


def load_trace(directory: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """The trace's requests in arrival order (the first `limit` of them). An id with no length is an error."""
    directory = Path(directory)
    if not (directory / TRACE_FILE).exists():
        raise FileNotFoundError(f"no {TRACE_FILE} in {directory}")
    lengths = load_lengths(directory)

    def segments(part: str, ids: list) -> tuple[Segment, ...]:
        out = []
        for i in ids or []:
            if int(i) not in lengths:
                raise ValueError(f"{directory}: {part} id {i} has no token length")
            out.append(Segment(part, int(i), lengths[int(i)]))
        return tuple(out)

    rows = []
    for n, row in enumerate(jsonl_records(directory / TRACE_FILE)):
        ids = row.get("hash_ids") or {}
        rows.append(
            (
                float(row.get("timestamp", 0)),
                n,
                row,
                segments("sys_prompt", ids.get("sys_prompt")),
                segments("passages", ids.get("passages_ids")),
                segments("history", ids.get("history")),
                segments("user_input", ids.get("user_input")),
                tuple(int(i) for i in ids.get("web_search") or []),
            )
        )
    rows.sort(key=lambda r: (r[0], r[1]))
    if limit:
        rows = rows[:limit]
    return [
        TraceRequest(i, ts, str(row.get("session_id", "")), sp, pa, hi, ui, ws, int(row.get("output_length", 0)))
        for i, (ts, _, row, sp, pa, hi, ui, ws) in enumerate(rows)
    ]
