"""LayerBuffers: one prompt's K/V buffers, layer by layer, with its cached rows loaded and re-rotated in.

Both passes over a fused prompt need, at every layer, a buffer holding the cached chunk rows with their
keys re-rotated to their target rows: the scout pass (blend/scout.py, the question's attention before
the blend) and the blend loop (blend/loop.py). A `LayerBuffers` fills each layer's buffer once, in
layer order, from one `LayerLoader`: the scout fills the layers it runs, the blend reads those back
(its active rows overwrite the scout's fresh rows) and fills the rest. Each buffer has `reserve` spare
rows so that decoding appends to it without a copy. With `keep=False` (a scout whose buffers feed no
blend: the context pass) one buffer is reused layer after layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..chunk_cache import LayeredKV
from ..models import ModelAdapter
from .loader import LayerLoader
from .plan import BlendPlan
from .recover import recovering
from .rerotate import rerotate, rotation

Lap = Callable[[str], object]  # charges the time since the last lap to a part ("load", "rerotate", ...)


class LayerBuffers:
    """Per layer K, V [1, H_kv, N + reserve, D] of one prompt (N: `plan.num_tokens`), its cached rows
    loaded, filled on first request in layer order."""

    def __init__(
        self,
        model: ModelAdapter,
        plan: BlendPlan,
        sources: Sequence[tuple[int, LayeredKV]] = (),
        *,
        reserve: int = 0,
        keep: bool = True,
    ) -> None:
        n, dev = plan.num_tokens, model.device
        self.model, self.plan, self.reserve, self.keep = model, plan, reserve, keep
        self.sources = recovering(model, plan, sources)  # a stored layer found damaged here: that chunk recomputed
        self.cached = torch.zeros(n, dtype=torch.bool)  # [N] host: rows loaded from cache
        target_rows, deltas = [], []
        for start, kv in self.sources:
            if not (0 <= start and start + kv.num_tokens <= n):
                raise ValueError(
                    f"cached source at rows {start}..{start + kv.num_tokens - 1} lies outside the {n}-row plan"
                )
            self.cached[start : start + kv.num_tokens] = True
            target_rows.append(torch.arange(start, start + kv.num_tokens))  # [T]
            deltas.append(torch.full((kv.num_tokens,), start - kv.pos0))  # [T]
        if int(self.cached.sum()) != sum(kv.num_tokens for _, kv in self.sources):
            raise ValueError("cached sources must not overlap")
        self.spans = [(start, kv.num_tokens) for start, kv in self.sources]  # target rows per source, loader order
        self._loader = None
        if self.sources:
            self.rows_dev = torch.cat(target_rows).to(dev)  # [Nc] target row of each loaded row, loader order
            rot_cos, rot_sin = rotation(torch.cat(deltas), model.inv_freq)  # [Nc, D] each
            self.rot_cos, self.rot_sin = rot_cos.to(dev), rot_sin.to(dev)
            self._loader = iter(LayerLoader([kv for _, kv in self.sources], model.num_layers, dev, model.dtype))
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per filled layer (one reused without keep)
        self.filled = 0  # layers filled so far

    def layer(self, index: int, lap: Lap | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s K, V buffers [1, H_kv, N + reserve, D]: the one filled already, or the next
        layer's, allocated (`lap("recompute")`), loaded (`lap("load")`) and re-rotated (`lap("rerotate")`)."""
        lap = lap or _no_lap
        if index < self.filled:
            if not self.keep and index != self.filled - 1:
                raise ValueError(f"layer {index}'s buffer was reused (keep=False keeps only the last layer)")
            return self.buffers[index if self.keep else 0]
        if index != self.filled:
            raise ValueError(f"layers fill in order: layer {self.filled} comes before layer {index}")
        model, n = self.model, self.plan.num_tokens
        if self.keep or not self.buffers:
            k_all = torch.empty(
                1, model.num_kv_heads, n + self.reserve, model.head_dim, dtype=model.dtype, device=model.device
            )
            self.buffers.append((k_all, torch.empty_like(k_all)))
        k_all, v_all = self.buffers[-1]
        self.filled += 1
        lap("recompute")  # the buffers' allocation
        if self._loader is None:
            return k_all, v_all
        rows = next(self._loader)  # [2, Nc, H, D]
        lap("load")  # on CUDA: how long the compute stream waited for the side stream's copy
        k_buf, v_buf = k_all[0, :, :n], v_all[0, :, :n]  # [H, N, D] views
        if k_buf.is_cuda and _fused_rerotate(rows[0], k_buf):
            from .rerotate_triton import rerotate_into

            rerotate_into(k_buf, rows[0], self.rot_cos, self.rot_sin, self.rows_dev)  # one kernel
        else:
            rotated = rerotate(rows[0], self.rot_cos, self.rot_sin).to(model.dtype)  # [Nc, H, D]
            _scatter(k_buf, rotated, self.rows_dev, self.spans)
        _scatter(v_buf, rows[1], self.rows_dev, self.spans)
        lap("rerotate")
        return k_all, v_all


def _no_lap(part: str) -> None:
    return None


def _scatter(buf: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """Write loaded rows [Nc, H, D] into a layer buffer [H, N, D] at their target rows: one index_copy_
    on CUDA (one kernel), one slice copy per source on CPU (measured 2x faster there than index_copy_)."""
    if buf.is_cuda:
        buf.index_copy_(1, targets, rows.transpose(0, 1))
        return
    offset = 0
    for start, count in spans:
        buf[:, start : start + count] = rows[offset : offset + count].transpose(0, 1)
        offset += count


def _fused_rerotate(keys: torch.Tensor, k_buf: torch.Tensor) -> bool:
    """Whether the Triton re-rotation kernel runs (imported here, on CUDA only: under TRITON_INTERPRET
    the kernel module must be first imported after that variable is set)."""
    from .rerotate_triton import kernel_fits

    return kernel_fits(keys, k_buf)
