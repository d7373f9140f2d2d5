"""Per-token costs for the trace replay's simulated TTFT, measured once on this machine with the loaded
model (or read from a `--costs` JSON written by an earlier run).

- prefill ms/token: the model's own forward (`model(ids, logits_to_keep=1)`, as eval's `hf` baseline)
  over `tokens` prompt tokens, median of `repeats` after one warm-up, divided by `tokens`;
- load ms/token per tier: put one chunk's real KV (`forward_kv`) into a tier, then `get` it and copy
  every layer out (what the blend loop does with cached rows), median of `repeats`, divided by its
  tokens, after one discarded round over every tier (the first reads of a process ran 100-600x slower
  here). `gpu` is a `MemoryTier` on the model's device, `cpu` a `MemoryTier` in host memory (on a
  CPU-only machine both are host RAM, so they measure the same path), `disk` a `DiskTier` with lz4
  (the default disk codec) in a temporary directory, read back from the OS page cache;
- full_layer_share: cacheblend's layers before its first check layer over the model's layers.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..blend.config import BlendConfig
from ..chunk_cache import ChunkKey, ChunkKV
from ..engine.engine import Engine
from ..models import synchronize
from ..storage.disk import DiskTier
from ..storage.memory import MemoryTier
from .trace_replay import TraceCosts


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


@torch.inference_mode()
def measure_costs(
    engine: Engine, token_ids: Sequence[int], tokens: int = 1024, chunk_tokens: int = 256, repeats: int = 3
) -> TraceCosts:
    """Measure the replay's per-token costs with `engine`'s model on the ids `token_ids` (cycled)."""
    model = engine.model
    device = model.device
    ids = torch.tensor([token_ids[i % len(token_ids)] for i in range(tokens)], device=device)
    prefill_ms = _median_ms(lambda: model.model(ids[None], logits_to_keep=1), repeats, device)
    chunk = ids[:chunk_tokens]
    kv = ChunkKV(model.forward_kv(chunk, torch.arange(chunk_tokens, device=device)).cpu(), pos0=0)
    key = ChunkKey.of("trace-costs", "trace-costs", chunk.tolist(), "trace-costs")
    loads = {}
    with tempfile.TemporaryDirectory(prefix="ragkv-trace-costs-") as tmp:
        tiers = {
            "gpu": MemoryTier(4 * kv.nbytes, device=device),
            "cpu": MemoryTier(4 * kv.nbytes, device="cpu"),
            "disk": DiskTier(Path(tmp) / "disk", 4 * kv.nbytes, codec="lz4"),
        }
        for tier in tiers.values():
            tier.put(key, kv)
        for _ in range(2):  # the first round is a warm-up
            for name, tier in tiers.items():

                def load(tier=tier):
                    layered = tier.get(key, device=device)
                    for layer in range(layered.num_layers):
                        layered.layer(layer).to(device, copy=True)

                loads[name] = _median_ms(load, repeats, device) / chunk_tokens
        for tier in tiers.values():
            tier.close()
    share = BlendConfig().check_layers[0] / model.num_layers
    source = f"measured: {model.num_layers}-layer model on {device}, {tokens}-token prefill, {chunk_tokens}-token chunk"
    return TraceCosts(prefill_ms / tokens, loads, share, source)


def load_costs(path: str | Path) -> TraceCosts:
    """Costs from a JSON file: {"prefill_ms_per_token", "load_ms_per_token": {tier: ms}, "full_layer_share"},
    or an earlier `ragkv eval --trace` report (its "costs")."""
    data = json.loads(Path(path).read_text())
    data = data.get("costs", data)
    return TraceCosts.from_dict(data, source=f"file {path} ({data.get('source', 'given')})")
