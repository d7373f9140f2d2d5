"""Exact RoPE re-rotation: keys computed at position p are moved to p + d by rotating them by d.

For RoPE kinds with fixed per-frequency angles, R(p + d) = R(d) R(p), so re-rotation is exact up to
fp32 rounding. Angles are computed in float64 and applied in fp32.
"""

from __future__ import annotations

import torch


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] (fp32, on `inv_freq`'s device) of rotating by `delta` [T] positions (any device);
    `inv_freq` is [D/2]."""
    angles = delta.to(inv_freq.device, torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [T, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [T, D]
    return angles.cos().float(), angles.sin().float()


def rerotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys [T, H, D] by per-token angles given as cos, sin [T, D]; computed in fp32."""
    k = keys.float()
    half = k.shape[-1] // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)  # [T, H, D]
    return k * cos[:, None, :] + rotated * sin[:, None, :]
