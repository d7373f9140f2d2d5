"""`ragkv query "question"`: one answer from the command line, over documents given as files
(`--file`), strings (`--doc`) or, with `--retrieve K`, the ingested corpus; prints the answer and
TTFT (or the whole Answer with `--json`). `--server URL` asks a running sidecar instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    p.add_argument("--strategy", default=None, help="full, prefix, naive, cacheblend (default) or epic")
    p.add_argument("--ratio", type=float, default=None, help="recompute ratio in [0, 1] (default 0.15)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--model", default="smollm2", help="model alias, local path or cached HF id")
    p.add_argument("--data-dir", default=None, help="model, cache and index folder (default ~/.cache/ragkv)")
    p.add_argument("--server", default=None, metavar="URL", help="ask a running `ragkv serve` at URL instead")
    p.add_argument("--api-key", default=None, help="bearer key for --server")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="print the Answer (text, TTFT parts, hits) as JSON")
    p.set_defaults(func=run)


def _documents(args: argparse.Namespace) -> list[str]:
    docs = list(args.doc)
    for f in args.file:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"--file {f}: no such file")
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def run(args: argparse.Namespace) -> int:
    from ..blend.config import validate

    validate(args.strategy or "cacheblend", 0.15 if args.ratio is None else args.ratio)
    docs = _documents(args)
    if args.server:
        from ..server.client import RagkvClient

        client = RagkvClient(args.server, api_key=args.api_key)
        out = client.generate(
            args.question,
            docs,
            k=args.retrieve or None,
            strategy=args.strategy,
            recompute_ratio=args.ratio,
            max_new_tokens=args.max_new_tokens,
        )
        print(
            json.dumps(out, indent=2)
            if args.json
            else f"{out['text']}\n[TTFT {out['ttft_ms']:.0f} ms, hits {out['hits']}, misses {out['misses']}]"
        )
        return 0
    from ..engine.engine import Engine

    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    engine = Engine.from_pretrained(args.model, **overrides)
    chunks = engine.tokenize_chunks(docs) if docs else []
    if args.retrieve:
        from ..engine.documents import DocumentService

        chunks += [
            list(h.token_ids)
            for h in DocumentService(engine).search(engine.config.namespace, args.question, args.retrieve)
        ]
    events = engine.generate(
        args.question,
        chunks=chunks,
        strategy=args.strategy,
        recompute_ratio=args.ratio,
        max_new_tokens=args.max_new_tokens,
        stream=True,
    )
    answer = None
    for item in events:
        if isinstance(item, str):
            if args.stream and not args.json:
                print(item, end="", flush=True)
        else:
            answer = item
    engine.close()
    if args.json:
        print(json.dumps(answer.to_dict(), indent=2))
    else:
        print(
            ("\n" if args.stream else answer.text + "\n") + f"[{answer.strategy}, TTFT {answer.ttft_ms:.0f} ms, "
            f"hits {answer.hits}, misses {answer.misses}, recomputed {answer.recompute_fraction:.0%}]",
            file=sys.stdout,
        )
    return 0
