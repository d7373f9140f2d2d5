"""`ragkv retrieve "question" -k 10 [--json]`: the chunks of the ingested corpus most similar to a question.

A search needs no LLM (the hits' keys are the catalog's), so no model is loaded and no torch imported:
the question is embedded by the configured encoder, in numpy for a BERT one (the default).
"""

from __future__ import annotations

import argparse
import json
import sys

from .ingest import add_retriever_args
from .options import engine_config, settings_of
from .preflight import check_data_dir


def register(subparsers) -> None:
    p = subparsers.add_parser("retrieve", help="search the ingested chunks", description=__doc__)
    p.add_argument("question")
    p.add_argument("-k", type=int, default=10, help="how many chunks (default 10)")
    add_retriever_args(p)
    p.add_argument("--json", action="store_true", help="print JSON: chunk id, document id, score, text, key")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.retrieval import open_retriever  # here, as every command's own imports: `ragkv --help` stays light
    from ..retriever.embedder import search_embedder

    settings = settings_of(args)
    check_data_dir(settings.data_dir)
    config = engine_config(settings)
    retriever = open_retriever(config, None, embedder=search_embedder(config.retriever))  # search only: no model
    try:
        hits = retriever.search(args.question, args.k)
    finally:
        retriever.close()
    if not hits:  # on stderr, so that --json output stays parseable
        print(
            f"warning: no chunks retrieved: the corpus in {config.data_path()} (namespace {config.namespace}) "
            "is empty; ingest documents first (ragkv ingest PATH...)",
            file=sys.stderr,
        )
    if args.json:
        print(
            json.dumps(
                [
                    dict(
                        chunk_id=h.chunk_id,
                        doc_id=h.doc_id,
                        score=round(h.score, 6),
                        text=h.text,
                        key=str(h.key),
                        position=h.position,
                        num_tokens=len(h.token_ids),
                    )
                    for h in hits
                ],
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    for rank, h in enumerate(hits, start=1):
        preview = " ".join(h.text.split())
        print(
            f"{rank:>3}  {h.score:.4f}  chunk {h.chunk_id}  {h.doc_id}#{h.position}\n     "
            f"{preview[:200]}{'...' if len(preview) > 200 else ''}"
        )
    return 0
