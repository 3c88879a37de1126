"""Where a hook runs (a compiler trace, a ``torch.func`` transform, a backward pass) and what tensors an
output holds. Pure queries, no state: shared by capture, the gradient rescale hook, ``check`` and ``fix_init``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch


def iter_float_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a (nested) output: tensors, tuples, lists, dicts, dataclasses."""
    if isinstance(obj, torch.Tensor):
        if _is_float_tensor(obj):
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


def _is_float_tensor(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0 and t.layout == torch.strided


def float_tensors(obj: Any) -> tuple[torch.Tensor, ...]:
    """``iter_float_tensors`` as a tuple; a single tensor (most module outputs) without a generator."""
    if isinstance(obj, torch.Tensor):
        return (obj,) if _is_float_tensor(obj) else ()
    return tuple(iter_float_tensors(obj))


def first_float_tensor(args: tuple) -> torch.Tensor | None:
    """The first floating-point tensor of ``iter_float_tensors(args)``; a leading one without a generator."""
    if args and isinstance(args[0], torch.Tensor) and _is_float_tensor(args[0]):
        return args[0]
    return next(iter_float_tensors(args), None)


_compiler = getattr(torch, "compiler", None)
is_compiling = getattr(_compiler, "is_compiling", None) or (lambda: False)
_is_exporting = getattr(_compiler, "is_exporting", None) or (lambda: False)


def tracing() -> bool:
    """True under torch.jit.trace, torch.export or a compiler trace: hooks must not record fake values."""
    return torch.jit.is_tracing() or is_compiling() or _is_exporting()


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
