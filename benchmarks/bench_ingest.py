"""Ingestion-throughput benchmark: chunk KV precompute one chunk per pass vs prepacked passes.

Modes: `one-by-one` (max_tokens_per_pass=0) and `packed-varlen` (prepacked, one causal attention
per chunk: what `ModelAdapter.forward_kv` does). The earlier `packed-mask` mode (one attention over
the pass with a block-diagonal mask) was retired with its code; its figures stay in BENCHMARKS.md.
Modes are interleaved and repeated; the table shows the median tokens/s (chunk tokens: the lead-in is
not counted). `--lead-in template` computes every chunk after the default prompt template's fixed prefix,
as ingestion does by default (`chunk_context = "prefix"`); `sink` after the model's sink alone.
`python benchmarks/bench_ingest.py --chunk-tokens 64,256 --lead-in template --out results.json`
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ragkv.chunk_cache import precompute_many
from ragkv.engine.prompt import PromptTemplate
from ragkv.models import load_adapter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_ingest.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default="~/.cache/ragkv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-tokens", default="64,256", help="comma-separated chunk lengths")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per measurement (chunks = tokens / length)")
    p.add_argument("--pass-tokens", type=int, default=2048, help="prepacking budget per forward pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="one-by-one,packed-varlen", help="comma-separated: one-by-one, packed-varlen")
    p.add_argument("--lead-in", default="sink", choices=("sink", "template"), help="what chunks are computed after")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="results-ingest-throughput.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    adapter = load_adapter(args.model, data_dir=args.data_dir, device=args.device)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in ("one-by-one", "packed-varlen")]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; accepted: one-by-one, packed-varlen")
    lead_in = PromptTemplate().render(adapter.tokenizer, "")[0] if args.lead_in == "template" else None
    vocab = adapter.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    print(
        f"{args.model} on {args.device} ({torch.get_num_threads()} threads), pass budget {args.pass_tokens} tokens, "
        f"median of {args.repeats}, after the {args.lead_in} ({len(lead_in or adapter.sink_ids)} tokens)",
        flush=True,
    )
    print(f"{'chunk tok':>9} {'chunks':>6} {'mode':<14} {'tok/s':>8} {'best':>8} {'x one-by-one':>12}", flush=True)
    for length in map(int, args.chunk_tokens.split(",")):
        chunks = [
            torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(max(1, args.tokens // length))
        ]
        n_tok = sum(map(len, chunks))
        runs = {
            "one-by-one": lambda: precompute_many(adapter, chunks, 0, lead_in),
            "packed-varlen": lambda: precompute_many(adapter, chunks, args.pass_tokens, lead_in),
        }
        precompute_many(adapter, chunks[:2], args.pass_tokens, lead_in)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:  # interleaved, so a burst of load on the shared machine hits every mode
                t = time.perf_counter()
                runs[mode]()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t)
        base = n_tok / statistics.median(times[modes[0]])
        for mode in modes:
            rate = n_tok / statistics.median(times[mode])
            rows.append(
                dict(
                    chunk_tokens=length,
                    chunks=len(chunks),
                    mode=mode,
                    tokens_per_s=round(rate, 1),
                    best_tokens_per_s=round(n_tok / min(times[mode]), 1),
                    speedup_vs_first=round(rate / base, 3),
                    seconds=[round(x, 3) for x in times[mode]],
                )
            )
            r = rows[-1]
            print(
                f"{r['chunk_tokens']:>9} {r['chunks']:>6} {r['mode']:<14} {r['tokens_per_s']:>8.1f} "
                f"{r['best_tokens_per_s']:>8.1f} {r['speedup_vs_first']:>12.2f}",
                flush=True,
            )
    result = dict(
        model=args.model,
        device=args.device,
        threads=torch.get_num_threads(),
        lead_in=args.lead_in,
        lead_in_tokens=len(lead_in or adapter.sink_ids),
        pass_tokens=args.pass_tokens,
        machine=platform.processor() or platform.machine(),
        rows=rows,
    )
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
