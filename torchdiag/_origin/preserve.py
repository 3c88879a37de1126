"""Leave a model as it was: buffers, train/eval modes and the random number generators, whatever happens inside."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers (BatchNorm running stats) and modes, and the global RNGs (``forked_rngs``), on
    exit."""
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    try:
        with forked_rngs(model):
            yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), saved_buffers):
                b.copy_(saved)
        for m, mode in zip(model.modules(), modes):
            m.training = mode


@contextlib.contextmanager
def forked_rngs(model: nn.Module) -> Iterator[None]:
    """Every global random number generator a forward may draw from, as it was on exit: torch's (the CPU's and
    those of the CUDA devices ``model`` is on), Python's ``random`` and NumPy's legacy global one (a hand-written
    DropPath, Hugging Face's SpecAugment masks), so that a pass torchdiag adds leaves the user's run unchanged."""
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"} - {None})
    python_state = random.getstate()
    np = sys.modules.get("numpy")  # only if the process uses it: never imported for this
    numpy_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        if np is not None:
            np.random.set_state(numpy_state)
