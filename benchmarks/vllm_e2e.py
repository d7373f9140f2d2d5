"""End to end with vLLM: ragkv in proxy mode in front of a `vllm serve` that loads ragkv's fused KV
through `RagkvConnector` (start vLLM with benchmarks/vllm_e2e.sh, which then runs this script).

Per RAG prompt (question + K chunks of a MuSiQue sample, chunks already cached in ragkv's store):
1. ragkv's own answer: `Engine.generate` (fusion + ragkv's decode), the first `--max-tokens` greedy ids,
   with the answer guard off: vLLM decodes the fused KV as it is, so the two must agree token for token;
2. vLLM + ragkv: a streamed chat request to the proxy (the app of `ragkv serve --upstream`, served by
   uvicorn in this process over the same Engine, so the chunk KV is computed once); TTFT is measured
   by the client to the first streamed text; vLLM's `prompt_tokens_by_source` metric says how many
   prompt tokens it computed itself (1 = only the last) and how many came from the connector;
3. vLLM alone: the same prompt token ids straight to vLLM's /v1/completions (no entry: full prefill);
4. fallback: an unreadable file where the entry would be, the same ids to vLLM: it must prefill
   every token itself and answer exactly as in 3.
Prints a table and writes JSON (--out).
    python benchmarks/vllm_e2e.py --vllm http://127.0.0.1:8311 --prompts 3 --chunks 4
The data defaults to ../shared/data/cacheblend/musique_s.json beside the repository.
`--check` makes it exit non-zero unless every fused prompt had vLLM compute exactly its last token, the
greedy tokens equal ragkv's, and every fallback prefilled fully and answered as vLLM alone (CI's smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from ragkv.engine.config import EngineConfig
from ragkv.engine.engine import Engine
from ragkv.eval.datasets import load_samples
from ragkv.eval.shared_data import shared_data
from ragkv.models import load_adapter
from ragkv.server.app import create_app
from ragkv.server.settings import load_settings
from ragkv.server.upstream import Upstream, fused_store_of
from ragkv.storage import MemoryTier, TieredStore

REPO = Path(__file__).resolve().parents[1]


def vllm_sources(url: str) -> dict[str, float]:
    """vLLM's prompt tokens by source so far (local_compute, local_cache_hit, external_kv_transfer)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total"):
            out[line.split('source="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def delta(before: dict, after: dict) -> dict[str, int]:
    return {k: int(after[k] - before.get(k, 0.0)) for k in after}


def stream_sse(url: str, body: dict, timeout: float = 1800.0):
    """(seconds to the first text piece, the JSON events) of a streamed POST."""
    t0, first, events = time.perf_counter(), None, []
    with httpx.stream("POST", url, json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            events.append(ev)
            for c in ev.get("choices") or []:
                if first is None and ((c.get("delta") or {}).get("content") or c.get("text")):
                    first = time.perf_counter() - t0
    return first, events


def vllm_direct(url: str, model: str, ids: list[int], max_tokens: int) -> tuple[float, list[int], dict]:
    before = vllm_sources(url)
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    ttft, events = stream_sse(f"{url}/v1/completions", {**body, "return_token_ids": True})
    tokens = [t for ev in events for c in ev.get("choices") or [] for t in c.get("token_ids") or []]
    return ttft, tokens, delta(before, vllm_sources(url))


def summarize(rows: list[dict], chunks: int) -> dict:
    """Counts against the targets and median TTFTs (written after every prompt, so a cut-short run keeps them)."""
    if not rows:
        return {"prompts": 0}
    return {
        "prompts": len(rows),
        "chunks": chunks,
        "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rows),
        "median_proxy_ttft_ms": statistics.median(r["proxy_ttft_ms"] for r in rows),
        "median_vllm_alone_ttft_ms": statistics.median(r["vllm_alone_ttft_ms"] for r in rows),
        "median_ttft_speedup": statistics.median(r["vllm_alone_ttft_ms"] / r["proxy_ttft_ms"] for r in rows),
        "only_last_token_computed": sum(r["vllm_computed_fused"] == 1 for r in rows),
        "first_tokens_equal_ragkv": sum(r["first_tokens_equal_ragkv"] for r in rows),
        "first_tokens_equal_vllm_alone": sum(r["first_tokens_equal_vllm_alone"] for r in rows),
        "fallback_full_prefill": sum(r["fallback_computed"] == r["prompt_tokens"] for r in rows),
        "fallback_wrong_answers": sum(not r["fallback_equals_alone"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", default="http://127.0.0.1:8311", help="vLLM base URL (started with RagkvConnector)")
    ap.add_argument("--model", default="smollm2", help="vLLM's served model name")
    ap.add_argument("--fused-dir", default="/dev/shm/ragkv-fused", help="the connector's fused_dir")
    ap.add_argument(
        "--data",
        default=str(shared_data("cacheblend", "musique_s.json")),
        help="MuSiQue samples (default: the shared data setting)",
    )
    ap.add_argument("--handoff", default="auto", choices=["auto", "shm", "file"], help="ragkv's hand-off path")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every prompt met the targets")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=8312, help="port of the ragkv proxy started here")
    ap.add_argument("--out", default="results-vllm-e2e.json")
    args = ap.parse_args()

    import uvicorn

    config = EngineConfig(max_new_tokens=args.max_tokens)
    model = load_adapter("smollm2", data_dir=config.data_dir)  # the weights `vllm serve` runs too
    engine = Engine(model, TieredStore([MemoryTier(8 << 30)]), config)  # RAM only: nothing of this run is kept
    store = fused_store_of(args.fused_dir, args.handoff)
    scratch = tempfile.TemporaryDirectory(prefix="ragkv-vllm-e2e-")  # nothing of this run is kept
    settings = load_settings(data_dir=scratch.name)
    app = create_app(settings, engine, upstream=Upstream(args.vllm, store, model=args.model))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    proxy = f"http://127.0.0.1:{args.port}"
    while not server.started:
        time.sleep(0.1)

    rows = []
    for s in load_samples(args.data, "musique", limit=args.prompts):
        docs = list(s.chunks[: args.chunks])
        chunk_ids = engine.tokenize_chunks(docs)
        engine.ensure_cached(chunk_ids)  # the chunks are cached before anything is timed
        ids = engine.plan(s.question, chunk_ids).input_ids.tolist()
        # no answer guard: vLLM decodes the handed-over fused KV unguarded, so compare with the same KV
        own = engine.generate(s.question, docs, max_new_tokens=args.max_tokens, answer_guard=0.0)

        before = vllm_sources(args.vllm)
        chat = {"messages": [{"role": "user", "content": s.question}], "documents": docs}
        ttft_fused, events = stream_sse(
            f"{proxy}/v1/chat/completions", {**chat, "max_tokens": args.max_tokens, "stream": True}
        )
        fused_src = delta(before, vllm_sources(args.vllm))
        info = events[-1]["ragkv"]
        fused_tokens = info["upstream"]["completion_token_ids"]

        ttft_alone, alone_tokens, alone_src = vllm_direct(args.vllm, args.model, ids, args.max_tokens)

        store.root.mkdir(parents=True, exist_ok=True)
        store.path(ids).write_bytes(b"not a fused record")  # an unreadable entry: must be a miss
        _, fallback_tokens, fallback_src = vllm_direct(args.vllm, args.model, ids, args.max_tokens)
        store.remove(ids)

        n = args.max_tokens
        row = {
            "id": s.id,
            "prompt_tokens": len(ids),
            "ragkv_ttft_ms": round(own.ttft_ms, 1),
            "proxy_ttft_ms": round(ttft_fused * 1e3, 1),
            "proxy_parts_ms": {k: round(v, 1) for k, v in info["parts_ms"].items()},
            "handoff": info["upstream"]["handoff"],
            "loadavg_1m": round(os.getloadavg()[0], 1),
            "vllm_alone_ttft_ms": round(ttft_alone * 1e3, 1),
            "vllm_computed_fused": fused_src.get("local_compute"),
            "vllm_loaded_fused": fused_src.get("external_kv_transfer"),
            "vllm_computed_alone": alone_src.get("local_compute"),
            "first_tokens_equal_ragkv": fused_tokens[:n] == own.token_ids[:n],
            "first_tokens_equal_vllm_alone": fused_tokens[:n] == alone_tokens[:n],
            "fallback_computed": fallback_src.get("local_compute"),
            "fallback_equals_alone": fallback_tokens == alone_tokens,
            "tokens": {"ragkv": own.token_ids, "vllm_fused": fused_tokens, "vllm_alone": alone_tokens},
        }
        rows.append(row)
        Path(args.out).write_text(json.dumps({"summary": summarize(rows, args.chunks), "rows": rows}, indent=1))
        print(
            f"{s.id[:14]:14s} N={len(ids):5d} proxy TTFT {row['proxy_ttft_ms']:8.0f} ms  vLLM alone "
            f"{row['vllm_alone_ttft_ms']:8.0f} ms  vLLM computed {row['vllm_computed_fused']}/{len(ids)}  "
            f"=ragkv {row['first_tokens_equal_ragkv']}  fallback computed {row['fallback_computed']} "
            f"=alone {row['fallback_equals_alone']}",
            flush=True,
        )
    server.should_exit = True

    summary = summarize(rows, args.chunks)
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    if args.check:
        n = len(rows)
        ok = n > 0 and (
            summary["only_last_token_computed"] == n
            and summary["first_tokens_equal_ragkv"] == n
            and summary["fallback_full_prefill"] == n
            and summary["fallback_wrong_answers"] == 0
        )
        print(f"vllm e2e check: {'PASSED' if ok else 'FAILED'} ({n} prompts)", flush=True)
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
