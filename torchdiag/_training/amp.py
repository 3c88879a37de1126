"""GradScaler: the steps it skipped, counted from its scale (it multiplies the scale by its backoff factor at
each step whose gradients held inf/NaN, and skips that optimizer step)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def check_scaler(scaler: object) -> None:
    """``watch(scaler=...)``: a ``torch.amp.GradScaler`` (or None)."""
    if scaler is not None and not (callable(getattr(scaler, "scale", None)) and hasattr(scaler, "get_scale")):
        raise TypeError(f"watch(scaler=...): expected a torch.amp.GradScaler, got {type(scaler).__name__}")


class SkippedSteps:
    """The steps a ``GradScaler`` skipped so far, from the scales of the recorded steps in order."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self._prev: float | None = None
        self.count = 0

    def add(self, scale: float) -> int:
        """Take the scale of the next recorded step; returns the steps skipped so far."""
        prev, self._prev = self._prev, scale
        if prev is not None and 0 < scale < prev:
            backoff = float(self.scaler.get_backoff_factor()) if hasattr(self.scaler, "get_backoff_factor") else 0.5
            if 0 < backoff < 1:
                self.count += max(1, round(math.log(prev / scale) / math.log(1 / backoff)))
        return self.count
