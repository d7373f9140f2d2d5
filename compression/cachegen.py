"""cachegen: a CacheGen-style (Liu et al., SIGCOMM'24) lossy entropy codec for chunk KV.

Per layer: each K/V channel is quantized on a uniform grid. CacheGen sizes a channel's step as
`6 * std / bins` (bins over +-3 std); here the K channels, and the V channels, share one step per
layer of the same geometric mean (capped at 3 std), since the loud key channels are where queries
look; bins are set per band of layers and separately for K and V. Channels whose values move
slowly over tokens are coded as integer deltas against their group's anchor token (every
`group_size`-th token), the others centred on their median; the symbols are entropy coded (ANS,
`constriction`) with one distribution per (K/V, channel group). Element error <= step / 2;
decoding after the entropy stage is torch arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .entropy import decode_stream, encode_stream
from .identity import tensor_bytes, tensor_from
from .layered import LayeredCodec
from .quant import check_finite

_STEP_MIN, _STEP_MAX = 2.0**-14, 6.0e4  # steps are stored as fp16 normals
_DELTA_GAIN = 0.85  # delta-code a channel when its mean |delta| is below this share of mean |value - centre|


@dataclass(frozen=True)
class CacheGenConfig:
    """Knobs of the cachegen codec (stored with each entry, so changing them never breaks old entries).

    Bins are given per equal band of layers, early first, separately for keys and values. The defaults
    were measured on SmolLM2-135M under cacheblend@0.15 (`experiments/codec_allocation.py`, see
    docs/BENCHMARKS.md): errors in K alone add ~6x the KL that errors in V alone add, and among the
    five bands of six layers the fourth (18-23) hurts most, the last hardly at all; at the same ~1.95
    bits/value a K-heavy schedule shaped so had about a third of the KL excess of CacheGen's equal
    K/V, early-layers-first (6, 5, 4) (with per-channel steps). Steps are one per layer for K and for V
    (exponents 0), not per channel: on 4 held-out prompts that took kl_mean from 2.84x to 1.83x of uncompressed at
    ~1.92 bits/value (`experiments/key_steps.py`)."""

    group_size: int = 10  # tokens per anchor group; 1 disables delta coding
    key_bins: tuple[int, ...] = (6, 6, 7, 9, 9, 4)  # bins over +-3 std for K, per equal band of layers
    value_bins: tuple[int, ...] = (3, 3, 4, 4, 4, 2)  # the same for V
    channel_group: int = 64  # channels sharing one symbol distribution
    key_step_exponent: float = 0.0  # K steps ~ std_c ** this within a layer (1: per-channel std, as CacheGen)
    value_step_exponent: float = 0.0  # the same for V

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.channel_group < 1:
            raise ValueError(f"group_size and channel_group must be >= 1, got {self.group_size}, {self.channel_group}")
        for name in ("key_step_exponent", "value_step_exponent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("key_bins", "value_bins"):
            bins = getattr(self, name)
            if not bins or min(bins) < 1:
                raise ValueError(f"{name} must be a non-empty tuple of ints >= 1, got {bins}")

    @staticmethod
    def _band(bins: tuple[int, ...], layer: int, num_layers: int) -> int:
        return bins[min(layer * len(bins) // num_layers, len(bins) - 1)]

    def bins(self, layer: int, num_layers: int) -> tuple[int, int]:
        """(K bins, V bins) of `layer` (layers split into len(bins) equal bands)."""
        return self._band(self.key_bins, layer, num_layers), self._band(self.value_bins, layer, num_layers)


def quant_steps(
    x: torch.Tensor, bins: tuple[int, int], key_step_exponent: float = 1.0, value_step_exponent: float = 1.0
) -> torch.Tensor:
    """Grid steps [2, C] fp16 for one layer's values x [2, T, C], K in row 0 and V in row 1.

    Per row, steps proportional to std_c ** exponent with the same geometric mean as 6 std_c / bins
    (about the same bits), capped at 3 std_c (at least 2 bins); exponent 1 is CacheGen's per-channel
    6 std_c / bins. A key error e_c moves an attention logit by q_c * e_c, and the loud key channels
    are the ones queries weight most: exponent 0 (one step per layer) gives them relatively finer
    steps. Constant channels get their absmax as the step."""
    std = x.std(dim=1, unbiased=False)  # [2, C]
    per_kv = torch.tensor(bins, dtype=x.dtype)[:, None]  # [2, 1]
    step = 6.0 * std / per_kv  # [2, C]
    for row, exponent in enumerate((key_step_exponent, value_step_exponent)):
        live = std[row] > 0
        if exponent != 1.0 and bool(live.any()):
            shape = std[row, live].pow(exponent)  # [C_live]
            common = shape * torch.exp(step[row, live].log().mean() - shape.log().mean())  # geometric mean kept
            step[row, live] = torch.minimum(common, 3.0 * std[row, live])
    step = torch.where(std > 0, step, x.abs().amax(dim=1))  # [2, C]
    return step.clamp(_STEP_MIN, _STEP_MAX).half()  # [2, C]: the decoder uses exactly these


def _anchor_index(t: int, group_size: int) -> torch.Tensor:
    """For each token, the index of its group's anchor token: [T]."""
    return torch.arange(t) // group_size * group_size  # [T]


class CacheGenCodec(LayeredCodec):
    """Anchor-delta + layer-wise quantization + per-(layer, K/V, channel group) ANS coding."""

    name = "cachegen"
    lossless = False
    parallel_decode = True  # the ANS decoder holds the GIL: layers decode in parallel only in processes

    def __init__(self, config: CacheGenConfig | None = None) -> None:
        self.config = config or CacheGenConfig()

    @property
    def rel_error(self) -> float:
        """Stated bound on ||x - x'|| / ||x||: uniform rounding noise of step / sqrt(12) per element,
        relative to a channel RMS >= std; steps are 6 std / bins with exponent 1, else at most 3 std."""
        cfg = self.config
        worst = [
            6.0 / min(bins) if exponent == 1.0 else 3.0  # the largest step / std of K, of V
            for bins, exponent in ((cfg.key_bins, cfg.key_step_exponent), (cfg.value_bins, cfg.value_step_exponent))
        ]
        return max(worst) / math.sqrt(12.0)

    def params(self) -> dict[str, Any]:
        return {
            **asdict(self.config),
            "key_bins": list(self.config.key_bins),
            "value_bins": list(self.config.value_bins),
        }

    # -- encode ----------------------------------------------------------------------------------------
    def encode_layer(self, layer_kv, layer, num_layers) -> bytes:
        check_finite(layer_kv, self.name)
        cfg = self.config
        t = layer_kv.shape[1]
        x = layer_kv.double().reshape(2, t, -1)  # [2, T, C]
        c = x.shape[2]
        step = quant_steps(x, cfg.bins(layer, num_layers), cfg.key_step_exponent, cfg.value_step_exponent)  # [2, C]
        q = torch.round(x / step.double()[:, None, :]).long()  # [2, T, C]
        centre = q.median(dim=1).values.clamp(-32768, 32767).short()  # [2, C]
        anchor = _anchor_index(t, cfg.group_size)
        is_delta_row = (torch.arange(t) != anchor)[None, :, None]  # [1, T, 1]
        delta = q - q[:, anchor]  # [2, T, C]
        centred = q - centre.long()[:, None, :]  # [2, T, C]
        rows = is_delta_row.expand(2, t, c)
        gain = delta.abs().double().mean(1) < _DELTA_GAIN * centred.abs().double().mean(1)  # [2, C]
        use_delta = gain & bool(is_delta_row.any())  # [2, C]
        sym = torch.where(rows & use_delta[:, None, :], delta, centred)  # [2, T, C]
        parts = [tensor_bytes(step), tensor_bytes(centre), np.packbits(use_delta.numpy()).tobytes()]
        sym_np = sym.numpy()
        for kv in range(2):
            for g in range(0, c, cfg.channel_group):
                parts.append(encode_stream(sym_np[kv, :, g : g + cfg.channel_group].reshape(-1)))
        return b"".join(parts)

    # -- decode ----------------------------------------------------------------------------------------
    def decode_section(self, section, params, shape, stored, layer, num_layers, device) -> torch.Tensor:
        t, h, d = shape
        c = h * d
        cg = int(params["channel_group"])
        buf = memoryview(section)
        step = tensor_from(buf[: 4 * c], torch.float16, (2, c))  # [2, C]
        centre = tensor_from(buf[4 * c : 8 * c], torch.int16, (2, c))  # [2, C]
        flag_bytes = (2 * c + 7) // 8
        flags = np.unpackbits(np.frombuffer(buf, np.uint8, flag_bytes, 8 * c))[: 2 * c]
        use_delta = torch.from_numpy(flags.astype(bool)).view(2, c)  # [2, C]
        sym = np.empty((2, t, c), dtype=np.float32)  # [2, T, C]: symbols cast once, as they land
        pos = 8 * c + flag_bytes
        for kv in range(2):
            for g in range(0, c, cg):
                width = min(cg, c - g)
                block, pos = decode_stream(buf, pos, t * width)
                sym[kv, :, g : g + width] = block.reshape(t, width)
        if pos != len(section):
            raise ValueError(f"section has {len(section) - pos} trailing bytes after its streams")
        x = self._reconstruct(torch.from_numpy(sym), step, centre, use_delta, int(params["group_size"]), device, stored)
        return x.view(2, t, h, d)

    @staticmethod
    def _reconstruct(
        sym: torch.Tensor,
        step: torch.Tensor,
        centre: torch.Tensor,
        use_delta: torch.Tensor,
        group_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Symbols [2, T, C] float32 -> values [2, T, C] in `dtype` on `device`: undo centring / anchor
        deltas, scale.

        A centred channel is (sym + centre) * step; in a delta channel, a non-anchor token adds its
        anchor's sym (the anchor row itself is centred): three passes over the layer in all."""
        _, t, c = sym.shape
        x = sym.to(device)  # [2, T, C] float32
        if group_size > 1 and t > 1 and bool(use_delta.any()):
            g = group_size
            full = t // g * g  # tokens in whole groups
            gain = use_delta.to(device).float()[:, None, None, :]  # [2, 1, 1, C]
            if full:
                groups = x[:, :full].view(2, full // g, g, c)  # [2, G, g, C]
                groups[:, :, 1:] += groups[:, :, :1] * gain  # anchor is row 0 of each group
            if t - full > 1:
                x[:, full + 1 :] += x[:, full : full + 1] * gain[:, 0]  # the last, partial group
        step_f = step.to(device).float()[:, None, :]  # [2, 1, C]
        out = torch.empty(x.shape, dtype=dtype, device=x.device)  # [2, T, C]
        return torch.addcmul(centre.to(device).float()[:, None, :] * step_f, x, step_f, out=out)  # (x + centre) * step
