"""`ragkv ingest PATH... [--data-dir DIR]`: files and folders -> catalog + faiss index + chunk KV.

Re-running skips unchanged documents and cached KV; an interrupted run resumes. `--remove DOC_ID`
deletes documents (and the KV of chunks no other document uses). Exit status 1 if any file failed.
Settings: flags > `RAGKV_*` environment > `--config FILE` > defaults (see `ragkv config`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .options import add_settings_args, load_engine, settings_of

# the settings the retriever options of `ingest` and `retrieve` set (flag dests are the settings' names)
RETRIEVER_SETTINGS = ("catalog_url", "embedder_path", "index_kind")
CHUNKING_SETTINGS = ("chunk_min_tokens", "chunk_max_tokens", "overlap_tokens", "max_document_bytes")


def add_retriever_args(p: argparse.ArgumentParser, chunking: bool = False) -> None:
    """Options shared by `ingest` and `retrieve`: where the data lives and which model / index."""
    add_settings_args(p, RETRIEVER_SETTINGS + (CHUNKING_SETTINGS if chunking else ()))
    p.add_argument("--catalog-url", default=None, help="SQLAlchemy URL (default: sqlite:///DATA_DIR/catalog.sqlite)")
    p.add_argument(
        "--embedder",
        dest="embedder_path",
        default=None,
        help="local HF encoder folder (default: bundled all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--index",
        dest="index_kind",
        default=None,
        choices=("flat", "ivf", "hnsw"),
        help="faiss index kind (default flat)",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest", help="ingest files and folders (.txt .md .html .pdf .jsonl)", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (walked recursively)")
    add_retriever_args(p, chunking=True)
    p.add_argument(
        "--chunk-min",
        dest="chunk_min_tokens",
        type=int,
        default=None,
        help="minimum chunk length in model tokens (default 256)",
    )
    p.add_argument(
        "--chunk-max",
        dest="chunk_max_tokens",
        type=int,
        default=None,
        help="maximum chunk length in model tokens (default 512)",
    )
    p.add_argument(
        "--overlap",
        dest="overlap_tokens",
        type=int,
        default=None,
        help="tokens repeated from the previous chunk (default 0)",
    )
    p.add_argument(
        "--max-document-size",
        dest="max_document_bytes",
        default=None,
        metavar="SIZE",
        help="larger documents are refused (20MiB)",
    )
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
    missing = [p for p in args.paths if not Path(p).expanduser().exists()]
    if missing:  # before the model loads
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    from ..engine.ingest import IngestConfig

    ingest_cfg = IngestConfig(
        compute_kv=not args.no_kv,
        kv_batch_tokens=args.batch_tokens,
        max_tokens_per_pass=args.pass_tokens,
        progress=not args.quiet,
    )
    engine = open_engine(args, quiet=args.quiet or args.json)
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


def open_engine(args: argparse.Namespace, quiet: bool = False):
    """The Engine these options describe (its store's disk tier keeps the KV)."""
    return load_engine(settings_of(args), quiet)
