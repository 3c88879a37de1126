"""The step buffer: on-device rows written by the hooks, one host copy per recorded step, decoded on the host.

Each recorded tensor becomes a short row of 0-d moments on its device (``stats``); the row's values are kept
(never the tensor) until the end of a recorded step, when one ``stack`` per device gathers them and one copy
brings them to the host. Gathering at the end instead of copying each row into a preallocated buffer saves a
copy kernel per row (measured: the per-row ``stack(out=buffer[i])`` was a third of the hook's host time on
small layers).

A contiguous float32 CPU tensor's row is written by the CPU kernel (``cpurow``) straight into one float64 host
block per step instead (``kernel_row``): no tensor per row; its entries name ``KERNEL_ROWS`` in place of a device.

On histogram steps each activation and gradient also gets a fixed-bin histogram computed on its device
(``stats.histogram_row``) into a small per-device buffer; it travels to the host in the same single copy.

``decode`` turns the host values into per-(slot, row kind) accumulators (``accumulators``): moments for
moment rows, sums of squares for inputs, update norms, the step's gradient norms and AMP scale;
``reduction_layout`` lists every accumulator a step can hold, for the cross-rank reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch

from .._reduce.accumulators import (
    Accumulator,
    GradNorms,
    LayerCall,
    MomentAccumulator,
    RangeCounts,
    Scale,
    SumSq,
    Update,
)
from .._vocab import Role, Row
from . import _cpurow as cpurow
from . import stats

if TYPE_CHECKING:
    from .._layers.taxonomy import Slot

STEP_SLOT = -1  # slot of step-level rows (CLIP, SCALE)
COMPILED = -2  # the row kind of an entry holding the compiled graphs' accumulator (``compiled.Gate.acc``)
# the compiled graphs' accumulator (``_capture._compiled``): [slots, COMPILED_KINDS, COMPILED_COLS] power sums, per
# slot and kind [calls, n, sum, sum of squares, nonzero, saturated, -min, max]; ``decode`` turns each into the
# statistics row about 0, ``[0, sum, sum of squares, min, max, nonzero, saturated]``
COMPILED_KINDS = (Row.ACT, Row.GRAD, Row.INPUT, Row.ROOT_IN, Row.ROOT_GRAD)
COMPILED_COLS = 8
# where an entry's values are, in place of a device: the CPU kernel's rows, in the step's host block
KERNEL_ROWS = "cpu kernel rows"

# where a row's values are: a device, or KERNEL_ROWS
Where = Union[torch.device, str]
# an entry: (slot, row kind, elements of the tensor, device or KERNEL_ROWS, start among its values, width)
Entry = tuple[int, int, int, Where, int, int]
# a figure of the divergence signals (``write_signal``): (its key, the accumulator it fills, the fields known on the
# host, the fields its device values fill in order, their device (None: all on the host), start among its values)
SignalEntry = tuple[tuple, type, dict[str, float], tuple[str, ...], Union[torch.device, None], int]


@dataclass
class Pending:
    """A recorded step whose rows are on their way to the host (or already there)."""

    step: int
    entries: list[Entry]
    order: dict[int, int]
    calls: dict[int, int]
    reduce: bool
    hist_entries: list[tuple[int, int, torch.device, int]]
    signals: list[SignalEntry] = field(default_factory=list)
    # per device (or KERNEL_ROWS): (it, pinned host tensor or list of floats, CUDA event or None, number of values,
    # hist width)
    copies: list[tuple[Where, Any, torch.cuda.Event | None, int, int]] = field(default_factory=list)


@dataclass
class Decoded:
    """One step's accumulators on the host, per (slot, row kind): what the merge into ``LayerStats`` reads,
    and (flattened by ``accumulators``) what ``distributed.reduce`` reduces across ranks."""

    moments: dict[tuple[int, int], MomentAccumulator] = field(default_factory=dict)
    sumsq: dict[tuple[int, int], SumSq] = field(default_factory=dict)  # INPUT, ROOT_IN
    updates: dict[int, Update] = field(default_factory=dict)
    ranges: dict[tuple[int, int], RangeCounts] = field(default_factory=dict)  # ACT_RANGE, GRAD_RANGE
    grad_norms: GradNorms | None = None
    scale: float | None = None
    signals: dict[tuple, Accumulator] = field(default_factory=dict)  # the signals' (``write_signal``) by key
    order: dict[int, int] = field(default_factory=dict)  # slot -> first-call position
    calls: dict[int, int] = field(default_factory=dict)

    def accumulators(self) -> dict[tuple, Accumulator]:
        """Every accumulator under its key of ``reduction_layout``."""
        out: dict[tuple, Accumulator] = {}
        out.update(self.moments)
        out.update(self.sumsq)
        out.update(self.ranges)
        for slot, u in self.updates.items():
            out[(slot, Row.UPDATE)] = u
        if self.grad_norms is not None:
            out[(STEP_SLOT, Row.CLIP)] = self.grad_norms
        if self.scale is not None:
            out[(STEP_SLOT, Row.SCALE)] = Scale(self.scale)
        for slot, index in self.order.items():
            out[(slot, _CALL)] = LayerCall(first=float(index), calls=self.calls.get(slot, 0))
        out.update(self.signals)
        return out

    @classmethod
    def from_accumulators(cls, accs: dict[tuple, Accumulator]) -> Decoded:
        out = cls()
        first = []
        for key, acc in accs.items():
            if isinstance(key[0], str):  # a signal's (``write_signal``): its key names it
                out.signals[key] = acc
            elif isinstance(acc, MomentAccumulator):
                out.moments[key] = acc
            elif isinstance(acc, SumSq):
                out.sumsq[key] = acc
            elif isinstance(acc, RangeCounts):
                out.ranges[key] = acc
            elif isinstance(acc, Update):
                out.updates[key[0]] = acc
            elif isinstance(acc, GradNorms):
                out.grad_norms = acc
            elif isinstance(acc, Scale):
                out.scale = acc.value if math.isfinite(acc.value) else None
            elif isinstance(acc, LayerCall):
                first.append((acc.first, key[0]))
                out.calls[key[0]] = int(acc.calls)
        # first-call order: the earliest position any rank ran the layer at (ties: registration order)
        out.order = {s: i for i, (_, s) in enumerate(sorted(first))}
        return out


_CALL = "call"  # the row-kind place of a layer's LayerCall in an accumulator key


def reduction_layout(slots: list[Slot]) -> list[tuple[tuple, type]]:
    """Every accumulator a step of these slots can hold, in a fixed order: what ``distributed.reduce`` packs
    (the same on every rank, whatever ran in the step, so the collective has the same shape everywhere)."""
    keys: list[tuple[tuple, type]] = [((STEP_SLOT, Row.SCALE), Scale), ((STEP_SLOT, Row.CLIP), GradNorms)]
    for s, info in enumerate(slots):
        if info.is_layer:
            keys += [((s, _CALL), LayerCall), ((s, Row.ACT), MomentAccumulator), ((s, Row.GRAD), MomentAccumulator),
                     ((s, Row.ACT_RANGE), RangeCounts), ((s, Row.GRAD_RANGE), RangeCounts)]
            if info.weight_name is not None:
                keys += [((s, Row.WEIGHT), MomentAccumulator), ((s, Row.UPDATE), Update)]
            if info.kind == Role.WEIGHTED:
                keys += [((s, Row.INPUT), SumSq), ((s, Row.PROBE), MomentAccumulator)]  # PROBE: inputs not
        if info.is_root:  # fed by an activation module
            keys += [((s, Row.ROOT_GRAD), MomentAccumulator), ((s, Row.ROOT_IN), SumSq)]
    return keys


class StepBuffer:
    """This step's rows per device, and its histogram rows; ``launch`` starts the one host copy."""

    def __init__(self) -> None:
        self.values: dict[torch.device, list[torch.Tensor]] = {}  # this step's rows (0-d or 1-D), per device
        self.sizes: dict[torch.device, int] = {}  # number of values in them
        self.entries: list[Entry] = []
        # histograms: rows [lo, hi, counts...] in a second per-device buffer, on histogram steps only
        self._hist_buffers: dict[torch.device, torch.Tensor] = {}
        self._hist_rows_used: dict[torch.device, int] = {}
        self.hist_entries: list[tuple[int, int, torch.device, int]] = []
        self.signals: list[SignalEntry] = []
        # the CPU kernel's rows of this step, written in place (``kernel_row``): float64 [capacity, 7], kept
        # across steps (it only grows)
        self._block = torch.empty((0, stats.ACT_COLS), dtype=torch.float64)
        self._block_used = 0

    def write(self, slot: int, kind: int, n: int, device: torch.device, vals: list[torch.Tensor] | torch.Tensor) -> int:
        """Keep a row until the step ends; returns where its values start among this step's on ``device``.

        A row is 0-d float32 tensors (``stats``' ATen path) or one 1-D tensor (float32 from the fused CUDA
        kernel, float64 from the CPU kernel); ``launch``'s ``cat`` promotes.
        They stay where the kernels put them (they are allocated anyway) until the step ends, when one
        stack (or cat) per device gathers them: no copy kernel per row, no host sync.
        """
        start, width = self._put(device, vals)
        self.entries.append((slot, kind, n, device, start, width))
        return start

    def _put(self, device: torch.device, vals: list[torch.Tensor] | torch.Tensor) -> tuple[int, int]:
        values = self.values.setdefault(device, [])
        start = self.sizes.get(device, 0)
        if isinstance(vals, torch.Tensor):
            values.append(vals)
            width = vals.numel()
        else:
            values.extend(vals)
            width = len(vals)
        self.sizes[device] = start + width
        return start, width

    def write_signal(self, key: tuple[str, Any], cls: type, fields: dict[str, torch.Tensor | float]) -> None:
        """A figure of the divergence signals, the accumulator ``cls`` it becomes (its declared reduction) and its
        fields: 0-d tensors travel in the step's copy with its other rows, numbers stay on the host. ``key`` starts
        with a string (the kind of figure), which tells it from a layer's."""
        host = {k: float(v) for k, v in fields.items() if not isinstance(v, torch.Tensor)}
        on_device = [(k, v) for k, v in fields.items() if isinstance(v, torch.Tensor)]
        device, start = None, 0
        if on_device:
            device = on_device[0][1].device
            start, _ = self._put(device, [v.detach().reshape(()).float().to(device) for _, v in on_device])
        self.signals.append((key, cls, host, tuple(k for k, _ in on_device), device, start))

    def kernel_row(self, slot: int, kind: int, x: torch.Tensor, saturation: tuple[float, float] | None = None,
                   zeros: bool = False) -> int | None:
        """The row of a tensor the CPU kernel takes (``cpurow.usable``), written by it straight into this step's
        host block: no tensor per row (nor the garbage collector's work on it), and the block goes to the host
        in one ``tolist``. Returns where its values start among ``KERNEL_ROWS``'; None where the kernel does
        not take ``x`` (then ``write`` a ``stats`` row)."""
        if not cpurow.usable(x):
            return None
        i = self._block_used
        if i == self._block.shape[0]:
            grown = torch.empty((max(64, 2 * i), stats.ACT_COLS), dtype=torch.float64)
            grown[:i].copy_(self._block[:i])
            self._block = grown
        self._block_used = i + 1  # reserved before the kernel runs (ctypes lets other threads run meanwhile)
        stats.cpu_row_into(x, self._block, i, saturation, zeros)
        start = i * stats.ACT_COLS
        self.entries.append((slot, kind, x.numel(), KERNEL_ROWS, start, stats.ACT_COLS))
        return start

    def kernel_range_row(self, slot: int, kind: int, x: torch.Tensor, fmax: float, floor: float) -> bool:
        """A CPU half-precision tensor's range row (``stats.range_row``) from the C kernel: its float32 copy read once
        into this step's host block, counting the elements at or above ``floor``, the format's max ``fmax`` put in
        place of the row's shift (``RangeCounts.add_row``). False where the kernel does not take it."""
        y = x.detach().float()
        start = self.kernel_row(slot, kind, y, (0.0, floor * stats.BELOW), True)
        if start is None:
            return False
        self._block[start // stats.ACT_COLS, 0] = fmax
        return True

    def kernel_row_values(self, start: int) -> torch.Tensor:
        """The row ``kernel_row`` wrote at ``start`` (a view: for a histogram step's binning range)."""
        return self._block[start // stats.ACT_COLS]

    def write_compiled(self, acc: torch.Tensor) -> None:
        """The compiled graphs' accumulator of this step (``compiled``: [slots, kinds, cols] power sums), as one
        value among the eager rows: the same single host copy."""
        self.write(STEP_SLOT, COMPILED, acc.shape[0], acc.device, acc.reshape(-1).float()
                   if acc.device.type == "mps" else acc.reshape(-1))

    def point(self, slot: int, kind: int, n: int, device: Where, start: int, width: int) -> None:
        """An entry read from a row already written (a producer's output row): no kernel, no value."""
        self.entries.append((slot, kind, n, device, start, width))

    def write_hist(self, slot: int, kind: int, t: torch.Tensor, row: list[torch.Tensor] | torch.Tensor) -> None:
        device = t.device
        buf = self._hist_buffers.get(device)
        used = self._hist_rows_used.get(device, 0)
        if buf is None or used == buf.shape[0]:
            # counts in float64 (exact past 2**24 elements per bin); MPS has no float64
            dtype = torch.float32 if device.type == "mps" else torch.float64
            new = torch.zeros((max(16, 2 * used), stats.HIST_BINS + 2), dtype=dtype, device=device)
            if buf is not None:
                new[:used].copy_(buf[:used])
            self._hist_buffers[device] = buf = new
        stats.histogram_row(t, row, buf[used])
        self._hist_rows_used[device] = used + 1
        self.hist_entries.append((slot, kind, device, used))

    def mark(self) -> tuple:
        """Where the buffer stands now, for ``rollback`` (``peek`` adds weight rows, then takes them back)."""
        return ({d: len(v) for d, v in self.values.items()}, dict(self.sizes), len(self.entries), self._block_used,
                len(self.signals))

    def rollback(self, mark: tuple) -> None:
        lengths, sizes, n_entries, self._block_used, n_signals = mark
        self.entries = self.entries[:n_entries]
        self.signals = self.signals[:n_signals]
        self.values = {d: v[: lengths.get(d, 0)] for d, v in self.values.items()}
        self.sizes = {d: sizes.get(d, 0) for d in self.values}

    def reset(self) -> None:
        self.entries = []
        self.signals = []
        self.values = {}
        self.sizes = {}
        self.hist_entries = []
        self._block_used = 0
        for d in self._hist_rows_used:
            self._hist_rows_used[d] = 0

    def launch(self, pending: Pending, with_histograms: bool, defer: bool) -> Pending:
        """Per device one stack of the step's values (histogram rows appended) and its copy to the host: a
        blocking ``tolist`` or, with ``defer`` on a GPU, a non-blocking copy into pinned memory."""
        hist_used = self._hist_rows_used if with_histograms else {}
        # a device may hold histogram rows and no value (its rows all went to the CPU kernel's block)
        for d in dict.fromkeys([*self.values, *hist_used]):
            values, hused = self.values.get(d, []), hist_used.get(d, 0)
            if not values and not hused:
                continue
            if not values:
                flat = torch.empty(0, device=d)
            elif all(v.dim() == 0 for v in values):
                flat = torch.stack(values)
            else:
                flat = torch.cat([v.view(1) if v.dim() == 0 else v for v in values])
            width = self._hist_buffers[d].shape[1] if hused else 0
            if hused:
                hbuf = self._hist_buffers[d][:hused]
                flat = torch.cat((flat.to(hbuf.dtype), hbuf.reshape(-1)))
            if defer and d.type == "cuda":
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(d))
                pending.copies.append((d, host, event, self.sizes.get(d, 0), width))
            else:
                pending.copies.append((d, flat.tolist(), None, self.sizes.get(d, 0), width))
        if self._block_used:  # the CPU kernel's rows: already on the host
            rows = self._block[:self._block_used].reshape(-1).tolist()
            pending.copies.append((KERNEL_ROWS, rows, None, len(rows), 0))
        return pending


def arrive(pending: Pending) -> tuple[dict[Where, list], dict[Where, list]]:
    """The step's values on the host per device, and its histogram rows (waiting for a copy still running)."""
    host: dict[Where, list] = {}
    hist_host: dict[Where, list] = {}
    for d, data, event, split, width in pending.copies:
        if event is not None:
            if not event.query():  # still running (report() right after a step): wait for it
                event.synchronize()
            data = data.tolist()
        host[d] = data[:split]
        if width:
            hist_host[d] = [data[i:i + width] for i in range(split, len(data), width)]
    return host, hist_host


def decode(pending: Pending, host: dict[Where, list]) -> Decoded:
    """Rows -> accumulators, per (slot, row kind), and the signals' figures by key; gradient moments are unscaled by
    the step's AMP scale."""
    out = Decoded(order=dict(pending.order), calls=dict(pending.calls))
    moms, sq = out.moments, out.sumsq
    for slot, kind, n, device, row, width in pending.entries:
        vals = host[device][row:row + width]
        if kind == COMPILED:
            _decode_compiled(out, vals, n)
        elif kind in (Row.INPUT, Row.ROOT_IN):
            acc = sq.get((slot, kind))
            if acc is None:
                acc = sq[(slot, kind)] = SumSq()
            acc.add_row(n, vals)  # [sum(x^2)], or the producer's statistics row
        elif kind in (Row.ACT_RANGE, Row.GRAD_RANGE):  # counts of the tensors as computed: never unscaled
            rc = out.ranges.get((slot, kind))
            if rc is None:
                rc = out.ranges[(slot, kind)] = RangeCounts()
            rc.add_row(n, vals)
        elif kind == Row.UPDATE:
            out.updates[slot] = Update(vals[0], vals[1], n)
        elif kind == Row.CLIP:  # [pre, post] or, distributed, [pre, post, pre_sharded, post_sharded]
            pre_sh, post_sh = (vals[2], vals[3]) if len(vals) >= 4 else (0.0, 0.0)
            out.grad_norms = GradNorms(vals[0] - pre_sh, vals[1] - post_sh, pre_sh, post_sh)
        elif kind == Row.SCALE:
            out.scale = vals[0] if out.scale is None else out.scale
        else:
            m = moms.get((slot, kind))
            if m is None:
                m = moms[(slot, kind)] = MomentAccumulator()
            m.add_row(n, vals)
    for key, cls, fields, names, on, start in pending.signals:  # a signal's figure: its accumulator
        if names and on is not None:
            fields = {**fields, **dict(zip(names, host[on][start:start + len(names)]))}
        out.signals[key] = cls(**fields)
    if any(c == 0 for c in out.calls.values()):  # slots traced into a recorded graph that did not run this step
        ran = sorted((i, s) for s, i in out.order.items() if out.calls.get(s, 0) > 0)
        out.order = {s: i for i, (_, s) in enumerate(ran)}
        out.calls = {s: out.calls[s] for s in out.order}
        for key in [k for k in moms if k[0] >= 0 and k[0] not in out.order]:
            del moms[key]
        for key in [k for k in sq if k[0] not in out.order]:
            del sq[key]
        for key in [k for k in out.ranges if k[0] not in out.order]:
            del out.ranges[key]
    scale = out.scale
    if scale is not None and math.isfinite(scale) and scale > 0:
        for (_slot, kind), m in moms.items():
            if kind in (Row.GRAD, Row.ROOT_GRAD):
                m.rescale(1.0 / scale)
    return out




def _decode_compiled(out: Decoded, vals: list[float], slots: int) -> None:
    """The compiled graphs' accumulator: per slot and kind ``[calls, n, sum, sum of squares, nonzero,
    saturated, -min, max]`` (``compiled``), into the same accumulators as eager rows."""
    width = COMPILED_COLS
    for slot in range(slots):
        for k, kind in enumerate(COMPILED_KINDS):
            base = (slot * len(COMPILED_KINDS) + k) * width
            calls, n, s, q, nonzero, sat, negmin, mx = vals[base:base + width]
            if kind == Row.ACT and calls and slot in out.calls:
                out.calls[slot] += int(calls)
            if n <= 0:
                continue
            n_int = int(n)
            if kind in (Row.INPUT, Row.ROOT_IN):
                acc = out.sumsq.get((slot, kind))
                if acc is None:
                    acc = out.sumsq[(slot, kind)] = SumSq()
                acc.total += q
                acc.n += n_int
                continue
            m = out.moments.get((slot, kind))
            if m is None:
                m = out.moments[(slot, kind)] = MomentAccumulator()
            row = [0.0, s, q, -negmin, mx, nonzero, sat] if kind == Row.ACT else [0.0, s, q]
            m.add_row(n_int, row)
