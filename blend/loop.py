"""The one blend loop: fuse cached chunk KV into one prompt (`blend`) or several at once (`blend_many`),
layer by layer.

Per layer, for each prompt (its `PromptState`): load the cached rows (its `LayerBuffers`: read lazily by a
`LayerLoader`, or read back when the scout pass loaded them) and
re-rotate their keys to the target positions; then for the active tokens of all prompts packed
together: q/k/v; each prompt narrows its active set at its own check layers (CacheBlend) and writes
its fresh K/V over its cached rows, and its active tokens attend over its keys with a causal mask by
position; the output projection and MLP run on the packed rows again. Each prompt's last token is
always active, so its logits come out at the end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..chunk_cache import LayeredKV
from ..models import ModelAdapter, synchronize
from .plan import BlendPlan
from .prompt_state import PromptState
from .strategies import Strategy


@dataclass
class BlendResult:
    """Merged KV of the whole prompt, the first-token logits, and where the time went."""

    buffers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer K, V [1, H_kv, N + reserve, D]: room to decode
    logits: torch.Tensor  # [vocab] fp32, for the token after the prompt
    recompute_fraction: float  # chunk rows recomputed / chunk rows, averaged over layers
    num_tokens: int  # N: prompt rows filled in every buffer
    seconds: dict[str, float] = field(default_factory=dict)  # load, rerotate, recompute, first_token
    chunk_decisions: list = field(default_factory=list)  # per chunk, the strategy's decision (cachecraft)
    recovered: int = 0  # chunks whose stored KV failed mid-blend and were recomputed (blend/recover.py)

    def prompt_kv(self, num_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) views [1, H_kv, n, D] of the first `num_tokens` rows (the prompt's N by default)."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return [(k[:, :, :n], v[:, :, :n]) for k, v in self.buffers]


@torch.inference_mode()
def blend(
    model: ModelAdapter,
    plan: BlendPlan,
    strategy: Strategy,
    sources: Sequence[tuple[int, LayeredKV]] = (),
    *,
    reserve: int = 0,
    attention: str = "auto",
) -> BlendResult:
    """Fuse `sources` (target start row, cached KV) into `plan` with `strategy`; the K/V buffers keep
    `reserve` spare rows so that tokens can be generated after the prompt without copying (`extend`).
    `attention` picks how selected queries attend (`models.attention.MASK_KINDS`; auto: SDPA blocks on
    CPU, FlexAttention on CUDA)."""
    t_start = time.perf_counter()
    state = PromptState(model, plan, strategy, sources, reserve=reserve, attention=attention)
    return blend_many(model, [state], started=t_start)[0]


@torch.inference_mode()
def blend_many(
    model: ModelAdapter, states: Sequence[PromptState], *, started: float | None = None
) -> list[BlendResult]:
    """Fuse several prompts (each a `PromptState`: its plan, strategy, sources and reserve) in one pass
    per layer: the active rows of every prompt packed into one matrix for the q/k/v projections, the
    output projection, the MLP and the LM head; each prompt's check layers narrow its own rows, and its
    queries attend over its own K/V buffers with its own mask. Each result is what `blend` gives that
    prompt alone, up to the rounding of the packed matrix products; `seconds` are the pass's (shared)."""
    t_start = time.perf_counter() if started is None else started
    dev = model.device
    clock = _Clock(dev)
    sizes = [s.size for s in states]
    h = _cat([s.embed() for s in states])  # [sum S, hidden]
    cos, sin = _cat([s.cos_a for s in states]), _cat([s.sin_a for s in states])  # [sum S, D]
    for layer in range(model.num_layers):
        for s in states:  # each prompt's own buffers, its cached rows re-rotated in
            s.load_layer(layer, clock)
        q, k, v = model.qkv(layer, h, cos, sin)  # [sum S, H_q, D], [sum S, H_kv, D] x2
        if any(layer in s.check_layers for s in states):  # each prompt narrows its own rows
            kept = [s.narrow(layer, *(_rows(x, sizes, i) for x in (q, k, v))) for i, s in enumerate(states)]
            offsets = [sum(sizes[:i]) for i in range(len(states))]
            keep = _cat(
                [torch.arange(o, o + n, device=dev) if x is None else x + o for x, o, n in zip(kept, offsets, sizes)]
            )
            h, q, k, v, cos, sin = (x[keep] for x in (h, q, k, v, cos, sin))
            sizes = [s.size for s in states]
        outs = []
        for i, s in enumerate(states):
            s.write(_rows(k, sizes, i), _rows(v, sizes, i))
            outs.append(s.attention(_rows(q, sizes, i)))
        h = model.after_attention(layer, h, _cat(outs))
        clock.lap("recompute")
    last = torch.tensor(sizes, device=dev).cumsum(0) - 1  # each prompt's last row: always active
    logits = model.logits(h[last])  # [B, vocab]
    clock.lap("first_token")
    synchronize(dev)
    seconds = clock.seconds()  # load, rerotate, recompute, first_token
    seconds["total"] = time.perf_counter() - t_start
    return [
        BlendResult(
            s.buffers, logits[i], s.recompute_fraction, s.num_tokens, dict(seconds), s.strategy.decisions(), s.recovered
        )
        for i, s in enumerate(states)
    ]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rows(x: torch.Tensor, sizes: Sequence[int], i: int) -> torch.Tensor:
    """Prompt `i`'s rows of a packed tensor whose prompts hold `sizes` rows each."""
    start = sum(sizes[:i])
    return x[start : start + sizes[i]]


class _Clock:
    """Time per part of the loop: the host clock on CPU; on CUDA, events on the compute stream (device
    time, so a load shows only what the copies failed to hide), read once after the final sync."""

    PARTS = ("load", "rerotate", "recompute", "first_token")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(self.PARTS, 0.0)
        self.laps: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.last = self._now()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, part: str) -> None:
        """Charge the time since the previous lap to `part`."""
        now = self._now()
        if self.cuda:
            self.laps.append((part, self.last, now))
        else:
            self.totals[part] += now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        for part, start, end in self.laps:  # every event has completed: the caller synchronized
            self.totals[part] += start.elapsed_time(end) / 1e3
        self.laps = []
        return dict(self.totals)
