"""DTensor helpers (FSDP2's sharded parameters) and the DDP wrapper, for code that runs in one process too."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a ``DTensor`` (FSDP2 parameters and gradients). Imports nothing: if its module was never
    imported, no DTensor exists (``torch.distributed._tensor`` before torch 2.5)."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        dtensor = getattr(sys.modules.get(name), "DTensor", None)
        if dtensor is not None:
            return isinstance(t, dtensor)
    return False


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s local shard; any other tensor as it is."""
    return cast("DTensor", t).to_local() if is_sharded(t) else t


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (its layers are named without ``module.``)."""
    ddp = getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", None)
    while ddp is not None and isinstance(model, ddp):
        model = model.module
    return model
