"""The recorder: the step state machine of a watch, which assembles each recorded step's ``StepStats``.

``capture.Capture`` (the hooks) writes rows into a ``stepbuffer.StepBuffer``; the recorder decides which
steps are recorded (its ``cadence.Cadence``: every N steps, or the time budget), which get histograms
(``vocab.histogram_window``), whether a step's host copy completes at once or at the next step's end
(``defer``), and the shift policy (moments about a shift where the last recorded step was ill-conditioned).
At the end of a recorded step it adds the weight rows, launches the one host copy, decodes it, reduces it
across ranks (``reducer``, a ``distributed.StepReducer``: every rank runs the collective at every recorded
step, also one where it ran nothing; histograms stay local) and hands the result to ``assemble`` for the
step's ``LayerStats`` and histograms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._capture.capture import Capture, set_recording
from .._layers.taxonomy import Slot
from .._reduce import distributed
from .._reduce.accumulators import MomentAccumulator
from .._reduce.dtensor import local_tensor
from .._stats import stats
from .._stats.stepbuffer import STEP_SLOT, Decoded, Pending, StepBuffer, arrive, decode, reduction_layout
from .._vocab import Row, StepStats, histogram_window
from ..errors import warn_self
from ._assemble import histograms, step_stats
from .cadence import Cadence

ACT, GRAD, WEIGHT, UPDATE, CLIP = Row.ACT, Row.GRAD, Row.WEIGHT, Row.UPDATE, Row.CLIP


class Recorder:
    """Steps of one watch; ``end_step`` returns a recorded step's ``StepStats`` (or None if not recorded)."""

    def __init__(self, slots: list[Slot], modules: list[nn.Module], cadence: Cadence | int,
                 on_auto_step: Callable[[], None], histogram_every: int = 0, defer: bool = False,
                 group: distributed.Group | None = None, schedule: dict[str, float] | None = None) -> None:
        """``defer``: complete each recorded step at the next one's end (a non-blocking copy on a GPU); ``group``:
        reduce recorded steps across its ranks, which first check that they share ``schedule`` (the settings every
        rank must agree on)."""
        self.slots = slots
        self.cadence = cadence if isinstance(cadence, Cadence) else Cadence(every=cadence)
        self.buffer = StepBuffer()
        self.capture = Capture(slots, modules, self.buffer, on_auto_step)
        self.capture.recording = self.cadence.decide(0)
        self.worked = False  # the step that just ended recorded, or completed a deferred recording
        # recorded steps are reduced across ranks
        self.reducer = (distributed.StepReducer(slots, group, schedule=schedule or {}, recorder=self)
                        if group is not None else None)
        self.histogram_every = histogram_every  # 0: no histograms
        self.step = 0
        self._hist_step = -1  # the last step that got histograms
        self.capture.histogram_step = self._histogram_due()
        self.defer = defer
        self._pending: Pending | None = None
        self.notes: list[str] = []  # for the report of the step just completed (a histogram not binned)
        self._layout: list | None = None  # what the reduction packs (reduction_layout), built at its first use
        self._signal_layout: list[tuple[tuple, type]] = []  # and the signals' figures (``reduce_also``)

    # what the hooks read, set by the Watcher
    @property
    def recording(self) -> bool:
        return self.capture.recording

    @property
    def closed(self) -> bool:
        return self.capture.closed

    @property
    def histogram_step(self) -> bool:
        return self.capture.histogram_step

    @histogram_step.setter
    def histogram_step(self, on: bool) -> None:
        self.capture.histogram_step = on

    @property
    def eval_skipped(self) -> int:
        return self.capture.eval_skipped

    # ----------------------------------------------------------------- rows from outside the hooks
    def write_update(self, slot: int, n: int, device: torch.device, vals: list[torch.Tensor]) -> None:
        """||w_new - w_old||^2 and ||w_old||^2 of one layer across an optimizer step."""
        self.buffer.write(slot, UPDATE, n, device, vals)

    def write_step_value(self, what: str, vals: list[torch.Tensor], device: torch.device) -> None:
        """Step-level rows: 'clip' = [sumsq before the user's clipping, sumsq the optimizer saw]."""
        self.buffer.write(STEP_SLOT, {"clip": CLIP, "scale": Row.SCALE}[what], 1, device, vals)

    def reduce_also(self, layout: list[tuple[tuple, type]]) -> None:
        """Signal figures (``StepBuffer.write_signal``) to reduce across ranks with the step's statistics: every key
        any rank may hold and its accumulator type, the same on every rank. A signal figure whose key is not in it
        (a loss) stays this rank's own."""
        self._signal_layout = list(layout)
        self._layout = None

    def _histogram_due(self) -> bool:
        """Histograms on the first recorded step of each window (``histogram_window``; under the time budget, its
        windows lengthened by the cadence's ``stretch``)."""
        he = self.histogram_every * self.cadence.stretch
        return bool(he) and self.recording and histogram_window(self.step, he) > histogram_window(self._hist_step, he)

    # ----------------------------------------------------------------- steps
    def end_step(self, reduce: bool = True) -> StepStats | None:
        """Close the current step; return the statistics that became ready, if any.

        Without deferral that is this step's, if it was recorded and saw any forward. With ``defer``
        (a GPU model, config ``defer_report``) this step's rows start their non-blocking copy to the
        host and the statistics returned are those of the previous recorded step, whose copy finished
        long ago; ``flush`` completes the last one. The ``StepStats`` returned carry their histograms if
        it was a histogram step. With a ``reducer`` (and ``reduce``) every recorded step joins the
        collective, also one in which this rank saw no forward, so that the other ranks' collective does
        not wait for it forever (deferral is the same on every rank: the same order).
        """
        result = None
        cap = self.capture
        self.worked = cap.recording
        try:
            pending, self._pending = self._pending, None
            if pending is not None:
                self.worked = True
                result = self._complete(pending, reduce)
            collective = reduce and self.reducer is not None
            self._check_compiled()
            if cap.recording and (cap.order or self._traced() or collective):
                pending = self._launch(with_histograms=cap.histogram_step, reduce=collective, defer=self.defer)
                if cap.histogram_step:
                    self._hist_step = self.step
                if self.defer:
                    self._pending = pending
                else:
                    result = self._complete(pending, reduce)
        finally:  # also when completing the step failed: the next step starts clean, numbered on
            cap.new_step()
            self.buffer.reset()
            self.step += 1
            cap.generation += 1
            cap.recording = self.cadence.decide(self.step)
            set_recording(cap, cap.recording and not cap.closed)
            cap.histogram_step = self._histogram_due()
        return result

    def flush(self, reduce: bool = True) -> StepStats | None:
        """Complete a deferred step now (waiting for its copy if it is still running); None if there is none.
        ``reduce=False``: this rank's own numbers, no collective (leaving the watch on an exception)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return self._complete(pending, reduce)

    def record_now(self) -> None:
        """Record the step in progress after all (a trip under the time budget), if it has not begun."""
        cap = self.capture
        if cap.recording or cap.closed or cap.order:
            return
        self.cadence.force(self.step)
        cap.recording = True
        set_recording(cap, True)
        cap.histogram_step = self._histogram_due()

    def close(self) -> None:
        """No more recording: the hooks ignore this watch from now on."""
        self.capture.closed = True
        set_recording(self.capture, False)
        self.capture.remove_leaf_hooks()

    def histograms_off(self) -> None:
        """No more histograms in this watch (nothing will write them: TensorBoard writing failed)."""
        self.histogram_every = 0
        self.histogram_step = False
        self.cadence.no_heavy()

    def take_notes(self) -> list[str]:
        """The notes for the report of the step just completed (a histogram not binned), handed over once."""
        notes, self.notes = self.notes, []
        return notes

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    def peek_possible(self) -> bool:
        if not self.recording:
            return False
        if self.capture.order:
            return True
        gate = self.capture.gate  # compiled graphs ran in this step: their calls counts (a read, not the hot path)
        return gate is not None and bool(gate.traced) and bool(gate.acc[:, 0, 0].any())

    def _traced(self) -> dict[int, int]:
        """Slots traced into a recorded compiled graph (``compiled``), in trace order."""
        gate = self.capture.gate
        return gate.traced if gate is not None else {}

    def _check_compiled(self) -> None:
        """A recorded step in which the root ran but nothing was recorded or traced: its compiled code was traced
        without the hooks (Dynamo does not guard on global hooks it did not see), so it runs without them: before
        this watch began, or after ``torch.compiler.reset()`` (which clears Dynamo's compile-start callback that
        puts the pre-hook back, ``globalhooks``) and a first call within one step no watch records. Said once."""
        cap = self.capture
        if not cap.recording or cap.order or self._traced() or getattr(self, "_said_stale", False):
            return
        root = cap.modules[cap.root_slot]() if cap.root_slot is not None else None
        # the root ran through torch.compile(model)'s wrapper, or it was compiled in place (model.compile(): no
        # hook runs eagerly at its forward, so that it ran at all cannot be seen)
        if cap.wrapped_calls or getattr(root, "_compiled_call_impl", None) is not None:
            self._said_stale = True
            what = next((s.module_type for s in self.slots if s.is_root), "the model")
            self.notes.append(
                f"{what} ran compiled code that torch.compile traced without torchdiag's hooks (before this watch"
                " began, or after torch.compiler.reset() within a step no watch recorded): it is not recorded"
                " (Dynamo does not retrace a graph when hooks are added). Start the watch before the compiled"
                " model's first call, or call torch.compiler.reset() after torchdiag.watch(...) to recompile it"
                " (that recompiles every compiled model of the process)")
            warn_self("torchdiag: " + self.notes[-1])

    def peek(self) -> StepStats | None:
        """This rank's own statistics of the step in progress (never a collective); the step is left as it was."""
        if not self.peek_possible():
            return None
        mark = self.buffer.mark()
        pending = self._launch(with_histograms=False, reduce=False, defer=False)
        self.buffer.rollback(mark)
        return self._complete(pending, reduce=False)

    def _launch(self, with_histograms: bool, reduce: bool, defer: bool) -> Pending:
        """Weight rows, then the step's one host copy (``StepBuffer.launch``)."""
        order = self.capture.order
        traced = self._traced()
        if traced:  # the compiled graphs' accumulator: its slots (those that did not run drop out in decode)
            order = dict(order)
            for slot in traced:
                order.setdefault(slot, len(order))
            cap = self.capture
            if cap.scaler is not None and not cap.scale_written:
                cap.write_scale()
            assert cap.gate is not None  # slots were traced into its graphs: there is a gate
            self.buffer.write_compiled(cap.gate.block())
        for slot in order:  # weights: once per step, on device, into the same buffer
            info = self.slots[slot]
            m = self.capture.modules[slot]()
            if info.weight_name is not None and m is not None:
                w = getattr(m, info.weight_name, None)
                w = local_tensor(w) if isinstance(w, torch.Tensor) else None  # FSDP2: this rank's shard
                if w is not None and w.numel() > 0 and w.layout == torch.strided \
                        and self.buffer.kernel_row(slot, WEIGHT, w) is None:
                    self.buffer.write(slot, WEIGHT, w.numel(), w.device, stats.grad_row(w, shift=info.shift_weight))
        buf = self.buffer
        pending = Pending(step=self.step, entries=buf.entries, order=dict(order),
                          calls={s: self.slots[s].calls for s in order}, reduce=reduce,
                          hist_entries=buf.hist_entries if with_histograms else [], signals=buf.signals)
        return buf.launch(pending, with_histograms=with_histograms, defer=defer)

    def _complete(self, pending: Pending, reduce: bool) -> StepStats | None:
        host, hist_host = arrive(pending)
        result, moms = self._merge(pending, decode(pending, host), reduce and pending.reduce)
        if pending.hist_entries and result is not None:
            result.histograms = histograms(self.slots, pending, hist_host, moms, self.notes)
        return result

    def _update_shifts(self, moms: dict[tuple[int, int], MomentAccumulator]) -> None:
        """Shift the next recorded step's moments only where this one was ill-conditioned."""
        for (slot, row_type), m in moms.items():
            if slot < 0 or row_type not in (ACT, GRAD, WEIGHT):
                continue
            bad = m.nonfinite > 0 or not abs(m.mean) <= stats.SHIFT_RATIO * m.std  # `not <=`: NaN is bad too
            if row_type == ACT:
                self.slots[slot].shift_act = bad
            elif row_type == GRAD:
                self.slots[slot].shift_grad = bad
            else:
                self.slots[slot].shift_weight = bad

    def _reduce(self, step: int, local: Decoded, reduce: bool) -> Decoded | None:
        """The step across ranks (``distributed.reduce``; the identity in a single process). None: no rank ran a
        watched layer (or, the reduction disabled, this one did not)."""
        if not (reduce and self.reducer is not None):
            self.cadence.agree(self.cadence.propose())
            return Decoded.from_accumulators(distributed.reduce(local.accumulators(), None))
        if self._layout is None:
            self._layout = reduction_layout(self.slots) + self._signal_layout
        reduced = self.reducer.reduce(step, local.accumulators(), self._layout, cadence=self.cadence)
        if reduced is None:
            out = local
        else:
            out = Decoded.from_accumulators(reduced)
            reduced_keys = {k for k, _ in self._signal_layout}
            out.signals.update({k: a for k, a in local.signals.items() if k not in reduced_keys})
        return out if out.order else None

    def _merge(self, pending: Pending, local: Decoded, reduce: bool = False) -> tuple[StepStats | None, dict]:
        """Accumulators -> per-layer statistics; with ``reduce``, of the global batch. Also returns this rank's
        own moments (for its histograms). None for a reduced step in which no rank ran a watched layer."""
        self._update_shifts(local.moments)
        step = self._reduce(pending.step, local, reduce)
        if step is None or not step.order:  # (a compiled step whose graphs did not run)
            return None, local.moments
        result = step_stats(self.slots, pending.step, step)
        result.signals = step.signals
        return result, local.moments
