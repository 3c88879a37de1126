"""Which process group a watch reduces over (``resolve``: the default one, the user's, or None in a single
process or a one-rank group), as seen from this rank (``Group``), and the rank helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import TorchDiagError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (the default group if None); 0 outside torch.distributed."""
    return torch.distributed.get_rank(group) if is_dist() else 0


def rank_zero(group: ProcessGroup | None = None) -> bool:
    """True on rank 0 of ``group`` (the default group if None), and always outside torch.distributed."""
    return rank(group) == 0


@dataclass
class Group:
    """The process group statistics are reduced over, as seen from this rank."""

    pg: ProcessGroup | None  # None: the default group
    rank: int
    world: int
    device: torch.device  # where the packed vectors go for the collective (CUDA for NCCL)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def resolve(process_group: object = None) -> Group | None:
    """The group to reduce over, or None when there is nothing to reduce (no process group, one rank).

    Called by ``watch()``: with ``process_group=None`` that is the default group if torch.distributed
    is initialised, else None (single process, no collective ever).
    """
    if process_group is None:
        if not is_dist():
            return None
    else:
        if not is_dist():
            raise TorchDiagError("watch(process_group=...): torch.distributed is not initialised; call"
                                 " torch.distributed.init_process_group(...) before watch()")
        if process_group == getattr(torch.distributed.GroupMember, "NON_GROUP_MEMBER", object()):
            raise TorchDiagError("watch(process_group=...): this rank is not a member of that group (new_group()"
                                 " returns NON_GROUP_MEMBER on the ranks it leaves out); watch with the group this"
                                 " rank belongs to")
        if not isinstance(process_group, torch.distributed.ProcessGroup):
            raise TypeError("watch(process_group=...): expected a torch.distributed.ProcessGroup, got"
                            f" {type(process_group).__name__}")
    world = torch.distributed.get_world_size(process_group)
    if world <= 1:
        return None
    return Group(pg=process_group, rank=torch.distributed.get_rank(process_group), world=world,
                 device=_device(process_group))


def _device(pg: ProcessGroup | None) -> torch.device:
    """CPU for gloo (also in a mixed ``cpu:gloo,cuda:nccl`` group); the current accelerator for NCCL/XCCL."""
    backend = str(torch.distributed.get_backend(pg)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    xpu = getattr(torch, "xpu", None)
    if "xccl" in backend and xpu is not None and xpu.is_available():
        return torch.device("xpu", xpu.current_device())
    return torch.device("cpu")
