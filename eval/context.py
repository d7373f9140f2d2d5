"""Chunk metadata and KV variants for an evaluated sample, recorded before its strategies run (what
`cachecraft` reads).

Cache-Craft learns a chunk's metadata when the chunk was used in an earlier prompt. An eval sample's
chunks are new, so a context pass (`Engine.record_context`, engine/context_pass.py) over the same chunks
stands in for that earlier prompt: `reversed` (default: every chunk sees different neighbours before
it), `same` (the evaluated order: the same passages recurring in the same order, so with
`blend.craft_variants > 0` every chunk after the first finds an exact KV variant), `new-first` (the
evaluated order without its first chunk: a new passage arrives in front of recurring ones, so each
later chunk finds a variant that lacks one of the chunks now before it), `served` (no context pass: the
prompt was served twice before by cachecraft, so the serving path (engine/serving_variants.py,
`blend.craft_serve`) stored its exact variants: a recurring prompt) or `none` (nothing recorded:
every chunk takes cachecraft's query-aware fallback).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.engine import Engine

ORDERS = ("reversed", "same", "new-first", "served", "none")
SERVED_BEFORE = 2  # `served`: earlier occurrences of the prompt (the second stores its exact variants)


def record_sample_context(engine: Engine, question: str, chunks: Sequence[Sequence[int]], order: str) -> None:
    """Record each chunk's metadata (and, with `blend.craft_variants > 0`, its in-context KV variant)
    from a context pass over `chunks` in `order`."""
    if order not in ORDERS:
        raise ValueError(f"unknown context order {order!r}; accepted: {', '.join(ORDERS)}")
    if order == "none" or not chunks:
        return
    if order == "served":
        for _ in range(SERVED_BEFORE):
            engine.run(question, chunks=[list(c) for c in chunks], strategy="cachecraft")
        return
    seq = {"reversed": list(range(len(chunks)))[::-1], "same": list(range(len(chunks)))}.get(
        order, list(range(1, len(chunks)))
    )
    if not seq:
        return
    engine.record_context(question, chunks=[list(chunks[i]) for i in seq])
