"""The operator-level checks behind the non-finite origin: which op made a NaN/Inf, in which module, at which line.

* forward: a ``TorchDispatchMode`` sees every ATen call; an op made a NaN if none of its inputs held one, an Inf if
  all its inputs (Python scalars included) were finite, so ``masked_fill(mask, -inf)`` is not one; ops called by
  torchdiag's own code are skipped. The module is the innermost one whose forward was running, the line the first
  frame outside torch and torchdiag;
* backward: a hook on each autograd node, the same rule on its gradients, the node's owner the innermost module
  during whose forward it was created, its line the one anomaly mode recorded.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import _internal_dirs
from ._originrecord import NonfiniteOrigin

if TYPE_CHECKING:
    from torch._ops import OpOverload
    from torch.autograd.graph import Node
    from torch.utils.hooks import RemovableHandle


def value_kind(t: torch.Tensor) -> str:
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def float_leaves(obj: object) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(obj) if isinstance(t, torch.Tensor) and (t.is_floating_point()
            or t.is_complex()) and t.numel() > 0]


def user_source(frames: Iterator[tuple[str, int]]) -> str | None:
    """``file:line`` of the first frame (innermost first) outside torch and torchdiag."""
    internal = _internal_dirs()
    for filename, lineno in frames:
        if not filename.startswith(internal) and not filename.startswith("<"):
            return f"{filename}:{lineno}"
    return None


def _live_frames() -> Iterator[tuple[str, int]]:
    frame: FrameType | None = sys._getframe(1)  # f_back is None at the outermost frame
    while frame is not None:
        yield frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back


_ANOMALY_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _node_source(node: Any) -> str | None:  # a Node: its stub declares metadata a method, a dict on the C++ nodes
    """The user's line that created an autograd node, from the traceback anomaly mode stored on it."""
    try:
        stack = node.metadata.get("traceback_")
    except Exception:  # noqa: BLE001 - a node without metadata
        return None
    if not stack:
        return None
    text = "".join(stack) if isinstance(stack, (list, tuple)) else str(stack)
    frames = [(f, int(n)) for f, n in _ANOMALY_FRAME.findall(text)]
    return user_source(iter(reversed(frames)))  # format_stack is outermost first


def backward_op(node: Node) -> str:
    """``SqrtBackward0`` -> ``aten.sqrt``; ``NativeLayerNormBackward0`` -> ``aten.native_layer_norm``."""
    name = re.sub(r"Backward\d*$", "", type(node).__name__ if not hasattr(node, "name") else node.name())
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    return f"aten.{name}"


# ops whose output is uninitialised memory: garbage, not a computation that went wrong
_UNINITIALISED = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted")


class ModuleStack:
    """The stack of running forwards and which module created each autograd node (innermost first)."""

    def __init__(self, names: Mapping[nn.Module, str]) -> None:
        self.names = names
        self.stack: list[tuple[str, int]] = []  # (name, sequence number of its start)
        self.seq = 0
        self.owner: dict[Node, tuple[str, int]] = {}  # node -> (module name, start of that call)
        self._inputs: list[set[Node]] = []

    @property
    def current(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seq += 1
        self.stack.append((self.names[module], self.seq))
        self._inputs.append({t.grad_fn for t in float_leaves((args, kwargs)) if t.grad_fn is not None})

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self.stack:
            return
        name, start = self.stack.pop()
        stop = self._inputs.pop()
        # nodes created since this call started belong to it unless an inner call (ended already) took them
        todo: list[Node | None] = [t.grad_fn for t in float_leaves(output) if t.grad_fn is not None]
        seen: set[Node] = set()
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in stop:
                continue
            seen.add(node)
            owned = self.owner.get(node)
            if owned is not None and owned[1] < start:
                continue  # made before this call began: outside it
            if owned is None:
                self.owner[node] = (name, start)
            todo.extend(fn for fn, _ in node.next_functions)


def _made(inputs: list[torch.Tensor], scalars: list[float], outputs: list[torch.Tensor]) -> torch.Tensor | None:
    """The output that this call made non-finite, if any: a NaN from inputs without NaN, or an Inf from inputs all
    finite (Python scalars included). An Inf written on purpose (``masked_fill(mask, -inf)``, ``full(..., -inf)``:
    attention masks) has an infinite scalar input; what is computed from it is judged by the NaN rule alone."""
    bad = [t for t in outputs if not finite(t)]
    if not bad:
        return None
    nan_in = any(bool(torch.isnan(t).any()) for t in inputs)
    nan_out = next((t for t in bad if bool(torch.isnan(t).any())), None)
    if nan_out is not None and not nan_in:
        return nan_out
    finite_in = not nan_in and all(finite(t) for t in inputs) and all(math.isfinite(x) for x in scalars)
    return bad[0] if finite_in else None


def _scalars(obj: object) -> list[float]:
    return [float(x) for x in pytree.tree_leaves(obj) if isinstance(x, float)]


def _internal_call() -> bool:
    """The op was called by torchdiag's own code (capture's statistics, the signals), not by the model: the first
    frame outside torch is one of torchdiag's, other than the replay's own (which drives the model)."""
    here, *torch_dirs = _internal_dirs()
    torch_dir = tuple(torch_dirs)
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
        frame = frame.f_back
    if frame is None:
        return False
    name = frame.f_code.co_filename
    return name.startswith(here) and not name.endswith(("origin.py", "losses.py"))


class ForwardCheck(TorchDispatchMode):
    """The first ATen call that made a non-finite output (``_made``)."""

    def __init__(self, modules: ModuleStack) -> None:
        super().__init__()
        self.modules = modules
        self.found: NonfiniteOrigin | None = None

    def __torch_dispatch__(self, func: OpOverload, types: Sequence[type], args: tuple = (),
                          kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        if self.found is not None or func.overloadpacket.__name__ in _UNINITIALISED or _internal_call():
            return func(*args, **kwargs)
        inputs = [t.clone() if func._schema.is_mutable else t for t in float_leaves((args, kwargs))]
        out = func(*args, **kwargs)  # (in-place ops write their inputs: those were cloned before)
        bad = _made(inputs, _scalars((args, kwargs)), float_leaves(out))
        if bad is not None:
            self.found = NonfiniteOrigin("forward", module=self.modules.current,
                                         op=f"aten.{func.overloadpacket.__name__}",
                                         source=user_source(_live_frames()), value=value_kind(bad))
        return out


class BackwardCheck:
    """A hook on every autograd node of the loss's graph: the first node whose outgoing gradients are
    non-finite although its incoming ones were finite."""

    def __init__(self, modules: ModuleStack) -> None:
        self.modules = modules
        self.found: NonfiniteOrigin | None = None
        self.handles: list[RemovableHandle] = []

    def install(self, roots: Iterable[Node | None]) -> None:
        todo: list[Node | None] = list(roots)
        seen: set[Node] = set()
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ != "AccumulateGrad":
                self.handles.append(node.register_hook(self._make_hook(node)))
            todo.extend(fn for fn, _ in node.next_functions)

    def _make_hook(self, node: Node) -> Callable[..., None]:
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            if self.found is not None:
                return
            bad = _made(float_leaves(grad_outputs), [], float_leaves(grad_inputs))
            if bad is not None:
                owner = self.modules.owner.get(node)
                self.found = NonfiniteOrigin("backward", module=owner[0] if owner else None, op=backward_op(node),
                                             source=_node_source(node), value=value_kind(bad))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@contextlib.contextmanager
def module_hooks(names: Mapping[nn.Module, str], modules: ModuleStack) -> Iterator[None]:
    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(modules.pre, with_kwargs=True))
            handles.append(m.register_forward_hook(modules.post, with_kwargs=True, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


def anomaly_traces() -> contextlib.AbstractContextManager:
    """Anomaly mode records each node's creation traceback (the backward origin's line); its NaN check is off."""
    try:
        return torch.autograd.detect_anomaly(check_nan=False)
    except TypeError:  # an older torch without check_nan: no lines for backward origins
        return contextlib.nullcontext()
