"""Stopwatch: consecutive named laps of one request, so that the parts of a TTFT always add up.

Every lap runs from the end of the previous one, so no time falls between parts; on CUDA each
reading synchronizes the device first, so a lap measures the device's work and not just the launch.
"""

from __future__ import annotations

import time

import torch

from ..models import synchronize


class Stopwatch:
    """`lap(name)` charges the time since the last lap (or the start) to `name`, in milliseconds."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.parts: dict[str, float] = {}
        self.started = self._now()
        self._mark = self.started

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> float:
        """Charge the time since the last lap to `name` (added to what it already holds); returns it in ms."""
        now = self._now()
        ms = (now - self._mark) * 1e3
        self.parts[name] = self.parts.get(name, 0.0) + ms
        self._mark = now
        return ms

    def elapsed_ms(self) -> float:
        """Milliseconds from the start to the last lap."""
        return (self._mark - self.started) * 1e3
