"""Capture: what a watch's hooks do (module pre/post, gradient tensor hooks) and the dataflow it traces.

The module hooks are process-wide and find a watched module in ``registry`` (re-exported here: ``attach``,
``detach``, ``set_recording``...), so nothing is stored on the user's modules. Gradients are captured by tensor
hooks on module outputs, registered from the forward hook (``register_full_backward_hook`` breaks on in-place
ops). ``Capture`` turns what the hooks see into rows of the step buffer; it knows nothing of thresholds or of how
the rows are reduced.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._layers import gains
from .._stats import stats
from .._stats.stepbuffer import KERNEL_ROWS, STEP_SLOT, StepBuffer, Where
from .._vocab import Format, Role, Row
from ..errors import warn_self
from . import _compiled as compiled
from ._registry import _RECORDING, attach, detach, forget, global_hooks_installed, is_watched, set_recording  # noqa: F401 - the registry's functions, as capture.attach etc.
from .runtime import first_float_tensor, float_tensors, in_backward, in_functorch, iter_float_tensors, tracing

if TYPE_CHECKING:
    from .._layers.taxonomy import Slot

__all__ = ["Capture", "attach", "detach", "first_float_tensor", "forget", "global_hooks_installed", "in_backward",
           "in_functorch", "is_watched", "iter_float_tensors", "set_recording", "tracing"]

# ------------------------------------------------------------------ what the hooks do
_HIST_KINDS = (Row.ACT, Row.GRAD)
# how many forks lie between this process and the first one that imported torchdiag (``os.register_at_fork``): a
# capture made in one process is foreign in its forked children, told without a system call at each read
_FORKS = [0]


def _forked() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_forked)


def _grad_hook(cap_ref: weakref.ref, slot: int, kind: int, generation: int, grad: torch.Tensor) -> None:
    cap = cap_ref()
    if cap is not None and cap.generation == generation and cap.recording:
        if cap.scaler is not None and not cap.scale_written:
            cap.write_scale()
        cap.guarded(slot, cap.add, slot, kind, grad, None)


class Capture:
    """The hooks' side of a watch: turns each watched module's output, its gradient and a weighted layer's
    input into rows of the step buffer, and traces the dataflow that needs (which recorded output a layer
    reads, which layers feed a normalisation). The global hooks above call ``on_pre`` / ``on_forward``;
    gradients come through tensor hooks registered here. Which steps are recorded is the recorder's call:
    it sets ``recording``, ``histogram_step`` and ``generation`` and calls ``new_step``."""

    def __init__(self, slots: list[Slot], modules: list[nn.Module], buffer: StepBuffer,
                 on_auto_step: Callable[[], None]) -> None:
        self.slots = slots
        self.buffer = buffer
        self.scaler: torch.amp.GradScaler | None = None  # its scale is written with the step's first gradient row
        self.scale_written = False
        self.generation = 0  # of the step in progress: a gradient hook of an earlier step writes nothing
        self._recording = True
        # the process that entered the watch: in a forked child (a DataLoader worker running the watched model)
        # the watch records nothing, and nothing of it ends a step or writes (its writer's thread is not there)
        self._forks = _FORKS[0]
        self.histogram_step = False
        self.auto_step = True
        self.closed = False
        self.record_eval = False  # check(): an eval-mode model's forward is recorded too
        self.eval_skipped = 0  # forwards of the model in eval mode, not recorded (validation with grad enabled)
        self._on_auto_step = on_auto_step
        self.modules = [weakref.ref(m) for m in modules]
        self._ref = weakref.ref(self)  # what the gradient hooks hold: never the capture itself
        self.order: dict[int, int] = {}  # slot -> first-call position in this step
        # id(output tensor) -> (a weak reference to it, slot), of the module that ran last: an id alone could be a new
        # tensor's that took the address of one freed since
        self._outputs: dict[int, tuple[weakref.ref, int]] = {}
        # id(output) -> (weak ref, its _version, slot, where (device or KERNEL_ROWS), row start): every activation
        # row of this step
        self._rows: dict[int, tuple[weakref.ref, int, int, Where, int]] = {}
        self._root_called = False
        self._root_slot = self.root_slot = next((i for i, s in enumerate(slots) if s.is_root), None)
        # gradient hooks on tensors that outlive the step (a parameter returned through Identity / Dropout(0)):
        # removed when the step ends, or they would pile up one per step
        self._leaf_hooks: list[Any] = []
        self.gate: compiled.Gate | None = None  # what the compiled graphs read and add to (set by ``attach``)
        self.wrapped_calls = 0  # calls of the root through torch.compile(model)'s wrapper in this step
        # check(precision=): every output and gradient against this format (else half-precision ones against their
        # own dtype's), ``precision_scaled`` as an fp8 recipe would scale them
        self.precision: Format | None = None
        self.precision_scaled = False

    @property
    def recording(self) -> bool:
        """Whether the current step is recorded (set by the recorder); never in a process forked from the one that
        entered the watch."""
        return self._recording and _FORKS[0] == self._forks

    @recording.setter
    def recording(self, on: bool) -> None:
        self._recording = on

    @property
    def foreign(self) -> bool:
        """Running in another process than the one that entered the watch (a forked child)."""
        return _FORKS[0] != self._forks

    # ----------------------------------------------------------------- module hooks
    def on_wrapper(self, slot: int, module: nn.Module, entering: bool) -> None:
        """torch.compile(model)'s wrapper around the root, entered or left (eagerly): entering it is the root's
        forward for auto-steps (inside, the root's own pre-hook is traced, or skipped if it runs eagerly)."""
        if entering:
            self.on_pre(slot, module, wrapper=True)

    def on_pre(self, slot: int, module: nn.Module, wrapper: bool = False) -> None:
        """The root's forward pre-hook: a second training forward of the model ends the step (auto-step)."""
        info = self.slots[slot]
        if not wrapper and self.gate is not None and compiled.is_wrapped(self.gate.key):
            return  # the eager fallback of a compiled root: its wrapper's hook counted this forward
        if not info.is_root or self.closed or self.foreign:
            return
        if module.training and torch.is_grad_enabled() and not in_backward() and not in_functorch():
            if self.auto_step:
                if self._root_called:
                    self._on_auto_step()
                self._root_called = True
            if wrapper:  # (after the auto-step: counted in the step this forward belongs to)
                self.wrapped_calls += 1

    def on_forward(self, slot: int, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.recording or self.closed or not torch.is_grad_enabled() or tracing() or in_functorch():
            return  # (torch.func transforms: their tensors are wrappers that must not escape the transform)
        info = self.slots[slot]
        if info.disabled:
            return
        if not self.record_eval and self._root_slot is not None:
            root = self.modules[self._root_slot]()
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
            self.order.setdefault(slot, len(self.order))
            x = first_float_tensor(args)
            src = self._source(x) if x is not None else None
            if src is None and x is not None and x._base is not None:  # a view of it (flatten, reshape, transpose)
                src = self._source(x._base)
            if src is None and x is not None:
                # the unchanged output of a module that ran earlier: a module with children of its own (timm's
                # BatchNormAct2d runs its act inside) gets its input from the layer before its children ran
                earlier = self._producer(x)
                src = earlier[0] if earlier is not None else None
            outs = float_tensors(output)
            self._trace_norm_inputs(slot, info, module, src, outs)
            weighted_input = x if info.kind == Role.WEIGHTED else None  # a weighted layer's input tensor
            # looked up before this module's own rows: an in-place module's output is its input
            producer = self._producer(weighted_input) if weighted_input is not None else None
            rows = self._rows
            for t in outs:
                where, start = self.add(slot, Row.ACT, t, info.saturation)
                rows[id(t)] = (weakref.ref(t), t._version, slot, where, start)
                if t.requires_grad:
                    self._hook(t, partial(_grad_hook, self._ref, slot, Row.GRAD, self.generation))
            if weighted_input is not None:
                self._input_row(slot, weighted_input, src, producer)
        if info.is_root:
            for x in iter_float_tensors(args):
                self.buffer.write(slot, Row.ROOT_IN, x.numel(), x.device, [stats.sumsq(x)])
            for t in iter_float_tensors(output):
                if t.requires_grad:
                    self._hook(t, partial(_grad_hook, self._ref, slot, Row.ROOT_GRAD, self.generation))

    def _hook(self, t: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        """A gradient hook on ``t``. A hook on a tensor of this step's graph goes with the graph; one on a leaf
        (a parameter or other persistent tensor returned by the module) is removed when the step ends."""
        handle = t.register_hook(fn)
        if t.grad_fn is None:
            self._leaf_hooks.append(handle)

    # ----------------------------------------------------------------- dataflow tracing
    def _producer(self, x: torch.Tensor) -> tuple[int, Where, int] | None:
        """(slot, where its values are (a device or the host block), row start) of the recorded activation row of
        exactly this tensor, unchanged since."""
        entry = self._rows.get(id(x))
        if entry is None or entry[0]() is not x or entry[1] != x._version:
            return None  # not a watched module's output, or edited in place since its row was taken
        return entry[2:]

    def _input_row(self, slot: int, x: torch.Tensor, src: int | None, producer: tuple[int, Where, int] | None) -> None:
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
                self.buffer.point(slot, Row.INPUT, n, device, start, stats.MOMENT_COLS)  # r, sum(x - r), sum((x - r)^2)
                return
            if p.count_zeros:
                self.buffer.point(slot, Row.PROBE, n, device, start, stats.ACT_COLS)
                return
            p.count_zeros = True
        if src is not None and self.slots[src].kind == Role.ACTIVATION:
            self.buffer.write(slot, Row.INPUT, n, x.device, [stats.sumsq(x)])
        elif self.buffer.kernel_row(slot, Row.PROBE, x, zeros=True) is None:
            self.buffer.write(slot, Row.PROBE, n, x.device, stats.act_row(x, shift=False, zeros=True))

    def _trace_norm_inputs(self, slot: int, info: Slot, module: nn.Module, src: int | None,
                           outs: tuple[torch.Tensor, ...]) -> None:
        """Mark layers whose output goes straight (through dropout/identity) into a normalisation layer.

        ``src`` is the slot whose output this module's input is. Identity of the tensor object, not
        execution order: a residual branch's last conv runs just before the next block's norm, but
        what that norm reads is the sum, not the conv's output.
        """
        if info.kind in (Role.NORM, Role.PASSTHROUGH):
            if src is not None:
                if info.kind == Role.NORM:
                    if gains.normalises(module):
                        self.slots[src].feeds_norm = True
                else:
                    for t in outs:
                        self._outputs[id(t)] = (weakref.ref(t), src)
        if info.kind != Role.PASSTHROUGH:
            self._outputs = {id(t): (weakref.ref(t), slot) for t in outs}

    def _source(self, x: torch.Tensor) -> int | None:
        """The slot whose module's output ``x`` is, among the last module's outputs (and what passed through)."""
        entry = self._outputs.get(id(x))
        return entry[1] if entry is not None and entry[0]() is x else None

    # ----------------------------------------------------------------- rows
    def add(self, slot: int, kind: int, t: torch.Tensor, saturation: tuple[float, float] | None) -> tuple[Where, int]:
        """Write ``t``'s row; returns where its values are (its device, or the CPU kernel's host block) and where
        they start there."""
        info = self.slots[slot]
        hist = self.histogram_step and kind in _HIST_KINDS
        buf = self.buffer
        act = kind == Row.ACT
        start = buf.kernel_row(slot, kind, t, saturation if act else None, act and info.count_zeros)
        if start is not None:
            if hist:
                buf.write_hist(slot, kind, t, buf.kernel_row_values(start))
            if self.precision is not None:
                self._range(slot, kind, t)
            return KERNEL_ROWS, start
        if act:
            row = stats.act_row(t, saturation, shift=info.shift_act, zeros=info.count_zeros)
        else:
            row = stats.grad_row(t, shift=info.shift_grad, minmax=hist)
        start = buf.write(slot, kind, t.numel(), t.device, row)
        if hist:
            buf.write_hist(slot, kind, t, row)
        self._range(slot, kind, t)
        return t.device, start

    def _range(self, slot: int, kind: int, t: torch.Tensor) -> None:
        """A half-precision tensor's row against its dtype's range (``stats.range_row``); with ``precision`` set
        (``check(precision=)``), the bfloat16 tensors' against bfloat16, or every tensor's against a float8 format
        (scaled per tensor)."""
        fmt = stats.NARROW.get(t.dtype)
        if self.precision is not None and (self.precision_scaled or t.dtype == getattr(torch, self.precision.name)):
            fmt = self.precision  # fp8 asks of every tensor; bfloat16 of the layers that compute in it
        if fmt is None or kind not in _HIST_KINDS:
            return
        rkind = Row.ACT_RANGE if kind == Row.ACT else Row.GRAD_RANGE
        if (t.device.type == "cpu" and not self.precision_scaled and t.numel()
                and self.buffer.kernel_range_row(slot, rkind, t, fmt.max, fmt.floor)):
            return
        row = stats.range_row(t, fmt, scaled=self.precision_scaled)
        if row is not None:
            self.buffer.write(slot, rkind, t.numel(), t.device, row)

    def write_scale(self) -> None:
        """GradScaler's scale in effect for this step's backward (read in stream order, no sync)."""
        scale = getattr(self.scaler, "_scale", None)
        enabled = getattr(self.scaler, "is_enabled", lambda: True)()
        if isinstance(scale, torch.Tensor) and enabled:
            self.scale_written = True
            self.buffer.write(STEP_SLOT, Row.SCALE, 1, scale.device, [scale.reshape(()).clone()])  # update() edits it

    def guarded(self, slot: int, fn: Callable[..., None], *args: Any) -> None:
        """Run hook code; an error in torchdiag disables that layer and warns once, never reaching the user."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - torchdiag must never break the training step
            info = self.slots[slot]
            info.disabled = True
            warn_self(f"torchdiag: recording '{info.name}' ({info.module_type}) failed and is disabled for the"
                      f" rest of this watch: {type(e).__name__}: {e}")

    # ----------------------------------------------------------------- steps
    def new_step(self) -> None:
        """Forget this step's tracing (and its leaf hooks); the root's next forward starts no auto-step."""
        self.remove_leaf_hooks()
        self.scale_written = False
        self._outputs = {}
        self._rows = {}
        for slot in self.order:  # (the layers this step called: no other count moved)
            self.slots[slot].calls = 0
        self.order = {}
        self._root_called = False
        self.wrapped_calls = 0
        if self.gate is not None and self.gate.traced:
            self.gate.reset()

    def remove_leaf_hooks(self) -> None:
        hooks, self._leaf_hooks = self._leaf_hooks, []
        for h in hooks:
            h.remove()
