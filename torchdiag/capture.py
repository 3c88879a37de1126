"""Capture: every hook of a watch (module pre/post, gradient tensor hooks) and the dataflow it traces.

Module hooks are registered once for the whole process
(``torch.nn.modules.module.register_module_forward_hook``) and look the module up in a
``WeakKeyDictionary``. Nothing is stored on the user's modules, so ``copy.deepcopy`` (EMA
models), ``pickle`` and ``torch.save`` work inside a watch, and a copy is not recorded.
Gradients are captured by tensor hooks on module outputs, registered from the forward
hook (``register_full_backward_hook`` breaks on in-place ops). ``Capture`` turns what the hooks see into
rows of the step buffer; it knows nothing of thresholds or of how the rows are reduced.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from . import compiled, gains, stats
from .errors import TorchDiagError, warn_self
from .runtime import first_float_tensor, in_backward, in_functorch, is_compiling, iter_float_tensors, tracing
from .stepbuffer import STEP_SLOT, StepBuffer
from .vocab import Role, Row

__all__ = ["Capture", "attach", "detach", "first_float_tensor", "forget", "global_hooks_installed", "in_backward",
           "in_functorch", "is_watched", "iter_float_tensors", "set_recording", "tracing"]

# module -> (weak reference to its watch's Capture, slot index)
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int]] = weakref.WeakKeyDictionary()
_HANDLES: list[Any] = []
# the watched roots alone: the pre hook, which only counts steps at a root's forward, looks here
_ROOTS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int]] = weakref.WeakKeyDictionary()
# id() of the captures whose current step is recorded: on other steps the forward hook returns at once
_RECORDING: set[int] = set()


# id(module) -> the finalizer that forgets its compiled plan if it is garbage-collected while watched
_FINALIZERS: dict[int, Any] = {}


def set_recording(cap: Any, on: bool) -> None:
    """Whether ``cap``'s forward hook work is on (its current step is recorded): for the eager hooks, and for
    the compiled graphs (a guard on ``gate.on``: the recorded graph or the model's own)."""
    if on:
        _RECORDING.add(id(cap))
    else:
        _RECORDING.discard(id(cap))
    gate = getattr(cap, "gate", None)
    if gate is not None:
        gate.on = on


def _pre_hook(module: nn.Module, args: tuple) -> None:
    if is_compiling():  # Dynamo traces this: the compiled path, no graph break (``compiled``)
        compiled.on_pre(module, args)
        return
    entry = _ROOTS.get(module)
    if entry is None:
        if module.__class__.__name__ == "OptimizedModule":  # torch.compile(model): its wrapper runs eagerly
            _wrapper(module, True)
        return
    rec = entry[0]()
    if rec is not None:
        rec.on_pre(entry[1], module)


def _wrapper(module: nn.Module, entering: bool) -> None:
    """torch.compile(model)'s wrapper around a watched root: its forward starts a step (auto-step), eagerly,
    before the compiled graph runs; the root's own pre-hook, traced into that graph, cannot."""
    key = compiled.wrapper_call(module, entering)
    inner = module._modules.get("_orig_mod")
    entry = _ROOTS.get(inner) if key is not None and inner is not None else None
    rec = entry[0]() if entry is not None else None
    if rec is not None:
        rec.on_wrapper(entry[1], inner, entering)


def _post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    if is_compiling():
        return compiled.on_forward(module, args, output)  # the output, tapped for its gradient (or None)
    if not _RECORDING:  # no watch records this step: every module call of the model passes here
        if module.__class__.__name__ == "OptimizedModule":
            _wrapper(module, False)
        return
    entry = _REGISTRY.get(module)
    if entry is not None:
        rec = entry[0]()
        if rec is not None:
            rec.on_forward(entry[1], module, args, output)
    elif module.__class__.__name__ == "OptimizedModule":
        _wrapper(module, False)


def attach(cap: Any, modules: list[nn.Module], roots: list[int] = ()) -> None:
    """Register ``modules`` (slot i = modules[i]) for ``cap`` (a ``Capture``), ``modules[i]`` for i in ``roots`` as the
    model whose forward starts a step; install the global hooks once."""
    taken = [m for m in modules if is_watched(m)]
    if taken:
        raise TorchDiagError(
            f"{type(taken[0]).__name__} is already watched by another torchdiag.watch; nested or "
            "concurrent watches of the same modules are not supported: leave the first watch before starting another"
        )
    ref = weakref.ref(cap)
    for i, m in enumerate(modules):
        _REGISTRY[m] = (ref, i)
    for i in roots:
        _ROOTS[modules[i]] = (ref, i)
    cap.gate = compiled.new_gate(len(modules), _device_of(modules), cap.record_eval)
    cap.gate.capture = ref
    for i, m in enumerate(modules):
        compiled.register(id(m), compiled.plan_for(i, cap.slots[i], cap.gate))
        _FINALIZERS[id(m)] = weakref.finalize(m, compiled.forget_module, id(m))
    weakref.finalize(cap, compiled.drop_gate, cap.gate.key)
    if not _HANDLES:
        _HANDLES.append(nn.modules.module.register_module_forward_pre_hook(_pre_hook))
        _HANDLES.append(nn.modules.module.register_module_forward_hook(_post_hook))


def _device_of(modules: list[nn.Module]) -> torch.device:
    """Where the compiled accumulator lives: the device of the model's first parameter or buffer."""
    for m in modules:
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if not nn.parameter.is_lazy(t):
                return t.device
    return torch.device("cpu")


def detach(modules: list[weakref.ref]) -> None:
    """Unregister modules; remove the global hooks when no module is watched any more."""
    for r in modules:
        m = r()
        if m is not None:
            _REGISTRY.pop(m, None)
            _ROOTS.pop(m, None)
            compiled.forget_module(id(m))
            fin = _FINALIZERS.pop(id(m), None)
            if fin is not None:
                fin.detach()
    if len(_REGISTRY) == 0:
        while _HANDLES:
            _HANDLES.pop().remove()


def is_watched(module: nn.Module) -> bool:
    """Whether a live, open watch holds ``module`` (a Watcher dropped without leaving its ``with`` holds none)."""
    entry = _REGISTRY.get(module)
    if entry is None:
        return False
    rec = entry[0]()
    return rec is not None and not getattr(rec, "closed", False)


def forget(capture_id: int) -> None:
    """A watch that was garbage-collected without being closed: its step is no longer recorded."""
    _RECORDING.discard(capture_id)


def global_hooks_installed() -> bool:
    return bool(_HANDLES)


# ------------------------------------------------------------------ what the hooks do
_HIST_KINDS = (Row.ACT, Row.GRAD)


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

    def __init__(self, slots: list[Any], modules: list[nn.Module], buffer: StepBuffer,
                 on_auto_step: Callable[[], None]) -> None:
        self.slots = slots
        self.buffer = buffer
        self.scaler: Any = None  # a GradScaler: its scale is written with the step's first gradient row
        self.scale_written = False
        self.generation = 0  # of the step in progress: a gradient hook of an earlier step writes nothing
        self.recording = True
        self.histogram_step = False
        self.auto_step = True
        self.closed = False
        self.record_eval = False  # check(): an eval-mode model's forward is recorded too
        self.eval_skipped = 0  # forwards of the model in eval mode, not recorded (validation with grad enabled)
        self._on_auto_step = on_auto_step
        self.modules = [weakref.ref(m) for m in modules]
        self._ref = weakref.ref(self)  # what the gradient hooks hold: never the capture itself
        self.order: dict[int, int] = {}  # slot -> first-call position in this step
        self._outputs: dict[int, int] = {}  # id(output tensor) -> slot, of the module that ran last
        # id(output) -> (weak ref, its _version, slot, device, row start): every activation row of this step
        self._rows: dict[int, tuple[weakref.ref, int, int, torch.device, int]] = {}
        self._root_called = False
        self._root_slot = self.root_slot = next((i for i, s in enumerate(slots) if s.is_root), None)
        # gradient hooks on tensors that outlive the step (a parameter returned through Identity / Dropout(0)):
        # removed when the step ends, or they would pile up one per step
        self._leaf_hooks: list[Any] = []
        self.gate: Any = None  # compiled.Gate: what the compiled graphs read and add to (set by ``attach``)
        self.wrapped_calls = 0  # calls of the root through torch.compile(model)'s wrapper in this step

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
        if not info.is_root or self.closed:
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

    def _forward(self, slot: int, info: Any, module: nn.Module, args: tuple, output: Any) -> None:
        if info.is_layer:
            info.calls += 1
            self.order.setdefault(slot, len(self.order))
            x = first_float_tensor(args)
            src = self._outputs.get(id(x)) if x is not None else None
            if src is None and x is not None and x._base is not None:  # a view of it (flatten, reshape, transpose)
                src = self._outputs.get(id(x._base))
            self._trace_norm_inputs(slot, info, module, src, output)
            weighted_input = info.kind == Role.WEIGHTED and x is not None
            # looked up before this module's own rows: an in-place module's output is its input
            producer = self._producer(x) if weighted_input else None
            rows = self._rows
            for t in iter_float_tensors(output):
                start = self.add(slot, Row.ACT, t, info.saturation)
                rows[id(t)] = (weakref.ref(t), t._version, slot, t.device, start)
                if t.requires_grad:
                    self._hook(t, partial(_grad_hook, self._ref, slot, Row.GRAD, self.generation))
            if weighted_input:
                self._input_row(slot, x, src, producer)
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
                self.buffer.point(slot, Row.INPUT, n, device, start, 3)  # [shift, sum, sum of squares] about it
                return
            if p.count_zeros:
                self.buffer.point(slot, Row.PROBE, n, device, start, stats.ACT_COLS)
                return
            p.count_zeros = True
        if src is not None and self.slots[src].kind == Role.ACTIVATION:
            self.buffer.write(slot, Row.INPUT, n, x.device, [stats.sumsq(x)])
        else:
            self.buffer.write(slot, Row.PROBE, n, x.device, stats.act_row(x, shift=False, zeros=True))

    def _trace_norm_inputs(self, slot: int, info: Any, module: nn.Module, src: int | None, output: Any) -> None:
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
                    for t in iter_float_tensors(output):
                        self._outputs[id(t)] = src
        if info.kind != Role.PASSTHROUGH:
            self._outputs = {id(t): slot for t in iter_float_tensors(output)}

    # ----------------------------------------------------------------- rows
    def add(self, slot: int, kind: int, t: torch.Tensor, saturation: tuple[float, float] | None) -> int:
        """Write ``t``'s row; returns where its values start in this step's values of its device."""
        info = self.slots[slot]
        hist = self.histogram_step and kind in _HIST_KINDS
        if kind == Row.ACT:
            row = stats.act_row(t, saturation, shift=info.shift_act, zeros=info.count_zeros)
        else:
            row = stats.grad_row(t, shift=info.shift_grad, minmax=hist)
        start = self.buffer.write(slot, kind, t.numel(), t.device, row)
        if hist:
            self.buffer.write_hist(slot, kind, t, row)
        return start

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
        self.order = {}
        self._root_called = False
        self.wrapped_calls = 0
        for s in self.slots:
            s.calls = 0
        if self.gate is not None and self.gate.traced:
            self.gate.reset()

    def remove_leaf_hooks(self) -> None:
        hooks, self._leaf_hooks = self._leaf_hooks, []
        for h in hooks:
            h.remove()
