"""Retrieval-quality benchmark: recall@1/5/10 of the gold passage, faiss exact vs IVF vs HNSW, and with
`--pg-url` pgvector's HNSW inside PostgreSQL (plus its top-10 overlap with faiss exact search).

Pools every passage of the Lost-in-the-Middle NQ-Open oracle file (one gold passage per question;
the other questions' passages are the distractors), embeds passages ("title\\ntext") and questions
with the configured encoder, and searches each index kind. Prints a table, writes JSON.
    python benchmarks/bench_retrieval.py --data PATH/nq-open-oracle.jsonl.gz --out results-retrieval.json \
        [--pg-url "$(cat .ci/pg_url)"]     # PostgreSQL with pgvector, e.g. from .ci/postgres.sh
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from ragkv.retriever.config import RetrieverConfig
from ragkv.retriever.embedder import HFEmbedder
from ragkv.retriever.index import VectorIndex
from ragkv.retriever.pgvector_index import TABLE, PgVectorIndex

KS = (1, 5, 10)


def load_nq(path: str | Path, limit: int = 0) -> tuple[list[str], list[str], list[int]]:
    """(questions, distinct passages, index of each question's gold passage)."""
    questions, passages, gold, seen = [], [], [], {}
    with gzip.open(path, "rt") as f:
        for line in f:
            rec = json.loads(line)
            ctx = next(c for c in rec["ctxs"] if c.get("isgold", True))
            text = f"{ctx['title']}\n{ctx['text']}"
            if text not in seen:
                seen[text] = len(passages)
                passages.append(text)
            questions.append(rec["question"])
            gold.append(seen[text])
            if limit and len(questions) >= limit:
                break
    return questions, passages, gold


def recall(ids: np.ndarray, gold: list[int]) -> dict[str, float]:
    """recall@k for KS from result ids [Q, >=10]."""
    hit_rank = [(list(row).index(g) if g in row else 10**9) for row, g in zip(ids, gold)]
    return {f"recall@{k}": float(np.mean([r < k for r in hit_rank])) for k in KS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_retrieval.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="nq-open-oracle.jsonl.gz")
    p.add_argument("--limit", type=int, default=0, help="only the first N questions (0 = all)")
    p.add_argument("--embedder", default=None, help="local HF encoder folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache", default=None, help="reuse / save the embeddings in this .npz")
    p.add_argument("--out", default="results-retrieval.json")
    p.add_argument(
        "--pg-url", default=None, help="also pgvector in this PostgreSQL (its ragkv_chunk_vectors is replaced)"
    )
    args = p.parse_args(argv)

    questions, passages, gold = load_nq(args.data, args.limit)
    cache = Path(args.cache) if args.cache else None
    t_embed = 0.0
    if cache and cache.exists():
        z = np.load(cache)
        pvec, qvec = z["passages"], z["questions"]  # [P, dim], [Q, dim]
    else:
        emb = HFEmbedder(args.embedder, batch_size=args.batch_size)
        t = time.perf_counter()
        pvec, qvec = emb.embed(passages), emb.embed(questions)  # [P, dim], [Q, dim]
        t_embed = time.perf_counter() - t
        if cache:
            np.savez(cache, passages=pvec, questions=qvec)
    ids = np.arange(len(passages), dtype=np.int64)
    rows = []
    kinds = [
        ("flat", RetrieverConfig()),
        ("ivf", RetrieverConfig(index_kind="ivf", ivf_nprobe=8)),
        ("ivf", RetrieverConfig(index_kind="ivf", ivf_nprobe=32)),
        ("hnsw", RetrieverConfig(index_kind="hnsw", hnsw_ef_search=16)),
        ("hnsw", RetrieverConfig(index_kind="hnsw", hnsw_ef_search=64)),
    ]
    flat = VectorIndex(pvec.shape[1])
    flat.build(ids, pvec)
    _, exact = flat.search(qvec, 10)  # [Q, 10]: what every approximate index is compared with
    pg = sa.create_engine(args.pg_url) if args.pg_url else None
    if pg is not None:
        kinds += [("pgvector", RetrieverConfig(hnsw_ef_search=ef)) for ef in (40, 100)]
    for kind, cfg in kinds:
        if kind == "pgvector":
            with pg.begin() as conn:
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {TABLE}"))
            index = PgVectorIndex.open(pg, pvec.shape[1], cfg)
            if index is None:
                raise SystemExit(f"--pg-url {pg.url.render_as_string(hide_password=True)}: no pgvector extension")
        else:
            index = VectorIndex(pvec.shape[1], cfg)
        t = time.perf_counter()
        index.build(ids, pvec)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        _, found = index.search(qvec, 10)  # [Q, 10]
        t_search = time.perf_counter() - t
        rows.append(
            dict(
                index=index.built_kind,
                params=index.describe().split(" ", 1)[1],
                **recall(found, gold),
                overlap_with_exact_at_10=round(
                    float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])), 4
                ),
                build_s=round(t_build, 3),
                search_ms_per_query=round(1000 * t_search / len(questions), 4),
            )
        )
    result = dict(
        dataset=str(args.data),
        questions=len(questions),
        passages=len(passages),
        embedder=args.embedder or "all-MiniLM-L6-v2",
        embed_seconds=round(t_embed, 1),
        rows=rows,
    )
    print(
        f"{len(questions)} questions, {len(passages)} pooled passages, embedder {result['embedder']}"
        + (f", embedding {t_embed:.0f}s" if t_embed else "")
    )
    print(
        f"{'index':<14} {'params':<34} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'=exact':>6} {'build s':>8} {'ms/query':>9}"
    )
    for r in rows:
        print(
            f"{r['index']:<14} {r['params']:<34} {r['recall@1']:6.3f} {r['recall@5']:6.3f} {r['recall@10']:6.3f} "
            f"{r['overlap_with_exact_at_10']:6.3f} {r['build_s']:8.3f} {r['search_ms_per_query']:9.4f}"
        )
    if pg is not None:
        with pg.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {TABLE}"))
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
