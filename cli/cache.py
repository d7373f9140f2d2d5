"""`ragkv cache stats | gc`: inspect and tidy the chunk KV store of a data directory (or, for
`stats`, of a running sidecar with `--server URL`).

`gc` reconciles the disk tier (orphan and temp files, rows without a whole file) and, when asked,
drops entries of one namespace (`--namespace`) or entries no ingested document references
(`--unreferenced`, which also drops KV cached for ad-hoc documents). `--dry-run` only counts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from .options import add_settings_args, engine_config, settings_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="chunk KV store: `cache stats`, `cache gc`", description=__doc__)
    p.add_argument("action", choices=("stats", "gc"), help="stats: sizes and counters; gc: reconcile and drop entries")
    p.add_argument("--server", default=None, metavar="URL", help="stats of a running sidecar instead")
    p.add_argument("--api-key", default=None, help="bearer key for --server")
    p.add_argument("--namespace", default=None, help="gc: drop every entry of this namespace")
    p.add_argument("--unreferenced", action="store_true", help="gc: drop entries no ingested chunk references")
    p.add_argument("--dry-run", action="store_true", help="gc: count what would be dropped, drop nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_settings_args(p, namespace=False)  # --namespace here is gc's
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "stats" and args.server:
        from ..server.client import RagkvClient

        stats = RagkvClient(args.server, api_key=args.api_key).cache_stats()
        print(json.dumps(stats, indent=2) if args.json else _table(stats["store"]))
        return 0
    from ..storage.build import build_store

    config = engine_config(settings_of(args))  # the store only: no model is loaded
    read_only = args.action == "stats" or args.dry_run  # then the disk tier's opening check only counts
    store = build_store(replace(config.storage_config(), repair_on_open=not read_only))
    try:
        if args.action == "stats":
            stats = store.stats().to_dict()
            print(json.dumps(stats, indent=2) if args.json else _table(stats))
            return 0
        report = gc(store, Path(config.data_dir).expanduser(), args.namespace, args.unreferenced, args.dry_run)
        print(
            json.dumps(report, indent=2)
            if args.json
            else ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report.items())
        )
        return 0
    finally:
        store.close()


def gc(store, index_dir: Path, namespace: str | None, unreferenced: bool, dry_run: bool) -> dict:
    """Drop the entries `namespace` / `unreferenced` select; a report of what was (or would be) dropped."""
    from tqdm import tqdm

    checks = {t.name: vars(t.last_check) for t in store.tiers if getattr(t, "last_check", None) is not None}
    keys = sorted({k for t in store.tiers for k in t.keys()})
    referenced = _referenced_keys(index_dir) if unreferenced else set()
    drop = [
        k
        for k in keys
        if (namespace is not None and k.namespace == namespace) or (unreferenced and str(k) not in referenced)
    ]
    if not dry_run:
        for key in tqdm(drop, desc="dropping", unit="entry", disable=len(drop) < 100):
            store.remove(key)
        store.flush()
    return {
        "entries": len(keys),
        "dropped": 0 if dry_run else len(drop),
        "would_drop": len(drop) if dry_run else 0,
        "disk_check": checks,
    }


def _referenced_keys(index_dir: Path) -> set[str]:
    """Chunk keys of every namespace's catalog (`index_dir` and `index_dir/tenants/*`; none without a catalog)."""
    from ..retriever import Catalog

    keys: set[str] = set()
    for db in sorted([*index_dir.glob("catalog.sqlite"), *index_dir.glob("tenants/*/catalog.sqlite")]):
        catalog = Catalog(f"sqlite:///{db}")
        keys.update(catalog.chunk_keys())
        catalog.close()
    return keys


def _table(stats: dict) -> str:
    lines = [
        f"{'tier':8s} {'codec':10s} {'entries':>8s} {'MB':>10s} {'capacity MB':>12s} {'hits':>8s} "
        f"{'evictions':>9s} {'corrupt':>7s}"
    ]
    for t in stats["tiers"]:
        lines.append(
            f"{t['name']:8s} {t['codec']:10s} {t['entries']:8d} {t['bytes'] / 1e6:10.2f} "
            f"{t['capacity_bytes'] / 1e6:12.0f} {t['hits']:8d} {t['evictions']:9d} {t['corrupt']:7d}"
        )
    lines.append(
        f"misses {stats['misses']}, puts {stats['puts']}, promotions {stats['promotions']}, "
        f"demotions {stats['demotions']}, dropped {stats['dropped']}, write errors {stats['write_errors']}"
    )
    return "\n".join(lines)
