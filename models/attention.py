"""Attention masks built once per request and reused in every layer.

A `QueryMask` lets T queries at sorted prompt positions attend causally by position over N keys
(key j at position j); it is built once per active set (at the start of a blend and after each check
layer), never per layer, so no layer has to read positions back to the host. Three forms, one
result: `BlockedMask` (queries split into up to 8 blocks, each reading keys only up to its last
position: little masked-out work on CPU, but one SDPA call per block), `DenseMask` (one SDPA call
with one boolean mask [T, N]) and `FlexMask` (FlexAttention with a block mask: skips fully masked
key blocks; compiled on CUDA, eager reference on CPU). `Segments` packs independent causal
sequences side by side (prepacked precompute): one variable-length flash call on CUDA in fp16/bf16,
one SDPA call per sequence elsewhere.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F

MASK_KINDS = ("auto", "blocks", "dense", "flex")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None):
    """[1, H_q, T, D] over [1, H_kv, N, D]; causal (top-left aligned) when no mask is given."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)


class QueryMask(ABC):
    """Queries at sorted positions attend keys 0..position; `attend` maps [1, H_q, T, D] -> same."""

    num_queries: int

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [1, H_q, T, D] over k, v [1, H_kv, N, D] -> [1, H_q, T, D]."""


class BlockedMask(QueryMask):
    """Up to 8 contiguous blocks of queries; block b reads keys 0..(its last position) with its own mask.
    Needs the positions on the host (built once per active set, so one read-back per set, not per layer)."""

    def __init__(self, positions: torch.Tensor, device: torch.device, max_blocks: int = 8) -> None:
        host = positions.cpu()  # [T]
        t = host.shape[0]
        self.num_queries = t
        self.blocks: list[tuple[int, int, int, torch.Tensor]] = []  # start, end, key count, mask [t_b, keys]
        edges = torch.arange(t).tensor_split(max(1, min(max_blocks, t // 64)))
        for idx in edges:
            a, b = int(idx[0]), int(idx[-1]) + 1
            keys = int(host[b - 1]) + 1
            mask = torch.arange(keys)[None, :] <= host[a:b, None]  # [t_b, keys]
            self.blocks.append((a, b, keys, mask.to(device)))

    def attend(self, q, k, v, scale):
        out = [sdpa(q[:, :, a:b], k[:, :, :keys], v[:, :, :keys], scale, mask) for a, b, keys, mask in self.blocks]
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)  # [1, H_q, T, D]


class DenseMask(QueryMask):
    """One SDPA call with one boolean mask [T, N] (built on the device: no host read-back)."""

    def __init__(self, positions: torch.Tensor, num_keys: int, device: torch.device) -> None:
        pos = positions.to(device)
        self.num_queries = pos.shape[0]
        self.num_keys = num_keys
        self.mask = torch.arange(num_keys, device=device)[None, :] <= pos[:, None]  # [T, N]

    def attend(self, q, k, v, scale):
        return sdpa(q, k[:, :, : self.num_keys], v[:, :, : self.num_keys], scale, self.mask)


_COMPILED_FLEX = None


def _flex_attention(device: torch.device):
    """FlexAttention: compiled on CUDA (fast kernels, dynamic shapes), the eager reference elsewhere."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


FLEX_MIN_QUERIES = 128  # `auto` below this: one dense mask [T, N] is small, and FlexAttention's compile of
# a sub-block query count failed on an H200 (torch 2.11: Inductor found no kernel for 32 queries)
FLEX_FAILURE: str | None = None  # why FlexAttention failed in this process (then `auto` uses dense masks)


class FlexMask(QueryMask):
    """FlexAttention with a block mask over the sorted query positions: fully masked key blocks are
    skipped, so the work is about what the causal mask keeps. The block mask is built on the device.
    With `fallback` (what `auto` asks for), a failure to compile or run FlexAttention is reported once
    (a warning, and `FLEX_FAILURE`) and the attention is computed with one dense mask instead."""

    def __init__(self, positions: torch.Tensor, num_keys: int, device: torch.device, fallback: bool = False) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        pos = positions.to(device)
        self.num_queries = pos.shape[0]
        self.num_keys = num_keys
        self.positions, self.device, self.fallback = pos, device, fallback

        pad = -pos.shape[0] % 128  # padded query blocks may index past T: give them the last position
        padded = torch.cat([pos, pos[-1:].expand(pad)]) if pad else pos

        def causal_by_position(b, h, q_idx, kv_idx):
            return kv_idx <= padded[q_idx]

        self.block_mask = create_block_mask(
            causal_by_position, None, None, self.num_queries, num_keys, device=device, _compile=device.type == "cuda"
        )
        self._flex = _flex_attention(device)

    def attend(self, q, k, v, scale):
        n = self.num_keys
        if not self.fallback:
            return self._flex(q, k[:, :, :n], v[:, :, :n], block_mask=self.block_mask, scale=scale, enable_gqa=True)
        try:
            return self._flex(q, k[:, :, :n], v[:, :, :n], block_mask=self.block_mask, scale=scale, enable_gqa=True)
        except Exception as exc:  # a compiler or kernel failure: report it once, then stay correct
            _flex_failed(exc)
            return DenseMask(self.positions, n, self.device).attend(q, k, v, scale)


def _flex_failed(exc: Exception) -> None:
    global FLEX_FAILURE
    if FLEX_FAILURE is None:
        FLEX_FAILURE = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"FlexAttention failed ({FLEX_FAILURE}); attention='auto' uses one dense mask from now on", stacklevel=3
        )


def query_mask(positions: torch.Tensor, num_keys: int, device: torch.device, kind: str = "auto") -> QueryMask:
    """The mask for queries at sorted `positions` [T] over `num_keys` keys. `auto`: blocks on CPU (fastest
    there), FlexAttention on CUDA from `FLEX_MIN_QUERIES` queries (else, or if FlexAttention failed in this
    process, one dense mask). Unknown
    kinds fail naming the accepted ones."""
    device = torch.device(device)
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown attention mask kind {kind!r}; accepted: {', '.join(MASK_KINDS)}")
    if kind == "auto" and device.type == "cuda" and FLEX_FAILURE is None and positions.numel() >= FLEX_MIN_QUERIES:
        try:
            return FlexMask(positions, num_keys, device, fallback=True)
        except Exception as exc:  # building the block mask failed: report once, use dense masks
            _flex_failed(exc)
    if kind == "auto":
        kind = "dense" if device.type == "cuda" else "blocks"
    if kind == "blocks":
        return BlockedMask(positions, device)
    if kind == "dense":
        return DenseMask(positions, num_keys, device)
    return FlexMask(positions, num_keys, device)


VARLEN_FAILURE: str | None = None  # why variable-length attention failed in this process


class Segments:
    """Independent causal sequences packed side by side: [start, end) spans of one packed pass."""

    def __init__(self, spans: Sequence[tuple[int, int]], device: torch.device) -> None:
        self.spans = list(spans)
        self.max_len = max(e - s for s, e in self.spans)
        edges = [self.spans[0][0], *(e for _, e in self.spans)]
        self.cu_seq = torch.tensor(edges, dtype=torch.int32, device=device)  # [num_seq + 1]

    @classmethod
    def from_ids(cls, segments: torch.Tensor, device: torch.device) -> Segments:
        """From per-token segment ids [T] (contiguous runs)."""
        change = (segments[1:] != segments[:-1]).nonzero().flatten() + 1  # segment boundaries
        edges = [0, *change.tolist(), segments.shape[0]]
        return cls(list(zip(edges[:-1], edges[1:])), device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [1, H_q, T, D] over k, v [1, H_kv, T, D] of the same packed tokens -> [1, H_q, T, D]."""
        global VARLEN_FAILURE
        if varlen_available(q) and VARLEN_FAILURE is None:
            from torch.nn.attention.varlen import varlen_attn

            qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D]
            cu, m = self.cu_seq, self.max_len
            try:
                if kt.shape[1] != qt.shape[1]:  # GQA by repeating K/V heads (torch 2.11's varlen has no enable_gqa)
                    groups = qt.shape[1] // kt.shape[1]
                    kt, vt = kt.repeat_interleave(groups, dim=1), vt.repeat_interleave(groups, dim=1)
                out = varlen_attn(qt, kt, vt, cu, cu, m, m, scale=scale, window_size=(-1, 0))
                return out.transpose(0, 1)[None]  # [1, H_q, T, D]
            except Exception as exc:  # no flash kernel for this card or build: report once, loop instead
                VARLEN_FAILURE = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"variable-length attention failed ({VARLEN_FAILURE}); packed passes attend per sequence",
                    stacklevel=3,
                )
        return torch.cat([sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], scale) for s, e in self.spans], dim=2)


def varlen_available(q: torch.Tensor) -> bool:
    """Variable-length flash attention runs on CUDA in fp16/bf16 only (torch >= 2.9)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True
