"""The step buffer: on-device rows written by the hooks, one host copy per recorded step.

``Recorder`` receives tensors from the capture hooks and turns each into a short row of 0-d
moments on the tensor's device (``stats``); the row's values are kept (never the tensor) until
the end of a recorded step, when one ``stack`` per device gathers them and one copy brings them
to the host, where they are merged into per-layer ``diagnose.LayerStats``. Gathering at the end
instead of copying each row into a preallocated buffer saves a copy kernel per row (measured:
the per-row ``stack(out=buffer[i])`` was a third of the hook's host time on small layers).

On histogram steps (``histogram_every``) each activation and gradient also gets a
fixed-bin histogram computed on its device (``stats.histogram_row``) into a small per-device
buffer; it travels to the host in the same single copy as the statistics.

Under torch.distributed, ``reducer`` (a ``distributed.StepReducer``) turns each rank's merged
moments into the global ones between the host copy and the ``LayerStats``; every rank then runs
the collective at every recorded step, also one where it ran nothing. Histograms stay local.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from . import gains, stats
from .capture import first_float_tensor, in_backward, in_functorch, iter_float_tensors, set_recording, tracing
from .dtensor import local_tensor
from .errors import warn_self
from .vocab import Histogram, LayerStats, Moments, Row, StepStats, histogram_window

ACT, GRAD, INPUT, WEIGHT, PROBE = Row.ACT, Row.GRAD, Row.INPUT, Row.WEIGHT, Row.PROBE
ROOT_IN, ROOT_GRAD, UPDATE, CLIP, SCALE = Row.ROOT_IN, Row.ROOT_GRAD, Row.UPDATE, Row.CLIP, Row.SCALE
_STEP_SLOT = -1  # slot of step-level rows (CLIP, SCALE)
_HIST_KINDS = {ACT: "act", GRAD: "grad"}


@dataclass
class _Pending:
    """A recorded step whose rows are on their way to the host (or already there)."""

    step: int
    entries: list[tuple[int, int, int, torch.device, int, int]]
    order: dict[int, int]
    calls: dict[int, int]
    reduce: bool
    hentries: list[tuple[int, int, torch.device, int]]
    # per device: (device, pinned host tensor or list of floats, CUDA event or None, number of values, hist width)
    copies: list[tuple[torch.device, Any, Any, int, int]] = field(default_factory=list)


@dataclass
class Slot:
    """Static facts about one registered module (no reference to the module itself)."""

    name: str
    module_type: str
    kind: str  # 'weighted' | 'activation' | 'norm' | 'passthrough' | 'other'
    is_layer: bool  # reported as a layer (the root may be registered only for its input/output)
    is_root: bool = False
    saturation: tuple[float, float] | None = None  # (centre, half width) of the saturation test
    relu_family: bool = False
    nonlinearity: gains.Nonlinearity | None = None
    weight_name: str | None = None
    weight_shape: tuple[int, ...] | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    fans_note: str | None = None  # why the fans are unknown
    textbook: bool = True  # a Linear/Conv-like layer the fan_in rule applies to
    feeds_norm: bool = False  # its output was seen going straight into a normalisation layer
    pure: bool = False  # a torch built-in whose output is exactly what its kind says (no hidden activation)
    count_zeros: bool = False  # count zeros of its output (ReLU family, or a layer whose output feeds a probe)
    shift_act: bool = True  # take moments about a shift (first recorded step, or |mean| >> std last time)
    shift_grad: bool = True
    shift_weight: bool = True
    calls: int = 0
    disabled: bool = False


def describe(name: str, module: nn.Module, *, is_layer: bool, is_root: bool, saturation_level: float) -> Slot:
    if gains.is_norm(module):
        kind = "norm"
    elif gains.is_activation(module):
        kind = "activation"
    elif isinstance(module, gains.PASS_THROUGH):
        kind = "passthrough"
    elif _main_weight(module) is not None:
        kind = "weighted"
    else:
        kind = "other"
    relu = isinstance(module, gains.RELU_FAMILY)
    builtin = type(module).__module__.startswith("torch.")
    slot = Slot(name=name, module_type=type(module).__name__, kind=kind, is_layer=is_layer, is_root=is_root,
                relu_family=relu, count_zeros=relu, nonlinearity=gains.nonlinearity_of(module),
                pure=builtin and kind in ("weighted", "norm", "activation"))
    rng = gains.saturation_range(module)
    if rng is not None:
        slot.saturation = (rng[0], rng[1] * saturation_level)
    lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False))
    w = None if lazy else _main_weight(module) or _norm_weight(module)
    if w is not None:
        slot.weight_name, p = w
        slot.weight_shape = tuple(p.shape)
    if kind == "weighted":  # fans per module kind, as torch.nn.init computes them; never guessed
        fans, slot.fans_note = gains.fans_or_reason(module)
        f = (fans or {}).get(slot.weight_name) if slot.weight_name else None
        if f is not None:
            slot.fan_in, slot.fan_out = f
        slot.textbook = not isinstance(module, gains.NO_TEXTBOOK)
    return slot


def _main_weight(module: nn.Module) -> tuple[str, torch.Tensor] | None:
    if gains.is_norm(module):
        return None
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and not isinstance(w, nn.parameter.UninitializedParameter) and w.dim() >= 2:
        return "weight", w
    own = [(n, p) for n, p in module.named_parameters(recurse=False)
           if not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() >= 2]
    return max(own, key=lambda t: t[1].numel()) if own else None


def _norm_weight(module: nn.Module) -> tuple[str, torch.Tensor] | None:
    w = getattr(module, "weight", None)
    return ("weight", w) if isinstance(w, torch.Tensor) and w.dim() >= 1 else None


def _grad_hook(rec_ref: weakref.ref, slot: int, kind: int, generation: int, grad: torch.Tensor) -> None:
    rec = rec_ref()
    if rec is not None and rec.generation == generation and rec.recording:
        if rec.scaler is not None and not rec.scale_written:
            rec.write_scale()
        rec.guarded(slot, rec.add, slot, kind, grad, None)


class Recorder:
    """Collects one step's rows; ``end_step`` returns its ``StepStats`` (or None if not recorded)."""

    def __init__(self, slots: list[Slot], modules: list[nn.Module], every: int,
                 on_auto_step: Callable[[], None], histogram_every: int = 0) -> None:
        self.slots = slots
        self.every = every
        self.scaler: Any = None  # a GradScaler: gradient rows are divided by its scale on the host
        self.reducer: Any = None  # a distributed.StepReducer: recorded steps are reduced across ranks
        self.scale_written = False
        self.histogram_every = histogram_every  # 0: no histograms
        self.step = 0
        self.generation = 0
        self.recording = True
        self.auto_step = True
        self.closed = False
        self._on_auto_step = on_auto_step
        self._weights = [weakref.ref(m) for m in modules]
        self._ref = weakref.ref(self)  # what the gradient hooks hold: never the recorder itself
        self._values: dict[torch.device, list[torch.Tensor]] = {}  # this step's rows (0-d or 1-D), per device
        self._sizes: dict[torch.device, int] = {}  # number of values in them
        self._entries: list[tuple[int, int, int, torch.device, int, int]] = []
        self._order: dict[int, int] = {}
        self._outputs: dict[int, int] = {}  # id(output tensor) -> slot, of the module that ran last
        # id(output) -> (weak ref, its _version, slot, device, row start): every activation row of this step
        self._rows: dict[int, tuple[weakref.ref, int, int, torch.device, int]] = {}
        self._root_called = False
        # histograms: rows [lo, hi, counts...] in a second per-device buffer, on histogram steps only
        self._hbuffers: dict[torch.device, torch.Tensor] = {}
        self._hused: dict[torch.device, int] = {}
        self._hentries: list[tuple[int, int, torch.device, int]] = []
        self._hist_window = -1  # step // histogram_every of the last step that got histograms
        self.histogram_step = self._histogram_due()
        self.defer = False  # complete each recorded step at the next one's end (non-blocking copy on a GPU)
        self._pending: _Pending | None = None
        self.record_eval = False  # check(): an eval-mode model's forward is recorded too
        self.eval_skipped = 0  # forwards of the model in eval mode, not recorded (validation with grad enabled)
        self._root_slot = next((i for i, s in enumerate(slots) if s.is_root), None)
        # gradient hooks on tensors that outlive the step (a parameter returned through Identity / Dropout(0)):
        # removed when the step ends, or they would pile up one per step
        self._leaf_hooks: list[Any] = []
        self.notes: list[str] = []  # for the report of the step just completed (a histogram not binned)

    # ----------------------------------------------------------------- hooks
    def on_pre(self, slot: int, module: nn.Module) -> None:
        info = self.slots[slot]
        if not info.is_root or self.closed or not self.auto_step:
            return
        if module.training and torch.is_grad_enabled() and not in_backward() and not in_functorch():
            if self._root_called:
                self._on_auto_step()
            self._root_called = True

    def on_forward(self, slot: int, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.recording or self.closed or not torch.is_grad_enabled() or tracing() or in_functorch():
            return  # (torch.func transforms: their tensors are wrappers that must not escape the transform)
        info = self.slots[slot]
        if info.disabled:
            return
        if not self.record_eval and self._root_slot is not None:
            root = self._weights[self._root_slot]()
            if root is not None and not root.training:  # validation without no_grad: not the training step
                if slot == self._root_slot:
                    self.eval_skipped += 1
                return
        if in_backward() and (info.calls > 0 or info.is_root):
            # activation checkpointing re-running a forward already recorded (non-reentrant); a reentrant
            # checkpoint's first forward ran under no_grad, so its re-run inside backward is the one recorded
            return
        self.guarded(slot, self._forward, slot, info, module, args, output)

    def _forward(self, slot: int, info: Slot, module: nn.Module, args: tuple, output: Any) -> None:
        if info.is_layer:
            info.calls += 1
            self._order.setdefault(slot, len(self._order))
            x = first_float_tensor(args)
            src = self._outputs.get(id(x)) if x is not None else None
            if src is None and x is not None and x._base is not None:  # a view of it (flatten, reshape, transpose)
                src = self._outputs.get(id(x._base))
            self._trace_norm_inputs(slot, info, module, src, output)
            weighted_input = info.kind == "weighted" and x is not None
            # looked up before this module's own rows: an in-place module's output is its input
            producer = self._producer(x) if weighted_input else None
            rows = self._rows
            for t in iter_float_tensors(output):
                start = self.add(slot, ACT, t, info.saturation)
                rows[id(t)] = (weakref.ref(t), t._version, slot, t.device, start)
                if t.requires_grad:
                    self._hook(t, partial(_grad_hook, self._ref, slot, GRAD, self.generation))
            if weighted_input:
                self._input_row(slot, x, src, producer)
        if info.is_root:
            for x in iter_float_tensors(args):
                self._write(slot, ROOT_IN, x.numel(), x.device, [stats.sumsq(x)])
            for t in iter_float_tensors(output):
                if t.requires_grad:
                    self._hook(t, partial(_grad_hook, self._ref, slot, ROOT_GRAD, self.generation))

    def _hook(self, t: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        """A gradient hook on ``t``. A hook on a tensor of this step's graph goes with the graph; one on a leaf
        (a parameter or other persistent tensor returned by the module) is removed when the step ends."""
        handle = t.register_hook(fn)
        if t.grad_fn is None:
            self._leaf_hooks.append(handle)

    def _producer(self, x: torch.Tensor) -> tuple[int, torch.device, int] | None:
        """(slot, device, row start) of the recorded activation row of exactly this tensor, unchanged since."""
        entry = self._rows.get(id(x))
        if entry is None or entry[0]() is not x or entry[1] != x._version:
            return None  # not a watched module's output, or edited in place since its row was taken
        return entry[2:]

    def _input_row(self, slot: int, x: torch.Tensor, src: int | None,
                   producer: tuple[int, torch.device, int] | None) -> None:
        """A weighted layer's input: its rms, and (when no activation module produced it) its range and zeros,
        which tell which functional activation (F.relu, torch.tanh...) ran before the layer.

        When the input is a recorded output of a watched module, its row already holds all of that: the
        entry points at it and no kernel runs. A built-in activation, norm or weighted layer's output had no
        functional activation applied after it, so its sum of squares is enough; for any other producer
        (dropout, a custom module) its row is the probe, which needs zeros counted there: the first call
        switches that on for the producer and probes this once.
        """
        n = x.numel()
        if producer is not None:
            pslot, device, start = producer
            p = self.slots[pslot]
            if p.pure:
                self._entries.append((slot, INPUT, n, device, start, 3))  # [shift, sum, sum of squares] about it
                return
            if p.count_zeros:
                self._entries.append((slot, PROBE, n, device, start, stats.ACT_COLS))
                return
            p.count_zeros = True
        if src is not None and self.slots[src].kind == "activation":
            self._write(slot, INPUT, n, x.device, [stats.sumsq(x)])
        else:
            self._write(slot, PROBE, n, x.device, stats.act_row(x, shift=False, zeros=True))

    def _trace_norm_inputs(self, slot: int, info: Slot, module: nn.Module, src: int | None, output: Any) -> None:
        """Mark layers whose output goes straight (through dropout/identity) into a normalisation layer.

        ``src`` is the slot whose output this module's input is. Identity of the tensor object, not
        execution order: a residual branch's last conv runs just before the next block's norm, but
        what that norm reads is the sum, not the conv's output.
        """
        if info.kind in ("norm", "passthrough"):
            if src is not None:
                if info.kind == "norm":
                    if gains.normalises(module):
                        self.slots[src].feeds_norm = True
                else:
                    for t in iter_float_tensors(output):
                        self._outputs[id(t)] = src
        if info.kind != "passthrough":
            self._outputs = {id(t): slot for t in iter_float_tensors(output)}

    def add(self, slot: int, kind: int, t: torch.Tensor, saturation: tuple[float, float] | None) -> int:
        """Write ``t``'s row; returns where its values start in this step's values of its device."""
        info = self.slots[slot]
        hist = self.histogram_step and kind in _HIST_KINDS
        if kind == ACT:
            row = stats.act_row(t, saturation, shift=info.shift_act, zeros=info.count_zeros)
        else:
            row = stats.grad_row(t, shift=info.shift_grad, minmax=hist)
        start = self._write(slot, kind, t.numel(), t.device, row)
        if hist:
            self._write_hist(slot, kind, t, row)
        return start

    def guarded(self, slot: int, fn: Callable[..., None], *args: Any) -> None:
        """Run hook code; an error in torchdiag disables that layer and warns once, never reaching the user."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - torchdiag must never break the training step
            info = self.slots[slot]
            info.disabled = True
            warn_self(f"torchdiag: recording '{info.name}' ({info.module_type}) failed and is disabled for the"
                      f" rest of this watch: {type(e).__name__}: {e}", stacklevel=2)

    def _write(self, slot: int, kind: int, n: int, device: torch.device,
               vals: list[torch.Tensor] | torch.Tensor) -> int:
        """Keep a row until the step ends; returns where its values start among this step's on ``device``.

        A row is 0-d float32 tensors (``stats``' ATen path) or one 1-D float32 tensor (the fused kernel).
        They stay where the kernels put them (they are allocated anyway) until the step ends, when one
        stack (or cat) per device gathers them: no copy kernel per row, no host sync.
        """
        values = self._values.setdefault(device, [])
        start = self._sizes.get(device, 0)
        if isinstance(vals, torch.Tensor):
            values.append(vals)
            width = vals.numel()
        else:
            values.extend(vals)
            width = len(vals)
        self._sizes[device] = start + width
        self._entries.append((slot, kind, n, device, start, width))
        return start

    def write_update(self, slot: int, n: int, device: torch.device, vals: list[torch.Tensor]) -> None:
        """||w_new - w_old||^2 and ||w_old||^2 of one layer across an optimizer step."""
        self._write(slot, UPDATE, n, device, vals)

    def write_step_value(self, what: str, vals: list[torch.Tensor], device: torch.device) -> None:
        """Step-level rows: 'clip' = [sumsq before the user's clipping, sumsq the optimizer saw]."""
        self._write(_STEP_SLOT, {"clip": CLIP, "scale": SCALE}[what], 1, device, vals)

    def write_scale(self) -> None:
        """GradScaler's scale in effect for this step's backward (read in stream order, no sync)."""
        scale = getattr(self.scaler, "_scale", None)
        enabled = getattr(self.scaler, "is_enabled", lambda: True)()
        if isinstance(scale, torch.Tensor) and enabled:
            self.scale_written = True
            self._write(_STEP_SLOT, SCALE, 1, scale.device, [scale.reshape(()).clone()])  # update() edits in place

    def _write_hist(self, slot: int, kind: int, t: torch.Tensor, row: list[torch.Tensor] | torch.Tensor) -> None:
        device = t.device
        buf = self._hbuffers.get(device)
        used = self._hused.get(device, 0)
        if buf is None or used == buf.shape[0]:
            # counts in float64 (exact past 2**24 elements per bin); MPS has no float64
            dtype = torch.float32 if device.type == "mps" else torch.float64
            new = torch.zeros((max(16, 2 * used), stats.HIST_BINS + 2), dtype=dtype, device=device)
            if buf is not None:
                new[:used].copy_(buf[:used])
            self._hbuffers[device] = buf = new
        stats.histogram_row(t, row, buf[used])
        self._hused[device] = used + 1
        self._hentries.append((slot, kind, device, used))

    def _histogram_due(self) -> bool:
        """Histograms on the first recorded step of each window (``histogram_window``)."""
        he = self.histogram_every
        return bool(he) and self.recording and histogram_window(self.step, he) > self._hist_window

    # ----------------------------------------------------------------- steps
    def end_step(self, reduce: bool = True) -> StepStats | None:
        """Close the current step; return the statistics that became ready, if any.

        Without deferral that is this step's, if it was recorded and saw any forward. With ``defer``
        (a GPU model, config ``defer_report``) this step's rows start their non-blocking copy to the
        host and the statistics returned are those of the previous recorded step, whose copy finished
        long ago; ``flush`` completes the last one. The ``StepStats`` returned carry their histograms if it
        was a histogram step. With a ``reducer`` (and ``reduce``) every recorded
        step joins the collective, also one in which this rank saw no forward, so that the other ranks'
        collective does not wait for it forever (deferral is the same on every rank: the same order).
        """
        result = None
        try:
            pending, self._pending = self._pending, None
            if pending is not None:
                result = self._complete(pending, reduce)
            collective = reduce and self.reducer is not None
            if self.recording and (self._order or collective):
                pending = self._launch(with_histograms=self.histogram_step, reduce=collective, defer=self.defer)
                if self.histogram_step:
                    self._hist_window = histogram_window(self.step, self.histogram_every)
                if self.defer:
                    self._pending = pending
                else:
                    result = self._complete(pending, reduce)
        finally:  # also when completing the step failed: the next step starts clean, numbered on
            self._reset()
            self.step += 1
            self.generation += 1
            self.recording = self.step % self.every == 0
            set_recording(self, self.recording and not self.closed)
            self.histogram_step = self._histogram_due()
            self._root_called = False
        return result

    def flush(self, reduce: bool = True) -> StepStats | None:
        """Complete a deferred step now (waiting for its copy if it is still running); None if there is none.
        ``reduce=False``: this rank's own numbers, no collective (leaving the watch on an exception)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return self._complete(pending, reduce)

    def close(self) -> None:
        """No more recording: the hooks ignore this recorder from now on."""
        self.closed = True
        set_recording(self, False)
        self._remove_leaf_hooks()

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    def peek_possible(self) -> bool:
        return self.recording and bool(self._order)

    def peek(self) -> StepStats | None:
        """This rank's own statistics of the step in progress (never a collective); the step is left as it was."""
        if not (self.recording and self._order):
            return None
        lengths, sizes, n_entries = {d: len(v) for d, v in self._values.items()}, dict(self._sizes), len(self._entries)
        pending = self._launch(with_histograms=False, reduce=False, defer=False)
        self._entries = self._entries[:n_entries]
        self._values = {d: v[: lengths.get(d, 0)] for d, v in self._values.items()}
        self._sizes = {d: sizes.get(d, 0) for d in self._values}
        return self._complete(pending, reduce=False)

    def _remove_leaf_hooks(self) -> None:
        hooks, self._leaf_hooks = self._leaf_hooks, []
        for h in hooks:
            h.remove()

    def _reset(self) -> None:
        self._remove_leaf_hooks()
        self.scale_written = False
        self._outputs = {}
        self._rows = {}
        self._entries = []
        self._order = {}
        self._values = {}
        self._sizes = {}
        self._hentries = []
        for d in self._hused:
            self._hused[d] = 0
        for s in self.slots:
            s.calls = 0

    def _launch(self, with_histograms: bool, reduce: bool, defer: bool) -> _Pending:
        """Weight rows, then per device one stack of the step's values (histogram rows appended) and its copy
        to the host: a blocking ``tolist`` or, with ``defer`` on a GPU, a non-blocking copy into pinned memory."""
        for slot in self._order:  # weights: once per step, on device, into the same buffer
            info = self.slots[slot]
            m = self._weights[slot]()
            if info.weight_name is not None and m is not None:
                w = getattr(m, info.weight_name, None)
                w = local_tensor(w) if isinstance(w, torch.Tensor) else None  # FSDP2: this rank's shard
                if w is not None and w.numel() > 0 and w.layout == torch.strided:
                    self._write(slot, WEIGHT, w.numel(), w.device, stats.grad_row(w, shift=info.shift_weight))
        pending = _Pending(step=self.step, entries=self._entries, order=dict(self._order),
                           calls={s: self.slots[s].calls for s in self._order}, reduce=reduce,
                           hentries=self._hentries if with_histograms else [])
        for d, values in self._values.items():
            if not values:
                continue
            if all(v.dim() == 0 for v in values):
                flat = torch.stack(values)
            else:
                flat = torch.cat([v.view(1) if v.dim() == 0 else v for v in values])
            hused = self._hused.get(d, 0) if with_histograms else 0
            width = self._hbuffers[d].shape[1] if hused else 0
            if hused:
                hbuf = self._hbuffers[d][:hused]
                flat = torch.cat((flat.to(hbuf.dtype), hbuf.reshape(-1)))
            if defer and d.type == "cuda":
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(d))
                pending.copies.append((d, host, event, self._sizes[d], width))
            else:
                pending.copies.append((d, flat.tolist(), None, self._sizes[d], width))
        return pending

    def _complete(self, pending: _Pending, reduce: bool) -> StepStats | None:
        host: dict[torch.device, list] = {}
        hhost: dict[torch.device, list] = {}
        for d, data, event, split, width in pending.copies:
            if event is not None:
                if not event.query():  # still running (report() right after a step): wait for it
                    event.synchronize()
                data = data.tolist()
            host[d] = data[:split]
            if width:
                hhost[d] = [data[i:i + width] for i in range(split, len(data), width)]
        result, moms = self._merge(pending, host, reduce and pending.reduce)
        if pending.hentries and result is not None:
            result.histograms = self._histograms(pending, hhost, moms)
        return result

    def _histograms(self, pending: _Pending, hhost: dict, moms: dict) -> list[Histogram]:
        rows: dict[tuple[int, int], list[list[float]]] = {}
        for slot, kind, device, row in pending.hentries:
            if device in hhost:
                rows.setdefault((slot, kind), []).append(hhost[device][row])
        out = []
        for slot in pending.order:
            for kind, label in _HIST_KINDS.items():
                rs = rows.get((slot, kind))
                m = moms.get((slot, kind))
                if not rs or m is None or m.n == 0:
                    continue  # not recorded
                if not all(math.isfinite(r[0]) and math.isfinite(r[1]) for r in rs):
                    if math.isfinite(m.min) and math.isfinite(m.max):  # finite, but too wide to bin in float32
                        self.notes.append(f"'{self.slots[slot].name}': no {label} histogram at step {pending.step}:"
                                          f" its range [{m.min:.3g}, {m.max:.3g}] is too wide to bin in float32")
                    continue  # NaN/Inf in the tensor: no meaningful bins (its flag says so)
                lo, hi, counts = stats.merge_histograms(rs)
                bins = len(counts)
                edges = [lo + (hi - lo) * i / bins for i in range(bins)] + [hi]
                out.append(Histogram(layer=self.slots[slot].name, kind=label, min=m.min, max=m.max, num=m.n,
                                     sum=m.mean * m.n, sum_squares=m.m2 + m.n * m.mean * m.mean,
                                     edges=edges, counts=counts))
        return out

    def _update_shifts(self, moms: dict[tuple[int, int], stats.Moments]) -> None:
        """Shift the next recorded step's moments only where this one was ill-conditioned."""
        for (slot, kind), m in moms.items():
            if slot < 0 or kind not in (ACT, GRAD, WEIGHT):
                continue
            bad = m.nonfinite > 0 or not abs(m.mean) <= stats.SHIFT_RATIO * m.std  # `not <=`: NaN is bad too
            if kind == ACT:
                self.slots[slot].shift_act = bad
            elif kind == GRAD:
                self.slots[slot].shift_grad = bad
            else:
                self.slots[slot].shift_weight = bad

    def _merge(self, pending: _Pending, host: dict, reduce: bool = False) -> tuple[StepStats | None, dict]:
        """Rows -> per-layer statistics; with ``reduce``, of the global batch. Also returns this rank's own
        moments (for its histograms). None for a reduced step in which no rank ran a watched layer."""
        moms: dict[tuple[int, int], stats.Moments] = {}
        sq: dict[tuple[int, int], list[float]] = {}
        updates: dict[int, list[float]] = {}
        clip: list[float] | None = None
        scale = None
        for slot, kind, n, device, row, width in pending.entries:
            vals = host[device][row:row + width]
            if kind in (INPUT, ROOT_IN):
                acc = sq.setdefault((slot, kind), [0.0, 0])
                if width == 1:
                    acc[0] += vals[0]
                else:  # the producer's row, [r, sum(x - r), sum((x - r)^2)]: sum(x^2) = M2 + n * mean^2
                    r, sd, sdd = vals
                    mean = r + sd / n
                    acc[0] += max(sdd - sd * sd / n, 0.0) + n * mean * mean
                acc[1] += n
            elif kind == UPDATE:
                updates[slot] = [vals[0], vals[1], n]
            elif kind == CLIP:
                clip = vals
            elif kind == SCALE:
                scale = vals[0] if scale is None else scale
            else:
                moms.setdefault((slot, kind), stats.Moments()).add_row(n, vals)
        if scale is not None and math.isfinite(scale) and scale > 0:
            for (_slot, kind), m in moms.items():
                if kind in (GRAD, ROOT_GRAD):
                    m.rescale(1.0 / scale)
        self._update_shifts(moms)
        local_moms, order, calls = moms, pending.order, pending.calls
        if reduce and self.reducer is not None:
            reduced = self.reducer.reduce(pending.step, moms, sq, updates, clip, scale, order, calls)
            if reduced is not None:
                moms, sq, updates, clip, scale, order, calls = reduced
            if not order:  # no rank ran a watched layer (or, reduction disabled, this one did not)
                return None, local_moms
        layers = []
        root_in = root_grad = None
        for slot, index in order.items():
            info = self.slots[slot]
            act, grad, w = (moms.get((slot, k)) for k in (ACT, GRAD, WEIGHT))
            inp = _input_sumsq(sq.get((slot, INPUT)), moms.get((slot, PROBE)))
            layers.append(LayerStats(
                name=info.name, module_type=info.module_type, index=index, calls=calls[slot], kind=info.kind,
                act=_moments(act, with_act=True, with_sat=info.saturation is not None), grad=_moments(grad),
                weight_shape=info.weight_shape,
                input_rms=math.sqrt(inp[0] / inp[1]) if inp and inp[1] else None,
                input_probe=_moments(moms.get((slot, PROBE)), with_act=True),
                weight_std=w.std if w else None, weight_rms=w.rms if w else None,
                fan_in=info.fan_in, fan_out=info.fan_out, fans_note=info.fans_note, textbook=info.textbook,
                feeds_norm=info.feeds_norm,
                nonlinearity=info.nonlinearity,
                relu_family=info.relu_family, bounded=info.saturation is not None,
                update_ratio=_ratio(updates.get(slot)),
                update_base_rms=_base_rms(updates.get(slot)),
            ))
        for slot, info in enumerate(self.slots):
            if info.is_root:
                r = sq.get((slot, ROOT_IN))
                root_in = math.sqrt(r[0] / r[1]) if r and r[1] else None
                g = moms.get((slot, ROOT_GRAD))
                root_grad = g.std if g else None
        not_called = [s.name for i, s in enumerate(self.slots) if s.is_layer and i not in order]
        result = StepStats(layers=layers, step=pending.step, input_rms=root_in, output_grad_std=root_grad,
                           not_called=not_called, amp_scale=scale)
        if clip is not None:
            pre = clip[0] / (scale * scale) if scale else clip[0]
            result.grad_norm_preclip, result.grad_norm_postclip = math.sqrt(max(pre, 0.0)), math.sqrt(max(clip[1], 0.0))
        return result, local_moms


def _input_sumsq(acc: list[float] | None, probe: stats.Moments | None) -> list[float] | None:
    """[sum of squares, n] of a weighted layer's inputs: calls fed by an activation module wrote only a sum
    of squares, the others a probe row whose moments give it."""
    if probe is None or probe.n == 0:
        return acc
    total = [probe.m2 + probe.n * probe.mean * probe.mean, probe.n]
    return [acc[0] + total[0], acc[1] + total[1]] if acc else total


def _base_rms(vals: list[float] | None) -> float | None:
    """rms of the weights before the update: ``[dd, ww, n]`` (n elements; summed over shards and ranks)."""
    if vals is None or not vals[2]:
        return None
    return math.sqrt(vals[1] / vals[2])


def _ratio(vals: list[float] | None) -> float | None:
    if vals is None:
        return None
    dd, ww = vals[:2]
    return math.sqrt(dd / ww) if ww > 0 else None  # from all-zero weights there is no ratio


def _moments(m: stats.Moments | None, with_act: bool = False, with_sat: bool = False) -> Moments | None:
    if m is None or m.n == 0:
        return None
    zero = m.zeros / m.n if with_act else None
    sat = m.saturated / m.n if with_sat else None
    return Moments(n=m.n, mean=m.mean, std=m.std, rms=m.rms, absmax=m.absmax, nonfinite=m.nonfinite > 0,
                   min=m.min if math.isfinite(m.min) else None, max=m.max if math.isfinite(m.max) else None,
                   zero_fraction=zero, saturated_fraction=sat)
