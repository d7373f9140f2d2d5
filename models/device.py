"""Waiting for a device: host clocks around device work only measure it after a synchronize."""

from __future__ import annotations

import torch


def synchronize(device: torch.device | str) -> None:
    """Block until the work queued on `device` is done (a no-op on the CPU, which runs in order)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
