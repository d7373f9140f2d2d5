"""The `full` strategy as the model's own transformers forward: the honest no-reuse baseline.

The layer-by-layer blend loop can also compute every token, but the model's own forward is what a
user without ragkv runs, so `full` is exactly that: one `model.model(ids)` call, the first-token
logits from the last hidden state, and the KV read out of its cache into buffers with room to decode.
"""

from __future__ import annotations

import time

import torch

from ..blend import BlendPlan
from ..blend.loop import BlendResult
from ..models import ModelAdapter, synchronize


@torch.inference_mode()
def full_prefill(model: ModelAdapter, plan: BlendPlan, reserve: int = 0) -> BlendResult:
    """Every prompt token computed by the model's forward; K/V buffers keep `reserve` spare rows."""
    n, dev = plan.num_tokens, model.device
    if model.max_context is not None and n > model.max_context:
        raise ValueError(f"prompt of {n} tokens exceeds the model's exact attention span of {model.max_context}")
    t0 = time.perf_counter()
    out = model.model.model(plan.input_ids[None].to(dev), use_cache=True)
    cache = getattr(out, "cache", None)  # transformers >= 5.2x; `past_key_values` before
    buffers = []
    for layer in (cache if cache is not None else out.past_key_values).layers:  # keys/values [1, H_kv, N, D]
        k_all = torch.empty(*layer.keys.shape[:2], n + reserve, layer.keys.shape[3], dtype=model.dtype, device=dev)
        v_all = torch.empty_like(k_all)
        k_all[:, :, :n], v_all[:, :, :n] = layer.keys, layer.values
        buffers.append((k_all, v_all))
    synchronize(dev)
    t1 = time.perf_counter()
    logits = model.model.lm_head(out.last_hidden_state[0, -1:]).float()[0]  # [vocab]; the state is normed
    synchronize(dev)
    seconds = {"load": 0.0, "rerotate": 0.0, "recompute": t1 - t0, "first_token": time.perf_counter() - t1}
    return BlendResult(buffers, logits, recompute_fraction=1.0, num_tokens=n, seconds=seconds)
