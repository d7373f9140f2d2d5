"""Does chunk KV that saw other passages fuse better? (issue 21, item 5; FusionRAG's premise)

Per sample, each chunk's KV is computed (fp32, here) after the prompt's fixed prefix, as the default
stores it, and then after the prefix plus `k` other passages:
- `prev-k`: the `k` passages that precede it in this prompt (what a Cache-Craft variant of a recurring
  combination holds; with k >= its index the KV is the full prefill's rows: an upper bound);
- `near-k`: the `k` other passages of the same prompt nearest to it by embedding, the nearest last
  (FusionRAG's offline neighbours, here drawn from the retrieved set itself, independent of prompt order);
- `pool-k`: the `k` passages nearest to it by embedding among the passages of every sample loaded (a
  corpus: FusionRAG's offline neighbours as ingestion would find them, related or not to this prompt);
- `other-k`: the same `k` passages of another question before every chunk (text unrelated to this
  prompt: does the gain need related text, or only some passage before the chunk?).
The first chunk is exact in every kind (the plan marks it so). Each kind is fused with naive and the
default focus; same answer / agree prefix / kl_mean / top-1 against the full prefill's greedy answer.

    python experiments/chunk_neighbours.py --limit 8 --cache /tmp/refs --out chunk_neighbours.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from answer_turns import add_sample_args, engine_and_samples, reference
from shared_prefix import fidelity, report, tally

from ragkv.blend import BlendConfig, make_strategy
from ragkv.chunk_cache import ChunkKV, precompute, precompute_many
from ragkv.eval.datasets import load_samples
from ragkv.eval.runner import sample_chunks
from ragkv.retriever.config import RetrieverConfig
from ragkv.retriever.embedder import search_embedder

STRATEGIES = (("naive", "naive", 0.0), ("focus", "focus", 0.15))


def after(engine, plan, chunk: int, context: list[int]) -> ChunkKV:
    """Chunk `chunk`'s KV computed after the prompt prefix, then `context` (token ids)."""
    start, end = plan.chunk_spans[chunk]
    ids = plan.input_ids[start:end].tolist()
    return precompute(engine.model, ids, lead_in=list(plan.prefix_ids) + context)


def kinds(engine, embedder, plan, chunks, texts, ks, foreign, pool, only):
    """(label, sources) per chunk-KV kind in `only`; sources are (target start row, KV) for every chunk,
    the first chunk's always its KV after the prefix (exact)."""
    spans = [s for s, _ in plan.chunk_spans]
    ids = plan.input_ids.tolist()
    base = precompute_many(engine.model, chunks, lead_in=plan.prefix_ids)
    yield "prefix", list(zip(spans, base))
    vectors = embedder.embed(texts)  # [C, dim], unit norm
    sim = vectors @ vectors.T

    def each(context_of):
        return list(zip(spans, [base[0]] + [after(engine, plan, i, context_of(i)) for i in range(1, len(chunks))]))

    def nearest(scores, exclude, candidates, k):  # the k best, nearest last (right before the chunk)
        return [candidates[j] for j in np.argsort(-scores, kind="stable") if not exclude(j)][:k][::-1]

    for k in ks:
        if "prev" in only:
            yield f"prev-{k}", each(lambda i: ids[plan.chunk_spans[max(0, i - k)][0] : spans[i]])
        if "near" in only:
            yield f"near-{k}", each(lambda i: [t for c in nearest(sim[i], lambda j: j == i, chunks, k) for t in c])
        if "pool" in only:
            scores = [pool["vectors"] @ vectors[i] for i in range(len(chunks))]
            pool_near = [
                nearest(scores[i], lambda j, i=i: pool["chunks"][j] == chunks[i], pool["chunks"], k)
                for i in range(len(chunks))
            ]
            yield f"pool-{k}", each(lambda i: [t for c in pool_near[i] for t in c])
        if "other" in only:
            yield f"other-{k}", each(lambda i: [t for c in foreign[:k] for t in c])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sample_args(ap, limit=8)
    ap.add_argument("--ks", default="2")
    ap.add_argument("--out", default="chunk_neighbours.json")
    ap.add_argument("--pool", type=int, default=0, help="samples whose passages form pool-k's corpus (0: those run)")
    ap.add_argument("--kinds", default="prev,near,pool,other", help="which of prev, near, pool, other to run")
    args = ap.parse_args()
    engine, samples = engine_and_samples(args)
    embedder = search_embedder(RetrieverConfig())
    ks = [int(k) for k in args.ks.split(",")]
    corpus = load_samples(args.data, args.format, args.pool) if args.pool and not args.demo else samples
    every = [[list(c) for c in s.chunk_ids] if s.chunk_ids else engine.tokenize_chunks(s.chunks) for s in corpus]
    pool_chunks = list({tuple(c): c for cs in every for c in cs}.values())
    pool = {"chunks": pool_chunks, "vectors": embedder.embed([engine.tokenizer.decode(c) for c in pool_chunks])}
    rows, totals = [], {}
    for n, sample in enumerate(samples):
        other = samples[(n + 1) % len(samples)]
        foreign = sample_chunks(engine, other)
        chunks = sample_chunks(engine, sample)
        texts = [engine.tokenizer.decode(c) for c in chunks]
        plan = engine.plan(sample.question, chunks)
        ref = reference(engine, plan, args.new_tokens, args.cache)
        row = {"id": sample.id, "prompt_tokens": plan.num_tokens}
        for kind, sources in kinds(engine, embedder, plan, chunks, texts, ks, foreign, pool, args.kinds):
            for label, name, ratio in STRATEGIES:
                m = fidelity(engine, plan, make_strategy(name, ratio, BlendConfig()), sources, ref, args.new_tokens)
                row[f"{kind} {label}"] = m
                tally(totals, f"{'prefix' if kind == 'prefix' else 'prefix+' + kind} {label}", m)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report(rows, totals, args)


if __name__ == "__main__":
    main()
