"""The measurement the codec studies share: a prompt's chunk KV, its full-prefill reference, and the
kl_mean / top-1 of cacheblend@0.15 when that chunk KV is replaced by a (decoded) copy.

kl_mean and top-1 are teacher-forced on the full prefill's greedy answer (16 tokens), as `ragkv eval`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ragkv.blend import blend, make_strategy
from ragkv.chunk_cache import ChunkKV, precompute_many
from ragkv.eval.metrics import kl_per_position, top1_agreement


@dataclass
class Prompt:
    """One sample ready to be blended: its plan, fp16 chunk KV and the full prefill's reference."""

    engine: object
    plan: object
    kvs: list[ChunkKV]  # fp16, as a tier stores them
    forced: torch.Tensor  # [16] the full prefill's greedy answer
    reference: torch.Tensor  # [16, vocab] its logits along that answer

    @classmethod
    def of(cls, engine, sample) -> Prompt:
        chunks = engine.tokenize_chunks(sample.chunks)
        plan = engine.plan(sample.question, chunks)
        kvs = [ChunkKV(kv.kv.half(), kv.pos0) for kv in precompute_many(engine.model, chunks)]
        full = blend(engine.model, plan, make_strategy("full"), [], reserve=16)
        forced = torch.tensor(list(engine.answer_ids(full, 16)) or [int(full.logits.argmax())])
        return cls(engine, plan, kvs, forced, engine.teacher_forced_logits(full, forced))

    def fidelity(self, kv_list: Sequence[ChunkKV], ratio: float = 0.15) -> tuple[float, float]:
        """(kl_mean, top1) of cacheblend@ratio over `kv_list` (one per chunk) against the full prefill."""
        sources = [(start, kv) for (start, _), kv in zip(self.plan.chunk_spans, kv_list)]
        result = blend(self.engine.model, self.plan, make_strategy("cacheblend", ratio), sources, reserve=16)
        logits = self.engine.teacher_forced_logits(result, self.forced)
        return float(kl_per_position(self.reference, logits).mean()), top1_agreement(self.reference, logits)


def report(rows: list[dict], out: str, **meta) -> dict:
    """Mean of every variant over `rows` ({"id", "uncompressed": {...}, variant: {...}}): printed as a
    table (bits/value and rel_error where measured) and written to `out` as JSON with `meta`."""
    labels = [k for k in rows[0] if k != "id"]
    mean = {k: {m: sum(r[k][m] for r in rows) / len(rows) for m in rows[0][k]} for k in labels}
    base = mean["uncompressed"]["kl_mean"]
    print("\n| variant | bits/value | rel_error | kl_mean | kl / uncompressed | top1 |\n|---|---|---|---|---|---|")
    for k, m in mean.items():
        bits = f"{m['bits']:.3f}" if "bits" in m else ""
        err = f"{m['rel_error']:.3f}" if "rel_error" in m else ""
        print(f"| {k} | {bits} | {err} | {m['kl_mean']:.4f} | {m['kl_mean'] / base:.2f}x | {m['top1']:.3f} |")
    with open(out, "w") as f:
        json.dump({**meta, "n": len(rows), "mean": mean, "rows": rows}, f, indent=1)
    return mean
