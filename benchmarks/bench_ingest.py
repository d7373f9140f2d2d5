"""Ingestion-throughput benchmark: chunk KV precompute one chunk per pass vs prepacked passes.

Modes: `one-by-one` (max_tokens_per_pass=0), `packed-mask` (prepacked, one attention over the pass
with a block-diagonal [T, T] mask: the first prepacked path) and `packed-varlen` (prepacked, one
causal attention per chunk: what `ModelAdapter.forward_kv` does now). Modes are interleaved and
repeated; the table shows the median tokens/s.
`python benchmarks/bench_ingest.py --chunk-tokens 64,256 --out results.json`
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
from ragkv.models import load_adapter


class _Masked:
    """The adapter with the previous prepacked path: one attention over the whole pass with a
    block-diagonal [T, T] mask (for the `packed-mask` mode; same math as `forward_kv`)."""

    def __init__(self, adapter) -> None:
        self.a = adapter
        self.fingerprint, self.tokenizer_fingerprint = adapter.fingerprint, adapter.tokenizer_fingerprint
        self.sink_ids = adapter.sink_ids

    @torch.inference_mode()
    def forward_kv(
        self, ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        a, t = self.a, ids.shape[0]
        mask = None
        if segments is not None:
            idx = torch.arange(t, device=a.device)
            seg = segments.to(a.device)
            mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])  # [T, T]
        kv = torch.empty(2, a.num_layers, t, a.num_kv_heads, a.head_dim, dtype=a.dtype, device=a.device)
        h = a.embed(ids)  # [T, hidden]
        cos, sin = a.rope(positions)
        for layer in range(a.num_layers):
            q, k, v = a.qkv(layer, h, cos, sin)
            kv[0, layer], kv[1, layer] = k, v
            o = a._sdpa(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask
            )  # [1, H_q, T, D]
            block = a.layers[layer]
            h = h + block.self_attn.o_proj(o[0].transpose(0, 1).reshape(t, -1))
            h = h + block.mlp(block.post_attention_layernorm(h))
        return kv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_ingest.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default="~/.cache/ragkv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-tokens", default="64,256", help="comma-separated chunk lengths")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per measurement (chunks = tokens / length)")
    p.add_argument("--pass-tokens", type=int, default=2048, help="prepacking budget per forward pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="one-by-one,packed-mask,packed-varlen")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="results-ingest-throughput.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    adapter = load_adapter(args.model, data_dir=args.data_dir, device=args.device)
    masked = _Masked(adapter)
    modes = args.modes.split(",")
    vocab = adapter.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    print(
        f"{args.model} on {args.device} ({torch.get_num_threads()} threads), pass budget {args.pass_tokens} tokens, "
        f"median of {args.repeats}",
        flush=True,
    )
    print(f"{'chunk tok':>9} {'chunks':>6} {'mode':<14} {'tok/s':>8} {'best':>8} {'x one-by-one':>12}", flush=True)
    for length in map(int, args.chunk_tokens.split(",")):
        chunks = [
            torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(max(1, args.tokens // length))
        ]
        n_tok = sum(map(len, chunks))
        runs = {
            "one-by-one": lambda: precompute_many(adapter, chunks, max_tokens_per_pass=0),
            "packed-mask": lambda: precompute_many(masked, chunks, max_tokens_per_pass=args.pass_tokens),
            "packed-varlen": lambda: precompute_many(adapter, chunks, max_tokens_per_pass=args.pass_tokens),
        }
        precompute_many(adapter, chunks[:2], max_tokens_per_pass=args.pass_tokens)  # warm-up
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
        pass_tokens=args.pass_tokens,
        machine=platform.processor() or platform.machine(),
        rows=rows,
    )
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
