"""Distributed: global statistics across ranks (DDP, FSDP2), rank-0 sinks; the process-group plumbing.

Under an initialised ``torch.distributed`` process group every rank records its own step as usual
(``buffer.Recorder``). At the end of each recorded step, after the one host copy, each rank's
accumulators are reduced by ``reduce`` (``_reduction.py``: each field packed by the reduction it declares,
one ``MAX`` and one ``SUM`` collective; a single process runs the same ``reduce`` with ``group=None``, the
identity). Mean and variance are then exact for the global batch. Every rank ends with the same
``StepStats`` and so the same report; rank 0 of the group alone writes and warns. This module holds the
rest: ``StepReducer``, which runs those collectives for one watch (which group: ``groups.resolve``).

The layout of both vectors (``stepbuffer.reduction_layout``) depends only on the watched modules (the
slots), never on what ran in
the step: a layer that ran on one rank only (a conditional branch), or a rank that ran nothing at
a recorded step, still reduces the same shape, so the collective cannot hang on it. What every
rank must agree on is the number of steps (``step()`` / ``opt.step()`` calls), as DDP requires too.

torchdiag's collectives run on a gloo group of its own, one per watch, over the same ranks and the
user group's store (CPU vectors of a few hundred floats; the user's NCCL or gloo group never sees
them), with a short timeout (``TORCHDIAG_DIST_TIMEOUT`` seconds, 60 by default). A rank that breaks the
precondition (one more ``step()``, a ``with`` left by an exception while the others go on, a rank
that never watches) is detected within that time, or at once when its side of the group is closed:
every rank still watching warns once, naming the rank and what it did (each rank leaves a key in
the store when it leaves its watch), and reduces nothing for the rest of the watch. On the user's
own group a collective that one rank skipped would shift the sequence of every later collective
there: gloo aborts the process at the user's next allreduce ("Received data size doesn't match").

Sharded parameters (FSDP2's DTensor) are read through their local shard: weight moments and
update norms are then sums over shards, which the ``SUM`` completes. Replicated parameters (DDP)
give every rank the same numbers; pooled moments of identical copies are those of one copy, and
the gradient-norm parts of replicated parameters are averaged over ranks instead of summed.
"""

from __future__ import annotations

import datetime
import math
import os
import weakref
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import warn_self
from ._groups import Group, is_dist, rank, rank_zero, resolve
from ._reduction import OneRank, reduce
from .accumulators import Accumulator, Interval, StepNumber
from .dtensor import is_sharded, local_tensor, unwrap

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup, ProcessGroupGloo, ReduceOp, Store

    from .._layers.taxonomy import Slot
    from .._record.buffer import Recorder
    from .._record.cadence import Cadence

__all__ = ["Group", "OneRank", "StepReducer", "is_dist", "is_sharded", "local_tensor", "rank", "rank_zero", "reduce",
           "resolve", "timeout_s", "unwrap"]


# ------------------------------------------------------------------ torchdiag's own group
DEFAULT_TIMEOUT_S = 60.0
_TIMEOUT_ENV = "TORCHDIAG_DIST_TIMEOUT"
_watches: dict[str, int] = {}  # per user group: watches started by this process (names each watch's group)


def timeout_s() -> float:
    """How long a rank waits in one of torchdiag's collectives (or to form its group) for the other ranks:
    ``TORCHDIAG_DIST_TIMEOUT`` seconds if set to a positive number, else 60."""
    try:
        value = float(os.environ.get(_TIMEOUT_ENV, "") or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 and math.isfinite(value) else DEFAULT_TIMEOUT_S


def _group_store(pg: ProcessGroup | None) -> tuple[Store, str] | None:
    """The store of the user's group and a name for the group; None where there is none to use."""
    c10d: Any = getattr(torch.distributed, "distributed_c10d", None)  # private: None raises, caught below
    try:
        if pg is None:
            pg = c10d._get_default_group()
        return c10d._get_process_group_store(pg), str(getattr(pg, "group_name", "") or "default")
    except Exception:  # noqa: BLE001 - private API moved or no store: the user's group, as before
        return None


def _is_gloo_available() -> bool:
    try:
        return bool(torch.distributed.is_gloo_available()) and hasattr(torch.distributed, "ProcessGroupGloo")
    except Exception:  # noqa: BLE001
        return False


class _Missing(Exception):
    """One of torchdiag's collectives failed or timed out on its own group: a rank is not there."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


_STEP_KEY = ("torchdiag", "step")
_INTERVAL_KEY = ("torchdiag", "interval")


class StepReducer:
    """torchdiag's collectives for one watch: its own gloo group, the check at the first recorded step that
    every rank watches the same modules on the same schedule, ``reduce`` of each recorded step's accumulators,
    and what a missing rank makes of them (a warning, each rank's own numbers from then on)."""

    def __init__(self, slots: list[Slot], group: Group, schedule: dict[str, float] | None = None,
                 recorder: Recorder | None = None) -> None:
        self.group = group
        self._recorder = weakref.ref(recorder) if recorder is not None else None  # notes for its reports
        self.note: str | None = None  # why statistics are this rank's own, once the reduction stopped
        self.timeout = timeout_s()
        # torchdiag's own gloo group, formed at the first recorded step; named by the user group and the number
        # of watches this process started on it, the same on every rank that watches as often
        self._pg: ProcessGroupGloo | None = None
        self._store: Store | None = None
        self._left = False
        self._last: int | None = None  # the last step reduced
        self._interval = Interval()  # the ranks' agreed cadence at the last reduction
        found = _group_store(group.pg) if _is_gloo_available() else None
        if found is not None:
            base, name = found
            n = _watches.get(name, 0)
            _watches[name] = n + 1
            self._store = torch.distributed.PrefixStore(f"torchdiag/{n}/", base)
        # what decides when each rank runs a collective (every, histogram/profile cadence, deferral): agreed at
        # the first recorded step, with the layout and the step number; ranks that differ would run different
        # numbers of collectives and hang until the process-group timeout
        self.schedule = dict(schedule or {})
        text = "\n".join(f"{i.name}|{i.module_type}|{i.is_layer}|{i.is_root}|{i.weight_name}" for i in slots)
        self._fingerprint = float(zlib.crc32(text.encode())), float(len(slots))
        self._checked = False
        self.disabled = False  # ranks watch different models: every rank falls back to its own numbers
        self._warned_step = False

    # ---------------------------------------------------------------- collectives
    def _connect(self) -> None:
        """Form torchdiag's group (at the first recorded step): this rank says it is here, then gloo connects
        the ranks through the store, waiting at most ``timeout`` for them."""
        if self._store is None:
            return  # no gloo or no store: the user's group, with its own timeout
        g = self.group
        self._store.set(f"here/{g.rank}", "1")
        self._pg = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("gloo/", self._store), g.rank,
                                                      g.world, datetime.timedelta(seconds=self.timeout))

    def _all_reduce(self, values: list[float], op: ReduceOp.RedOpType) -> list[float]:
        if self._pg is not None:
            t = torch.tensor(values, dtype=torch.float64)
            opts = torch.distributed.AllreduceOptions()
            opts.reduceOp = torch.distributed.ReduceOp(op)  # the conversion assigning a RedOpType makes, made explicit
            try:
                # gloo's timeout: a missing rank raises, never hangs. torch's stub of ProcessGroupGloo lacks the
                # collectives its Backend has at run time
                self._pg.allreduce([t], opts).wait()  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001
                raise _Missing(e) from e
            return t.tolist()
        t = torch.tensor(values, dtype=torch.float64).to(self.group.device)
        torch.distributed.all_reduce(t, op=op, group=self.group.pg)
        return t.cpu().tolist()

    def _all_gather(self, values: list[float]) -> list[list[float]]:
        if self._pg is not None:
            t = torch.tensor(values, dtype=torch.float64)
            out = [torch.empty_like(t) for _ in range(self.group.world)]
            try:
                self._pg.allgather([out], [t]).wait()  # type: ignore[attr-defined]  # (as allreduce above)
            except Exception as e:  # noqa: BLE001
                raise _Missing(e) from e
            return [o.tolist() for o in out]
        t = torch.tensor(values, dtype=torch.float64).to(self.group.device)
        out = [torch.empty_like(t) for _ in range(self.group.world)]
        torch.distributed.all_gather(out, t, group=self.group.pg)
        return [o.cpu().tolist() for o in out]

    def _close_pg(self) -> None:
        """Shut torchdiag's group down explicitly (its connections close: a rank still waiting on it fails at once),
        rather than leave it to gloo's destructor, which can abort the process when a peer already left."""
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001, S110 - an older torch without shutdown(), or a group already broken
                pass

    def _disable(self, note: str) -> None:
        """No collective for the rest of this watch; the reports say why (this rank's own numbers)."""
        self.disabled = True
        self.note = note
        self._close_pg()  # closes this rank's side: a rank still waiting on it fails at once

    def _where(self, r: int) -> str | None:
        """What rank ``r`` left in the store: why it is not in the collective, or None (no word from it)."""
        store = self._store
        if store is None:  # no store of the user's group: no word from any rank
            return None
        try:
            for key in (f"left/{r}", f"done/{r}"):
                if store.check([key]):
                    return store.get(key).decode()
            if not store.check([f"here/{r}"]):
                return "is not watching (no torchdiag.watch on that rank, or fewer watches than this one)"
        except Exception:  # noqa: BLE001 - the store is gone too: nothing more to say
            return None
        return None

    def _failed(self, step: int, what: str, error: BaseException) -> None:
        """A collective (or forming the group) failed or timed out: some rank is not there. Warn once, naming
        the ranks the store explains, or else every other rank; reduce nothing from now on."""
        g = self.group
        others = [r for r in range(g.world) if r != g.rank]
        told = {r: w for r in others if self._store is not None and (w := self._where(r)) is not None}
        if told:
            who = "; ".join(f"rank {r} {w}" for r, w in told.items())
        else:
            who = (", ".join(f"rank {r}" for r in others) + f": no answer within {self.timeout:g} s (still busy"
                   f" elsewhere? a slower rank needs a larger {_TIMEOUT_ENV})")
        detail = (str(error).strip().splitlines() or [""])[0][:120]
        self._disable(f"statistics of rank {g.rank} only from step {step} on: not every rank joined torchdiag's"
                      f" reduction ({who})")
        warn_self(f"torchdiag: at step {step} rank {g.rank} {what} and not every rank joined: {who}. Statistics"
                  " are not reduced across ranks for the rest of this watch (each rank reports its own); training"
                  " goes on. Every rank must watch, call step() / opt.step() the same number of times and leave the"
                  f" `with` together [{type(error).__name__}: {detail}]")

    def leave(self, exc_type: type[BaseException] | None = None) -> None:
        """This rank leaves its watch (``Watcher.__exit__``, after its last collective): a key in the store says
        how, for a rank that waits on it in vain, then this rank's side of the group closes. Never raises."""
        if self._left:
            return
        self._left = True
        try:
            if self._store is not None:  # also before its first collective: the others are not waiting in vain
                after = f" after step {self._last}" if self._last is not None else ""
                if exc_type is not None:
                    self._store.set(f"left/{self.group.rank}", f"left its watch by an exception"
                                                               f" ({getattr(exc_type, '__name__', exc_type)}){after}")
                else:
                    self._store.set(f"done/{self.group.rank}", f"ended its watch{after} (the ranks called step()"
                                                               " a different number of times)")
        except Exception:  # noqa: BLE001, S110 - the store is gone: the others time out instead
            pass
        self._close_pg()

    def _check_layout(self, step: int) -> bool:
        """Once per watch, at the first recorded step: do all ranks watch the same modules (so the vectors have
        the same shape), on the same collective schedule, at the same step? One small all_gather. If not,
        every rank is told what differs, on which rank, and no collective runs for the rest of the watch."""
        fp, n = self._fingerprint
        keys = sorted(self.schedule)
        mine = [fp, n, float(step)] + [float(self.schedule[k]) for k in keys]
        self._checked = True
        try:
            try:
                self._connect()
            except Exception as e:  # noqa: BLE001 - gloo could not connect the ranks in time
                raise _Missing(e) from e
            every = self._all_gather(mine)
        except _Missing as e:  # a rank is missing: said, never raised, never a hang
            self._failed(step, "formed torchdiag's group", e.error)
            return False
        if any(r[:2] != mine[:2] for r in every):
            self._disable("statistics of this rank only: the ranks watch different modules")
            warn_self("torchdiag: the ranks of the process group watch different modules (names or types"
                      " differ); statistics are not reduced across ranks for the rest of this watch: each"
                      " rank reports its own")
            return False
        differ = [(k, [r[3 + i] for r in every]) for i, k in enumerate(keys) if len({r[3 + i] for r in every}) > 1]
        steps = [r[2] for r in every]
        if len(set(steps)) > 1:
            differ.insert(0, ("step", steps))
        if differ:
            self._disable("statistics of this rank only: the ranks would record at different steps or reduce different"
                          " figures")
            what = "; ".join(f"{k}: " + ", ".join(f"rank {i} {v:g}" for i, v in enumerate(vals)) for k, vals in differ)
            warn_self(f"torchdiag: the ranks would record at different steps or reduce different figures, and run"
                      f" different collectives ({what}); statistics are not reduced across ranks for the rest of this"
                      " watch (each rank reports its own) instead of hanging: give every rank the same values of"
                      " these keys, and the same number of step() calls")
        return not self.disabled

    # ---------------------------------------------------------------- the step
    @property
    def last_reduced(self) -> int | None:
        """The last step whose statistics were reduced across the ranks (every rank has the same report of it)."""
        return self._last

    def all_reduce(self, values: list[float], op: str) -> list[float]:
        """One collective on torchdiag's group (what ``reduce`` calls): ``op`` is ``"max"`` or ``"sum"``."""
        ops = torch.distributed.ReduceOp
        return self._all_reduce(values, ops.MAX if op == "max" else ops.SUM)

    def reduce(self, step: int, accumulators: dict[tuple, Accumulator],
               layout: Sequence[tuple[tuple, type[Accumulator]]],
               cadence: Cadence | None = None) -> dict[tuple, Accumulator] | None:
        """The global accumulators of this step (``reduce`` over this rank's group); None when the reduction is
        disabled (then the caller keeps its own numbers). ``cadence`` (a ``cadence.Cadence``): its proposed
        recording interval joins the reduction and every rank agrees on the largest (this rank's own when the
        reduction is disabled)."""
        out = None
        proposed = cadence.propose() if cadence is not None else Interval()
        if not self.disabled and (self._checked or self._check_layout(step)):
            try:
                out = self._reduce(step, accumulators, layout, proposed)
                proposed = self._interval
                self._last = step
            except _Missing as e:
                self._failed(step, "reduced", e.error)
        if cadence is not None:
            cadence.agree(proposed)
        rec = self._recorder() if self._recorder is not None else None
        if out is None and self.note and rec is not None:
            rec.notes.append(self.note)  # the report says whose numbers it holds
        return out

    def _reduce(self, step: int, accumulators: dict[tuple, Accumulator],
                layout: Sequence[tuple[tuple, type[Accumulator]]],
                interval: Interval | None = None) -> dict[tuple, Accumulator]:
        accumulators = {**accumulators, _STEP_KEY: StepNumber(low=float(step), high=float(step)),
                        _INTERVAL_KEY: interval or Interval()}
        out = reduce(accumulators, self, [*layout, (_STEP_KEY, StepNumber), (_INTERVAL_KEY, Interval)])
        agreed, steps = out.pop(_INTERVAL_KEY), out.pop(_STEP_KEY)
        # reduce gives each key of the layout back as the accumulator the layout names, and these two are never empty
        assert isinstance(agreed, Interval) and isinstance(steps, StepNumber)
        self._interval = agreed
        if steps.low != steps.high and not self._warned_step:
            self._warned_step = True
            warn_self(f"torchdiag: the ranks are at different steps ({steps.low:.0f} to {steps.high:.0f}); every rank"
                      " must call step() / opt.step() the same number of times, or statistics of different"
                      " steps are mixed")
        return out
