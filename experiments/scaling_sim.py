"""Working set and hit rate of the RAGPulse trace against tier capacity, with the store's own eviction
policies (storage/policy.py: lru and cost/GDSF), for the KV sizes of 8B / 70B models: the figures
behind docs/SCALING.md.

    python experiments/scaling_sim.py --out docs/bench/scaling_sim.json

Replays every passage reference of the trace (`shared_data("ragpulse")`, read at run time) in time
order through one tier of a given byte capacity: a hit if the passage is held, else it is inserted
(evicting by the policy). Entry size = passage tokens x KV bytes per token of the model and codec.
The tier is eval/sim_store.py's `SimStore` (the one `ragkv eval --trace` replays through): the policy's
victim (lowest priority, then least recent) through a lazy heap instead of the store's linear scan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ragkv.eval.shared_data import shared_data
from ragkv.eval.sim_store import SimStore

RAGPULSE = shared_data("ragpulse")
# (layers, kv heads, head dim) of the KV cache; fp16 = 2 bytes per value, K and V
MODELS = {"llama-3.1-8b": (32, 8, 128), "llama-3.1-70b": (80, 8, 128), "smollm2-135m": (30, 3, 64)}
POLICIES = ("lru", "cost", "utility")  # storage/policy.py
CODEC_BITS = {"fp16": 16.0, "int8": 8.11, "cachegen": 1.92}  # bits per value (cachegen: measured, BENCHMARKS.md)


def kv_bytes_per_token(model: str, codec: str) -> float:
    layers, heads, dim = MODELS[model]
    return 2 * layers * heads * dim * CODEC_BITS[codec] / 8


def load_refs() -> tuple[list[int], dict[int, int]]:
    """Passage ids of every request in time order, and each passage's token length."""
    lengths = {}
    for line in open(RAGPULSE / "2_passages.jsonl"):
        if line.strip():
            r = json.loads(line)
            lengths[int(r["passage_id"])] = int(r["token_length"])
    rows = []
    for line in open(RAGPULSE / "0_trace.jsonl"):
        if line.strip():
            r = json.loads(line)
            rows.append((float(r["timestamp"]), r["hash_ids"].get("passages_ids") or []))
    rows.sort(key=lambda x: x[0])
    return [int(p) for _, ids in rows for p in ids], lengths


def simulate(refs: list[int], lengths: dict[int, int], capacity: float, bytes_per_token: float, policy: str) -> dict:
    """Hit rate (by reference and by token) of one tier of `capacity` bytes under `policy`."""
    store = SimStore([("tier", int(capacity // bytes_per_token))], policy)  # sizes in tokens: same order
    hits = hit_tokens = tokens = 0
    for pid in refs:
        n = lengths.get(pid, 256)
        tokens += n
        if pid in store:
            store.hit(pid)
            hits += 1
            hit_tokens += n
        else:
            store.put(pid, n, float(n))
    return {"hit_rate": hits / len(refs), "token_hit_rate": hit_tokens / tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="scaling_sim.json")
    args = p.parse_args(argv)
    refs, lengths = load_refs()
    distinct = sorted(set(refs))
    distinct_tokens = sum(lengths.get(p, 256) for p in distinct)
    out = {
        "references": len(refs),
        "distinct_passages": len(distinct),
        "distinct_tokens": distinct_tokens,
        "max_hit_rate": 1 - len(distinct) / len(refs),
        "kv_bytes_per_token": {f"{m}/{c}": kv_bytes_per_token(m, c) for m in MODELS for c in CODEC_BITS},
        "working_set_gib": {
            f"{m}/{c}": distinct_tokens * kv_bytes_per_token(m, c) / 2**30 for m in MODELS for c in CODEC_BITS
        },
        "curve": [],
    }
    bpt = kv_bytes_per_token("llama-3.1-8b", "fp16")
    for frac in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        cap = frac * distinct_tokens * bpt
        row = {"capacity_fraction": frac, "capacity_gib_8b_fp16": cap / 2**30}
        for policy in POLICIES:
            row[policy] = simulate(refs, lengths, cap, bpt, policy)
        out["curve"].append(row)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{len(refs)} references, {len(distinct)} distinct passages, {distinct_tokens} distinct tokens")
    print(f"upper bound (infinite cache) hit rate: {out['max_hit_rate']:.3f}")
    print("working set GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in out["working_set_gib"].items()))
    print(f"\n{'capacity':>9}{'GiB 8B fp16':>13}" + "".join(f"{p + ' hit':>12}{p + ' tok':>12}" for p in POLICIES))
    for r in out["curve"]:
        cells = "".join(f"{r[p]['hit_rate']:>12.3f}{r[p]['token_hit_rate']:>12.3f}" for p in POLICIES)
        print(f"{r['capacity_fraction']:>9.2f}{r['capacity_gib_8b_fp16']:>13.2f}" + cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
