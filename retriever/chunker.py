"""Token-aware chunking: a document is tokenized once and cut into chunks of model tokens.

Cuts fall at the best boundary inside [min, max] tokens (paragraph > line or sentence > word > any
token). Chunks keep their token ids, so the KV cache is computed for exactly those ids and nothing is
re-tokenized later; concatenating the chunks' ids without their overlap gives the document's ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RetrieverConfig

_SENTENCE_END = ".!?"
_CLOSERS = "\"')]»”’"
PARAGRAPH, LINE_OR_SENTENCE, WORD, ANY = 3, 2, 1, 0


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document: ids [start, end) of the document's ids; the first `overlap` repeat the
    previous chunk."""

    token_ids: tuple[int, ...]
    text: str
    start: int
    end: int
    overlap: int = 0

    @property
    def new_ids(self) -> tuple[int, ...]:
        """The ids this chunk adds to the document (without the overlap)."""
        return self.token_ids[self.overlap :]


class Chunker:
    """Cuts text into chunks of `config.chunk_min_tokens .. chunk_max_tokens` tokens of `tokenizer`."""

    def __init__(self, tokenizer, config: RetrieverConfig | None = None) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"the chunker needs a fast (Rust) tokenizer with offset mapping, got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self.config = config or RetrieverConfig()

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The document's ids (no special tokens) and each token's character span."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def split(self, text: str) -> list[Chunk]:
        """Chunks of `text` in order; an empty or all-whitespace text gives no chunks."""
        ids, offsets = self.tokenize(text)
        return [
            Chunk(tuple(ids[a:e]), text[offsets[a][0] : offsets[e - 1][1]], a, e, s - a)
            for a, s, e in self.cuts(text, offsets)
        ]

    def cuts(self, text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """(start with overlap, start of new tokens, end) per chunk, in token indices."""
        cfg = self.config
        n = len(offsets)
        out: list[tuple[int, int, int]] = []
        s = 0
        while s < n:
            ov = min(cfg.overlap_tokens, s)
            lo, hi = max(1, cfg.chunk_min_tokens - ov), cfg.chunk_max_tokens - ov
            end = n if n - s <= hi else _best_cut(text, offsets, s + lo, s + hi)
            out.append((s - ov, s, end))
            s = end
        return out


def _best_cut(text: str, offsets: list[tuple[int, int]], lo: int, hi: int) -> int:
    """The latest token index in [lo, hi] with the highest boundary rank."""
    best, best_rank = hi, -1
    for e in range(hi, lo - 1, -1):
        r = boundary_rank(text, offsets[e][0])
        if r > best_rank:
            best, best_rank = e, r
            if r == PARAGRAPH:
                break
    return best


def boundary_rank(text: str, p: int) -> int:
    """How good a cut before character `p` is: PARAGRAPH, LINE_OR_SENTENCE, WORD or ANY (mid-word)."""
    before, after = text[max(0, p - 32) : p], text[p : p + 32]
    head = before.rstrip()
    gap = before[len(head) :] + after[: len(after) - len(after.lstrip())]
    if not gap:
        return ANY
    if gap.count("\n") >= 2:
        return PARAGRAPH
    tail = head.rstrip(_CLOSERS)
    if "\n" in gap or tail[-1:] in _SENTENCE_END:
        return LINE_OR_SENTENCE
    return WORD
