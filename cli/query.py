"""`ragkv query "question"`: one answer from the command line, over documents given as files
(`--file`), strings (`--doc`) or, with `--retrieve K`, the ingested corpus; prints the answer and
TTFT (or the whole Answer with `--json`). `--server URL` asks a running sidecar instead.

Chunk KV computed here is written behind to the disk tier, so the next run with the same documents
hits. Settings: flags > `RAGKV_*` environment > `--config FILE` > defaults (see `ragkv config`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import add_settings_args, load_engine, settings_of

SETTINGS = ("strategy", "recompute_ratio", "max_new_tokens")  # the flags that set settings (by name)
_FILE_SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf", ".jsonl", ".json")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query", help="answer one question over documents (files, strings or retrieval)", description=__doc__
    )
    p.add_argument("question")
    p.add_argument("--doc", action="append", default=[], metavar="TEXT", help="a document as a string (repeatable)")
    p.add_argument(
        "--file", action="append", default=[], metavar="PATH", help="a document from a text file (repeatable)"
    )
    p.add_argument("--retrieve", type=int, default=0, metavar="K", help="also fuse the K best ingested chunks")
    p.add_argument(
        "--strategy",
        default=None,
        help="full, prefix, naive, cacheblend (default), epic or cachecraft; cacheblend and cachecraft take "
        "+check or +query (how tokens to recompute are chosen)",
    )
    p.add_argument(
        "--ratio", dest="recompute_ratio", type=float, default=None, help="recompute ratio in [0, 1] (default 0.15)"
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length in tokens (default 32)")
    add_settings_args(p, SETTINGS)
    p.add_argument("--server", default=None, metavar="URL", help="ask a running `ragkv serve` at URL instead")
    p.add_argument("--api-key", default=None, help="bearer key for --server")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print the Answer (text, TTFT parts, hits) as JSON")
    p.set_defaults(func=run)


def looks_like_a_path(text: str) -> bool:
    """A `--doc` value that is probably a file name meant for `--file`."""
    return not any(c.isspace() for c in text) and (text.lower().endswith(_FILE_SUFFIXES) or Path(text).is_file())


def _documents(args: argparse.Namespace) -> list[str]:
    docs = list(args.doc)
    for d in args.doc:
        if looks_like_a_path(d):
            print(f"warning: --doc takes a document's text; {d!r} looks like a file: use --file {d}", file=sys.stderr)
    for f in args.file:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"--file {f}: no such file")
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise ValueError('the question is empty: ask something, e.g. ragkv query "Where does the Rhine bend north?"')
    settings = settings_of(args)  # validates strategy and ratio before anything loads
    docs = _documents(args)
    if args.server:
        from ..server.client import RagkvClient

        client = RagkvClient(args.server, api_key=args.api_key)
        out = client.generate(
            args.question,
            docs,
            k=args.retrieve or None,
            strategy=args.strategy,
            recompute_ratio=args.recompute_ratio,
            max_new_tokens=args.max_new_tokens,
        )
        for warning in (out.get("ragkv") or {}).get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
        print(
            json.dumps(out, indent=2)
            if args.json
            else f"{out['text']}\n[TTFT {out['ttft_ms']:.0f} ms, hits {out['hits']}, misses {out['misses']}]"
        )
        return 0
    engine = load_engine(settings, quiet=args.json)
    chunks = engine.tokenize_chunks(docs) if docs else []
    if args.retrieve:
        from ..engine.documents import DocumentService

        hits = DocumentService(engine).search(engine.config.namespace, args.question, args.retrieve)
        if not hits:
            print(
                f"warning: --retrieve {args.retrieve}: no chunks retrieved; the corpus in "
                f"{engine.config.data_path()} (namespace {engine.config.namespace}) is empty (ragkv ingest PATH...)",
                file=sys.stderr,
            )
        chunks += [list(h.token_ids) for h in hits]
    if not chunks:
        print("warning: no documents: the answer comes from the model alone", file=sys.stderr)
    events = engine.generate(args.question, chunks=chunks, stream=True)
    answer = None
    for item in events:
        if isinstance(item, str):
            if args.stream and not args.json:
                print(item, end="", flush=True)
        else:
            answer = item
    if args.json:
        print(json.dumps(answer.to_dict(), indent=2), flush=True)
    else:
        print(
            ("\n" if args.stream else answer.text + "\n") + f"[{answer.strategy}, TTFT {answer.ttft_ms:.0f} ms, "
            f"hits {answer.hits}, misses {answer.misses}, recomputed {answer.recompute_fraction:.0%}]",
            flush=True,
        )
    engine.close()  # after the answer: waits for the write-behind of new chunk KV to the disk tier
    return 0
