"""Attention masks built once per request and reused in every layer.

A `QueryMask` lets T queries at sorted prompt positions attend causally by position over N keys
(key j at position j); it is built once per active set (at the start of a blend and after each check
layer), never per layer, so no layer has to read positions back to the host. Three forms, one
result: `BlockedMask` (queries split into up to 8 blocks, each reading keys only up to its last
position: little masked-out work on CPU, but one SDPA call per block), `DenseMask` (one SDPA call
with one boolean mask [T, N]) and `FlexMask` (FlexAttention with a block mask: skips fully masked
key blocks; compiled on CUDA, eager reference on CPU). `Segments` packs independent causal
sequences side by side (prepacked precompute), each optionally after a shared past (the lead-in,
computed once): one variable-length flash call on CUDA in fp16/bf16, one SDPA call per sequence elsewhere.
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
FLEX_BUCKET_MIN = 128  # FlexAttention's block size: no bucket is smaller
FLEX_BUCKETS_PER_OCTAVE = 4  # bucket sizes grow by 2**(1/4): at most 19% padding, 4 compiles per doubling
FLEX_RECOMPILE_LIMIT = 64  # compiled shapes kept (torch's default of 8 would fall back to eager after 8 buckets)
FLEX_SHAPES: set[tuple[int, int]] = set()  # (query bucket, key bucket) pairs run in this process


def flex_bucket(n: int) -> int:
    """The padded size FlexAttention is compiled for when it sees `n` queries or keys: the smallest
    multiple of 128 on the grid 128 * 2**(i / 4) (rounded up to 128) that holds `n`. Every shape in a
    bucket shares one static compile, so a run's figures do not depend on which prompt ran first."""
    if n < 1:
        raise ValueError(f"a bucket holds at least 1 row, got {n}")
    i = 0
    while True:
        size = -(-int(FLEX_BUCKET_MIN * 2 ** (i / FLEX_BUCKETS_PER_OCTAVE)) // FLEX_BUCKET_MIN) * FLEX_BUCKET_MIN
        if size >= n:
            return size
        i += 1


def _flex_attention(device: torch.device):
    """FlexAttention: compiled on CUDA for static shapes (one kernel per bucket pair, `flex_bucket`), the
    eager reference elsewhere."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # the name differs across torch versions
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), FLEX_RECOMPILE_LIMIT))
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


FLEX_MIN_QUERIES = 128  # `auto` below this: one dense mask [T, N] is small, and FlexAttention's compile of
# a sub-block query count failed on an H200 (torch 2.11: Inductor found no kernel for 32 queries)
FLEX_FAILURE: str | None = None  # why FlexAttention failed in this process (then `auto` uses dense masks)


class FlexMask(QueryMask):
    """FlexAttention with a block mask over the sorted query positions: fully masked key blocks are
    skipped, so the work is about what the causal mask keeps. Queries and keys are padded to their
    `flex_bucket` (pad queries take the last position, pad keys are zeros past every position, so masked
    off), so FlexAttention is compiled once per bucket pair, never for another prompt's shape. The block
    mask is built on the device. With `fallback` (what `auto` asks for), a failure to compile or run
    FlexAttention is reported once (a warning, and `FLEX_FAILURE`) and one dense mask is used instead."""

    def __init__(self, positions: torch.Tensor, num_keys: int, device: torch.device, fallback: bool = False) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        pos = positions.to(device)
        self.num_queries = pos.shape[0]
        self.num_keys = num_keys
        self.positions, self.device, self.fallback = pos, device, fallback
        self.shape = (flex_bucket(self.num_queries), flex_bucket(num_keys))  # what FlexAttention runs
        pad = self.shape[0] - self.num_queries  # padded queries attend like the last one; their rows are dropped
        padded = torch.cat([pos, pos[-1:].expand(pad)]) if pad else pos

        def causal_by_position(b, h, q_idx, kv_idx):
            return kv_idx <= padded[q_idx]  # keys past the last position (the pad) are never attended

        self.block_mask = create_block_mask(
            causal_by_position, None, None, *self.shape, device=device, _compile=device.type == "cuda"
        )
        self._flex = _flex_attention(device)
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None  # zero-padded K, V reused across layers

    def _padded(self, q, k, v):
        """q, k, v at the bucket's shape: q's extra rows repeat its last one, k and v get zero rows."""
        tq, nk = self.shape
        n = self.num_keys
        if q.shape[2] != tq:
            q = torch.cat([q, q[:, :, -1:].expand(-1, -1, tq - q.shape[2], -1)], dim=2)
        if nk == n:
            return q, k[:, :, :n], v[:, :, :n]
        if self._keys is None or self._keys[0].shape[1] != k.shape[1] or self._keys[0].dtype != k.dtype:
            self._keys = tuple(k.new_zeros(k.shape[0], k.shape[1], nk, k.shape[3]) for _ in range(2))
        kp, vp = self._keys
        kp[:, :, :n].copy_(k[:, :, :n])
        vp[:, :, :n].copy_(v[:, :, :n])
        return q, kp, vp

    def _run(self, q, k, v, scale):
        FLEX_SHAPES.add(self.shape)
        qp, kp, vp = self._padded(q, k, v)
        out = self._flex(qp, kp, vp, block_mask=self.block_mask, scale=scale, enable_gqa=True)
        return out[:, :, : self.num_queries]

    def attend(self, q, k, v, scale):
        if not self.fallback:
            return self._run(q, k, v, scale)
        try:
            return self._run(q, k, v, scale)
        except Exception as exc:  # a compiler or kernel failure: report it once, then stay correct
            _flex_failed(exc)
            return DenseMask(self.positions, self.num_keys, self.device).attend(q, k, v, scale)


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
    """Independent causal sequences packed side by side: [start, end) spans of one packed pass, each
    optionally after a shared past of `past` keys (a prompt template's lead-in computed once): query i of
    a span then sees every past key and its own span's keys up to i, and `attend` takes keys and values
    [1, H_kv, past + T, D] (the past's rows first, then the packed tokens')."""

    def __init__(self, spans: Sequence[tuple[int, int]], device: torch.device, past: int = 0) -> None:
        self.spans = list(spans)
        self.past = past
        self.max_len = max(e - s for s, e in self.spans)
        edges = [self.spans[0][0], *(e for _, e in self.spans)]
        self.cu_seq = torch.tensor(edges, dtype=torch.int32, device=device)  # [num_seq + 1]
        key_edges = [0, *(past + e - s for s, e in self.spans)]
        self.cu_seq_k = torch.tensor(key_edges, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        self.key_rows = None  # with a past, each span's keys for varlen: the past's rows, then its own
        if past:
            rows = [torch.cat([torch.arange(past), torch.arange(past + s, past + e)]) for s, e in self.spans]
            self.key_rows = torch.cat(rows).to(device)  # [num_seq * past + T]
        self._masks: dict[int, torch.Tensor] = {}  # span length -> [len, past + len], built in the first layer

    @classmethod
    def from_ids(cls, segments: torch.Tensor, device: torch.device, past: int = 0) -> Segments:
        """From per-token segment ids [T] (contiguous runs)."""
        change = (segments[1:] != segments[:-1]).nonzero().flatten() + 1  # segment boundaries
        edges = [0, *change.tolist(), segments.shape[0]]
        return cls(list(zip(edges[:-1], edges[1:])), device, past)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [1, H_q, T, D] over k, v [1, H_kv, past + T, D] (the past, then the same packed tokens) ->
        [1, H_q, T, D]."""
        global VARLEN_FAILURE
        if varlen_available(q) and VARLEN_FAILURE is None:
            from torch.nn.attention.varlen import varlen_attn

            qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D], keys [past + T, H, D]
            if self.key_rows is not None:  # each span's keys: the past repeated, then its own rows
                kt, vt = kt.index_select(0, self.key_rows), vt.index_select(0, self.key_rows)
            try:
                if kt.shape[1] != qt.shape[1]:  # GQA by repeating K/V heads (torch 2.11's varlen has no enable_gqa)
                    groups = qt.shape[1] // kt.shape[1]
                    kt, vt = kt.repeat_interleave(groups, dim=1), vt.repeat_interleave(groups, dim=1)
                # flash's causal window is aligned bottom-right: a span's query i sees keys 0 .. past + i
                m = self.max_len
                out = varlen_attn(
                    qt, kt, vt, self.cu_seq, self.cu_seq_k, m, m + self.past, scale=scale, window_size=(-1, 0)
                )
                return out.transpose(0, 1)[None]  # [1, H_q, T, D]
            except Exception as exc:  # no flash kernel for this card or build: report once, loop instead
                VARLEN_FAILURE = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"variable-length attention failed ({VARLEN_FAILURE}); packed passes attend per sequence",
                    stacklevel=3,
                )
        p = self.past
        if not p:
            return torch.cat([sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], scale) for s, e in self.spans], dim=2)
        out = []
        for s, e in self.spans:
            keys, values = (torch.cat([x[:, :, :p], x[:, :, p + s : p + e]], dim=2) for x in (k, v))
            out.append(sdpa(q[:, :, s:e], keys, values, scale, self._mask(e - s, q.device)))
        return torch.cat(out, dim=2)

    def _mask(self, length: int, device: torch.device) -> torch.Tensor:
        """[length, past + length]: query i (at position past + i) sees every past key and its span's
        keys 0..i: `DenseMask`'s mask over those positions."""
        if length not in self._masks:
            positions = torch.arange(self.past, self.past + length, device=device)
            self._masks[length] = DenseMask(positions, self.past + length, device).mask
        return self._masks[length]


def varlen_available(q: torch.Tensor) -> bool:
    """Variable-length flash attention runs on CUDA in fp16/bf16 only (torch >= 2.9)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True
