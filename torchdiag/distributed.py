"""Distributed: global statistics across ranks (DDP, FSDP2), rank-0 sinks.

Under an initialised ``torch.distributed`` process group every rank records its own step as usual
(``buffer.Recorder``). At the end of each recorded step, after the one host copy, each rank's
per-layer ``stats.Moments`` (exact for its shard of the batch) are packed into two fixed-shape
float64 vectors and reduced with one ``all_reduce`` of ``MAX`` (maxima, minima as ``-min``,
first-call order as ``-index``, the step number) and one of ``SUM`` (element counts, sums and
sums of squares about a shift every rank knows after the ``MAX``, zero/saturated/NaN
counts, input sums of squares, update norms, gradient-norm parts). Mean and variance are then
exact for the global batch (pooled, as one process would compute them over it). Every rank ends
with the same ``StepStats`` and so the same report; rank 0 of the group alone writes and warns.

The layout of both vectors depends only on the watched modules (the slots), never on what ran in
the step: a layer that ran on one rank only (a conditional branch), or a rank that ran nothing at
a recorded step, still reduces the same shape, so the collective cannot hang on it. What every
rank must agree on is the number of steps (``step()`` / ``opt.step()`` calls), as DDP requires too.

Sharded parameters (FSDP2's DTensor) are read through their local shard: weight moments and
update norms are then sums over shards, which the ``SUM`` completes. Replicated parameters (DDP)
give every rank the same numbers; pooled moments of identical copies are those of one copy, and
the gradient-norm parts of replicated parameters are averaged over ranks instead of summed.
"""

from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from . import stats
from .errors import TorchDiagError, warn_self


# ------------------------------------------------------------------ rank helpers
def is_dist() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group if None); 0 outside torch.distributed."""
    return torch.distributed.get_rank(group) if is_dist() else 0


def rank_zero(group: Any = None) -> bool:
    """True on rank 0 of ``group`` (the default group if None), and always outside torch.distributed."""
    return rank(group) == 0


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
    return t.to_local() if is_sharded(t) else t


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (its layers are named without ``module.``)."""
    ddp = getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", None)
    while ddp is not None and isinstance(model, ddp):
        model = model.module
    return model


@dataclass
class Group:
    """The process group statistics are reduced over, as seen from this rank."""

    pg: Any  # a ProcessGroup, or None for the default group
    rank: int
    world: int
    device: torch.device  # where the packed vectors go for the collective (CUDA for NCCL)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def resolve(process_group: Any = None) -> Group | None:
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


def _device(pg: Any) -> torch.device:
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


# ------------------------------------------------------------------ the step reduction
_NEG = -math.inf
_M_SUM = 8  # n, sum(x - c), sum((x - c)^2), zeros, saturated, nonfinite, calls, NaN-in-range


class StepReducer:
    """Packs one rank's merged step, reduces it over the group, unpacks the global step.

    The layout is fixed at construction from the slots (the watched modules, the same on every rank):
    moments for each layer's activation and gradient, its weight if it has one, the root's output
    gradient; sums of squares of weighted layers' inputs and of the model input; update norms of
    layers with a weight; per layer its first-call order, call count and presence.
    """

    def __init__(self, slots: list[Any], group: Group, schedule: dict[str, float] | None = None) -> None:
        from .buffer import ACT, GRAD, INPUT, PROBE, ROOT_GRAD, ROOT_IN, WEIGHT

        self.group = group
        # what decides when each rank runs a collective (every, histogram/profile cadence, deferral): agreed at
        # the first recorded step, with the layout and the step number; ranks that differ would run different
        # numbers of collectives and hang until the process-group timeout
        self.schedule = dict(schedule or {})
        self.mkeys: list[tuple[int, int]] = []
        self.skeys: list[tuple[int, int]] = []
        self.ukeys: list[int] = []
        self.lslots: list[int] = []
        for s, info in enumerate(slots):
            if info.is_layer:
                self.lslots.append(s)
                self.mkeys += [(s, ACT), (s, GRAD)]
                if info.weight_name is not None:
                    self.mkeys.append((s, WEIGHT))
                    self.ukeys.append(s)
                if info.kind == "weighted":
                    self.skeys.append((s, INPUT))
                    self.mkeys.append((s, PROBE))  # inputs not fed by an activation module
            if info.is_root:
                self.mkeys.append((s, ROOT_GRAD))
                self.skeys.append((s, ROOT_IN))
        text = "\n".join(f"{i.name}|{i.module_type}|{i.is_layer}|{i.is_root}|{i.weight_name}" for i in slots)
        self._fingerprint = float(zlib.crc32(text.encode())), float(len(slots))
        self._checked = False
        self.disabled = False  # ranks watch different models: every rank falls back to its own numbers
        self._warned_step = False

    # ---------------------------------------------------------------- collectives
    def _all_reduce(self, values: list[float], op: Any) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64).to(self.group.device)
        torch.distributed.all_reduce(t, op=op, group=self.group.pg)
        return t.cpu().tolist()

    def _all_gather(self, values: list[float]) -> list[list[float]]:
        t = torch.tensor(values, dtype=torch.float64).to(self.group.device)
        out = [torch.empty_like(t) for _ in range(self.group.world)]
        torch.distributed.all_gather(out, t, group=self.group.pg)
        return [o.cpu().tolist() for o in out]

    def _check_layout(self, step: int) -> bool:
        """Once per watch, at the first recorded step: do all ranks watch the same modules (so the vectors have
        the same shape), on the same collective schedule, at the same step? One small all_gather. If not,
        every rank is told what differs, on which rank, and no collective runs for the rest of the watch."""
        fp, n = self._fingerprint
        keys = sorted(self.schedule)
        mine = [fp, n, float(step)] + [float(self.schedule[k]) for k in keys]
        every = self._all_gather(mine)
        self._checked = True
        if any(r[:2] != mine[:2] for r in every):
            self.disabled = True
            warn_self("torchdiag: the ranks of the process group watch different modules (names or types"
                      " differ); statistics are not reduced across ranks for the rest of this watch: each"
                      " rank reports its own", stacklevel=3)
            return False
        differ = [(k, [r[3 + i] for r in every]) for i, k in enumerate(keys) if len({r[3 + i] for r in every}) > 1]
        steps = [r[2] for r in every]
        if len(set(steps)) > 1:
            differ.insert(0, ("step", steps))
        if differ:
            self.disabled = True
            what = "; ".join(f"{k}: " + ", ".join(f"rank {i} {v:g}" for i, v in enumerate(vals)) for k, vals in differ)
            warn_self(f"torchdiag: the ranks would record at different steps and run different numbers of"
                      f" collectives ({what}); statistics are not reduced across ranks for the rest of this watch"
                      " (each rank reports its own) instead of hanging: give every rank the same every,"
                      " histogram_every, profile_every and defer_report, and the same number of step() calls",
                      stacklevel=3)
        return not self.disabled

    # ---------------------------------------------------------------- pack / unpack
    def reduce(self, step: int, moms: dict, sq: dict, updates: dict, clip: list[float] | None,
               scale: float | None, order: dict[int, int], calls: dict[int, int]) -> tuple | None:
        """The global ``(moms, sq, updates, clip, scale, order, calls)`` of this step, as ``Recorder._merge``
        holds them locally; None when the reduction is disabled (then the caller keeps its own numbers).

        ``clip`` is ``[pre, post]`` or ``[pre, post, pre_sharded, post_sharded]``; ``updates[slot]`` is
        ``[dd, ww, n]``.
        """
        if self.disabled or (not self._checked and not self._check_layout(step)):
            return None
        MAX, SUM = torch.distributed.ReduceOp.MAX, torch.distributed.ReduceOp.SUM
        # ---- MAX: step, scale, max / -min per moments, -first-call index and calls per layer
        mx: list[float] = [float(step), -float(step), scale if scale is not None else _NEG]
        nan_range = []
        for key in self.mkeys:
            m = moms.get(key)
            if m is None or m.n == 0:
                mx += [_NEG, _NEG]
                nan_range.append(0.0)
            elif math.isnan(m.min) or math.isnan(m.max):
                mx += [_NEG, _NEG]
                nan_range.append(1.0)
            else:
                mx += [m.max, -m.min]
                nan_range.append(0.0)
        for s in self.lslots:
            mx += [-float(order[s]) if s in order else _NEG, float(calls.get(s, 0))]
        gmx = self._all_reduce(mx, MAX)
        if gmx[0] != -gmx[1] and not self._warned_step:
            self._warned_step = True
            warn_self(f"torchdiag: the ranks are at different steps ({-gmx[1]:.0f} to {gmx[0]:.0f}); every rank"
                      " must call step() / opt.step() the same number of times, or statistics of different"
                      " steps are mixed", stacklevel=2)
        # shift of each moments entry: the centre of the global range, known to every rank now, so the
        # sums below hardly cancel (a constant tensor gives exactly zero variance)
        shifts = []
        for i in range(len(self.mkeys)):
            hi, lo = gmx[3 + 2 * i], -gmx[4 + 2 * i]
            shifts.append(0.5 * (lo + hi) if math.isfinite(lo) and math.isfinite(hi) else 0.0)
        # ---- SUM
        sm: list[float] = [1.0]
        if clip is not None:
            pre_sh, post_sh = (clip[2], clip[3]) if len(clip) >= 4 else (0.0, 0.0)
            sm += [1.0, clip[0] - pre_sh, clip[1] - post_sh, pre_sh, post_sh]
        else:
            sm += [0.0] * 5
        for key, c, nan in zip(self.mkeys, shifts, nan_range):
            m = moms.get(key)
            if m is None or m.n == 0:
                sm += [0.0] * _M_SUM
                continue
            d = m.mean - c
            sm += [float(m.n), m.n * d, m.m2 + m.n * d * d, m.zeros, m.saturated,
                   float(m.nonfinite), float(m.calls), nan]
        for key in self.skeys:
            acc = sq.get(key)
            sm += [acc[0], float(acc[1])] if acc else [0.0, 0.0]
        for s in self.ukeys:
            u = updates.get(s)
            sm += [u[0], u[1], float(u[2]), 1.0] if u is not None else [0.0] * 4
        for s in self.lslots:
            sm.append(1.0 if s in order else 0.0)
        gsm = self._all_reduce(sm, SUM)
        return self._unpack(gmx, gsm, shifts)

    def _unpack(self, gmx: list[float], gsm: list[float], shifts: list[float]) -> tuple:
        scale = gmx[2] if math.isfinite(gmx[2]) else None
        clip = None
        if gsm[1] > 0:
            repl_pre, repl_post, sh_pre, sh_post = gsm[2:6]
            clip = [sh_pre + repl_pre / gsm[1], sh_post + repl_post / gsm[1]]  # replicated: mean over ranks
        moms: dict[tuple[int, int], stats.Moments] = {}
        pos = 6
        for i, key in enumerate(self.mkeys):
            n, s1, s2, zeros, saturated, nonfinite, mcalls, nan = gsm[pos:pos + _M_SUM]
            pos += _M_SUM
            if n <= 0:
                continue
            hi, lo = gmx[3 + 2 * i], -gmx[4 + 2 * i]
            m = stats.Moments(n=int(n), mean=shifts[i] + s1 / n, m2=max(s2 - s1 * s1 / n, 0.0),
                              min=math.nan if nan else lo, max=math.nan if nan else hi, zeros=zeros,
                              saturated=saturated, nonfinite=int(nonfinite), calls=int(mcalls))
            moms[key] = m
        sq = {}
        for key in self.skeys:
            total, n = gsm[pos:pos + 2]
            pos += 2
            if n > 0:
                sq[key] = [total, int(n)]
        updates = {}
        for s in self.ukeys:
            dd, ww, n, has = gsm[pos:pos + 4]
            pos += 4
            if has > 0:
                updates[s] = [dd, ww, n]
        base = 3 + 2 * len(self.mkeys)
        first: list[tuple[float, int]] = []
        calls: dict[int, int] = {}
        for j, s in enumerate(self.lslots):
            if gsm[pos + j] > 0:
                first.append((-gmx[base + 2 * j], s))
                calls[s] = int(gmx[base + 2 * j + 1])
        # first-call order: the earliest position any rank ran the layer at (ties: registration order)
        order = {s: i for i, (_, s) in enumerate(sorted(first))}
        return moms, sq, updates, clip, scale, order, calls
