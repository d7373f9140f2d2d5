"""`ragkv ingest PATH... [--data-dir DIR]`: files and folders -> catalog + faiss index + chunk KV.

Re-running skips unchanged documents and cached KV; an interrupted run resumes. `--remove DOC_ID`
deletes documents (and the KV of chunks no other document uses). Exit status 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..engine.config import EngineConfig
from ..engine.ingest import IngestConfig
from ..retriever import RetrieverConfig


def add_retriever_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `ingest` and `retrieve`: where the data lives and which model / index."""
    p.add_argument("--data-dir", default="~/.cache/ragkv", help="catalog, index, KV cache and model folder")
    p.add_argument("--model", default="smollm2", help="model alias or local path (default: smollm2)")
    p.add_argument("--catalog-url", default=None, help="SQLAlchemy URL (default: sqlite:///DATA_DIR/catalog.sqlite)")
    p.add_argument("--embedder", default=None, help="local HF encoder folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--index", default="flat", choices=("flat", "ivf", "hnsw"), help="faiss index kind")
    p.add_argument("--namespace", default="default", help="tenant of the chunk keys")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest", help="ingest files and folders (.txt .md .html .pdf .jsonl)", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (walked recursively)")
    add_retriever_args(p)
    p.add_argument("--chunk-min", type=int, default=256, help="minimum chunk length in model tokens")
    p.add_argument("--chunk-max", type=int, default=512, help="maximum chunk length in model tokens")
    p.add_argument("--overlap", type=int, default=0, help="tokens repeated from the previous chunk")
    p.add_argument("--max-document-mb", type=float, default=20.0, help="larger documents are refused")
    p.add_argument("--no-kv", action="store_true", help="only catalog and index; KV is computed on first use")
    p.add_argument(
        "--batch-tokens", type=int, default=2048, help="chunk tokens per precompute batch (stored as it goes)"
    )
    p.add_argument(
        "--pass-tokens", type=int, default=2048, help="tokens per prepacked forward pass (0: one chunk each)"
    )
    p.add_argument("--remove", nargs="+", default=[], metavar="DOC_ID", help="delete these documents first")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.paths and not args.remove:
        raise ValueError("nothing to do: give PATH... to ingest and/or --remove DOC_ID...")
    ingest_cfg = IngestConfig(
        compute_kv=not args.no_kv,
        kv_batch_tokens=args.batch_tokens,
        max_tokens_per_pass=args.pass_tokens,
        progress=not args.quiet,
    )
    engine = open_engine(args)
    removed = engine.remove_documents(args.remove) if args.remove else ()
    report = engine.ingest(args.paths, config=ingest_cfg) if args.paths else None
    engine.close()
    if args.json:
        out = asdict(report) if report else {}
        out["invalidated"] = [str(k) for k in (report.invalidated if report else ())]
        out["removed_keys"] = [str(k) for k in removed]
        print(json.dumps(out, indent=2))
    else:
        if removed or args.remove:
            print(f"removed {len(args.remove)} documents; {len(removed)} chunk keys invalidated")
        if report:
            for err in report.errors:
                print(f"error: {err}", file=sys.stderr)
            print(report.summary())
    return 1 if report and report.errors else 0


def open_engine(args: argparse.Namespace):
    """The Engine over DATA_DIR that these options describe (its store's disk tier keeps the KV)."""
    from ..engine.engine import Engine

    config = EngineConfig.from_env(
        model=args.model,
        data_dir=args.data_dir,
        catalog_url=args.catalog_url,
        namespace=args.namespace,
        retriever=retriever_config(args),
    )
    return Engine.from_pretrained(config=config)


def retriever_config(args: argparse.Namespace) -> RetrieverConfig:
    """The RetrieverConfig the command line asks for (chunking options only where the command has them)."""
    chunking = (
        dict(
            chunk_min_tokens=args.chunk_min,
            chunk_max_tokens=args.chunk_max,
            overlap_tokens=args.overlap,
            max_document_bytes=int(args.max_document_mb * (1 << 20)),
        )
        if hasattr(args, "chunk_min")
        else {}
    )
    return RetrieverConfig(embedder_path=args.embedder, index_kind=args.index, namespace=args.namespace, **chunking)
