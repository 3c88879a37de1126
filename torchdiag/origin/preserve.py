"""Leave a model as it was: buffers, train/eval modes and the RNG state, whatever happens inside."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers (BatchNorm running stats) and modes, and the global RNG, on exit."""
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"} - {None})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), saved_buffers):
                b.copy_(saved)
        for m, mode in zip(model.modules(), modes):
            m.training = mode
