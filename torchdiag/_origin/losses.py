"""The loss ``check()`` and the non-finite replay use when the user gives none."""

from __future__ import annotations

import torch

from .._capture.runtime import iter_float_tensors
from ..errors import TorchDiagError


def projection_loss(output: object) -> torch.Tensor:
    """A fixed random projection of every floating tensor in ``output`` (seeded, so repeatable)."""
    gen = torch.Generator().manual_seed(0)
    total = None
    for t in iter_float_tensors(output):
        r = torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)
        term = (t * r).sum()
        total = term if total is None else total + term
    if total is None:
        raise TorchDiagError("check(): the model's output holds no floating-point tensor; pass loss_fn=")
    return total
