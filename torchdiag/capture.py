"""Hooks: one process-wide forward pre-hook and forward hook, and a weak registry.

Module hooks are registered once for the whole process
(``torch.nn.modules.module.register_module_forward_hook``) and look the module up in a
``WeakKeyDictionary``. Nothing is stored on the user's modules, so ``copy.deepcopy`` (EMA
models), ``pickle`` and ``torch.save`` work inside a watch, and a copy is not recorded.
Gradients are captured by tensor hooks on module outputs, registered from the forward
hook (``register_full_backward_hook`` breaks on in-place ops).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import Config
from .errors import TorchDiagError

# module -> (weak reference to its recorder, slot index)
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int]] = weakref.WeakKeyDictionary()
_HANDLES: list[Any] = []
# the watched roots alone: the pre hook, which only counts steps at a root's forward, looks here
_ROOTS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, int]] = weakref.WeakKeyDictionary()
# id() of the recorders whose current step is recorded: on other steps the forward hook returns at once
_RECORDING: set[int] = set()


def set_recording(recorder: Any, on: bool) -> None:
    """Whether ``recorder``'s forward hook work is on (its current step is recorded)."""
    if on:
        _RECORDING.add(id(recorder))
    else:
        _RECORDING.discard(id(recorder))


def _eager(fn: Any) -> Any:
    """``fn`` as a hook that runs eagerly under torch.compile (a graph break at each watched module).

    Eager calls go straight to ``fn``: ``torch.compiler.disable``'s wrapper costs ~10 us per call
    (measured), which every module call of the model would pay. While Dynamo traces, the
    ``is_compiling()`` test is true and the call goes to the disabled copy instead, which makes the
    graph break there and runs the hook eagerly. Built when the first watch starts, not at import:
    ``torch.compiler.disable`` loads the compiler stack, which costs seconds.
    """
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None:
        return fn
    disabled = disable(fn)

    def hook(*args: Any) -> Any:
        if _is_compiling():
            return disabled(*args)
        return fn(*args)

    return hook


def _pre_hook(module: nn.Module, args: tuple) -> None:
    entry = _ROOTS.get(module)
    if entry is not None:
        rec = entry[0]()
        if rec is not None:
            rec.on_pre(entry[1], module)


def _post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    if not _RECORDING:  # no watch records this step: every module call of the model passes here
        return
    entry = _REGISTRY.get(module)
    if entry is not None:
        rec = entry[0]()
        if rec is not None:
            rec.on_forward(entry[1], module, args, output)


def attach(recorder: Any, modules: list[nn.Module], roots: list[int] = ()) -> None:
    """Register ``modules`` (slot i = modules[i]) for ``recorder``, ``modules[i]`` for i in ``roots`` as the
    model whose forward starts a step; install the global hooks once."""
    taken = [m for m in modules if is_watched(m)]
    if taken:
        raise TorchDiagError(
            f"{type(taken[0]).__name__} is already watched by another torchdiag.watch; nested or "
            "concurrent watches of the same modules are not supported: leave the first watch before starting another"
        )
    ref = weakref.ref(recorder)
    for i, m in enumerate(modules):
        _REGISTRY[m] = (ref, i)
    for i in roots:
        _ROOTS[modules[i]] = (ref, i)
    if not _HANDLES:
        _HANDLES.append(nn.modules.module.register_module_forward_pre_hook(_eager(_pre_hook)))
        _HANDLES.append(nn.modules.module.register_module_forward_hook(_eager(_post_hook)))


def detach(modules: list[weakref.ref]) -> None:
    """Unregister modules; remove the global hooks when no module is watched any more."""
    for r in modules:
        m = r()
        if m is not None:
            _REGISTRY.pop(m, None)
            _ROOTS.pop(m, None)
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


def forget(recorder_id: int) -> None:
    """A recorder that was garbage-collected without being closed: its step is no longer recorded."""
    _RECORDING.discard(recorder_id)


def global_hooks_installed() -> bool:
    return bool(_HANDLES)


def select_modules(model: nn.Module, config: Config) -> list[tuple[str, nn.Module]]:
    """Default: every leaf module and every module with parameters of its own; then globs and types."""
    chosen = []
    for name, m in model.named_modules():
        tname = type(m).__name__
        default = next(m.children(), None) is None or next(m.parameters(recurse=False), None) is not None
        if not (default or tname in config.include_types):
            continue
        if tname in config.exclude_types:
            continue
        if not any(fnmatch.fnmatchcase(name, g) for g in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in config.exclude):
            continue
        chosen.append((name, m))
    return chosen


def iter_float_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a (nested) output: tensors, tuples, lists, dicts, dataclasses."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() > 0 and obj.layout == torch.strided:
            yield obj
        return
    if _depth > 4:
        return
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from iter_float_tensors(o, _depth + 1)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_float_tensors(o, _depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_float_tensors(getattr(obj, f.name, None), _depth + 1)


def first_float_tensor(args: tuple) -> torch.Tensor | None:
    return next(iter_float_tensors(args), None)


_compiler = getattr(torch, "compiler", None)
_is_compiling = getattr(_compiler, "is_compiling", None) or (lambda: False)
_is_exporting = getattr(_compiler, "is_exporting", None) or (lambda: False)


def tracing() -> bool:
    """True under torch.jit.trace, torch.export or a compiler trace: hooks must not record fake values."""
    return torch.jit.is_tracing() or _is_compiling() or _is_exporting()


_functorch = getattr(torch._C, "_functorch", None)
_peek_interpreter = getattr(_functorch, "peek_interpreter_stack", None) or (lambda: None)


def in_functorch() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``...): its tensors are wrappers
    that must not be kept or hooked (they escape the transform), so such calls are not recorded."""
    return _peek_interpreter() is not None


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing re-runs forwards there)."""
    return _graph_task_id is not None and _graph_task_id() != -1
