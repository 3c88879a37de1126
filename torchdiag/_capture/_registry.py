"""The registry of watched modules, and what torchdiag's process-wide module hooks (``globalhooks``: one pre-hook,
one forward hook for everything torchdiag does) do for a watch's capture.

The hooks are registered once for the whole process (``torch.nn.modules.module.register_module_forward_hook``)
and look the module up in a ``WeakKeyDictionary``: nothing is stored on the user's modules, so ``copy.deepcopy``
(EMA models), ``pickle`` and ``torch.save`` work inside a watch, and a copy is not recorded. While Dynamo traces,
the hooks go down the compiled path (``compiled``), without a graph break.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import TorchDiagError
from . import _compiled as compiled
from .globalhooks import GlobalHooks
from .runtime import is_compiling

if TYPE_CHECKING:
    from .capture import Capture

# module -> (weak reference to its watch's Capture, slot index)
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int]] = weakref.WeakKeyDictionary()
# the watched roots alone: the pre hook, which only counts steps at a root's forward, looks here
_ROOTS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int]] = weakref.WeakKeyDictionary()
# id() of the captures whose current step is recorded: on other steps the forward hook returns at once
_RECORDING: set[int] = set()
# the captures with a root (weak references): whether any ends its steps at its root's forward is asked at each step
_ROOTED: list[weakref.ref] = []


# id(module) -> the finalizer that forgets its compiled plan if it is garbage-collected while watched
_FINALIZERS: dict[int, Any] = {}
# gate key -> the finalizer that drops the gate with the model's first module (a gate outlives its watch: ``compiled``)
_GATE_FINALIZERS: dict[int, Any] = {}


def set_recording(cap: Capture, on: bool) -> None:
    """Whether ``cap``'s forward hook work is on (its current step is recorded): for the eager hooks, and for
    the compiled graphs (a guard on ``gate.on``: the recorded graph or the model's own)."""
    if on:
        _RECORDING.add(id(cap))
    else:
        _RECORDING.discard(id(cap))
    gate = getattr(cap, "gate", None)
    if gate is not None:
        gate.on = on
    # a step no watch records: the pre-hook alone, or no hook where no watch ends a step at its root's forward
    GlobalHooks.set_quiet(not _RECORDING, silent=not _RECORDING and not _auto_steps())


def _auto_steps() -> bool:
    """Whether an open watch ends its steps at its root's forward (auto-step: no ``step()`` call so far). Closed or
    collected captures leave the list here."""
    caps = [cap for ref in _ROOTED if (cap := ref()) is not None and not cap.closed]
    if len(caps) != len(_ROOTED):
        _ROOTED[:] = [weakref.ref(cap) for cap in caps]
    return any(cap.auto_step for cap in caps)


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
    if key is not None and entering:
        GlobalHooks.pin()  # (before the wrapper's forward: its forward hook, which leaves it, is called)
    inner = module._modules.get("_orig_mod")
    entry = _ROOTS.get(inner) if key is not None and inner is not None else None
    if entry is None:
        return
    rec = entry[0]()
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


def attach(cap: Capture, modules: list[nn.Module], roots: Sequence[int] = ()) -> None:
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
    if roots:
        _ROOTED.append(ref)
    ids = tuple(id(m) for m in modules)
    gate = cap.gate = compiled.new_gate(ids, cap.slots, _device_of(modules), cap.record_eval)
    if gate.key not in _GATE_FINALIZERS and modules:  # a new gate: it goes with the model
        _GATE_FINALIZERS[gate.key] = weakref.finalize(modules[0], _drop_gate, gate.key, ids)
    gate.capture = ref
    for i, m in enumerate(modules):
        compiled.register(id(m), gate.plans[i])
        _FINALIZERS[id(m)] = weakref.finalize(m, compiled.forget_module, id(m))
    weakref.finalize(cap, compiled.release_gate, gate.key, gate.lease)
    GlobalHooks.set_capture(_pre_hook, _post_hook)


def _drop_gate(key: int, ids: tuple[int, ...]) -> None:
    _GATE_FINALIZERS.pop(key, None)
    compiled.drop_gate(key, ids)


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
        GlobalHooks.clear_capture()


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
    """Whether torchdiag's process-wide hook pair is installed (while a watch, the signals or a tripwire need it)."""
    return GlobalHooks.installed()
