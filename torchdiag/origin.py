"""Where a NaN/Inf was produced: the operator, the module it ran in, the user's line.

The step's sums say *that* a module's output or gradient held a non-finite value, at no extra cost;
they cannot say which operator made it. This module replays one batch with an operator-level check:

* forward: a ``TorchDispatchMode`` sees every ATen call; the origin is the first call whose floating
  inputs were all finite and whose output is not (``aten.log`` of a negative, an fp16 ``aten.mm`` that
  overflowed). The module is the innermost one whose forward was running (a stack kept by forward
  pre/post hooks), the line the first frame outside torch and torchdiag;
* backward: each autograd node gets a hook; the origin is the first node whose incoming gradients were
  finite and whose outgoing ones are not (``SqrtBackward0`` at exact zeros is ``aten.sqrt``). Nodes are
  owned by the innermost module during whose forward they were created; their line is the one anomaly
  mode recorded when they were (``torch.autograd.detect_anomaly(check_nan=False)``, only in the replay).

The replay leaves training as it was: parameters are only read (gradients come from
``torch.autograd.grad``, ``.grad`` is untouched), and buffers, train/eval modes and the RNG are restored
(``preserved_state``, as ``check()`` does). It costs one check per operator, so it runs once, after a trip.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import TorchDiagError, _internal_dirs
from .losses import projection_loss
from .preserve import preserved_state

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class NonfiniteOrigin:
    """Where the first NaN/Inf of a run (or of a replayed batch) was produced.

    Attributes:
        phase: ``"forward"``, ``"backward"`` or ``"optimizer"``.
        module: qualified name of the innermost (watched) module during whose forward or backward it was
            produced; ``None`` outside every module (in the loss, or in the model's own forward body).
        op: the operator that turned finite inputs into a non-finite output (``"aten.log"``, ``"aten.sqrt"``
            for its backward); ``None`` for ``"optimizer"`` and where it could not be replayed.
        parameter: for ``"optimizer"``, the parameter the update made non-finite; for ``"forward"``, a
            parameter that already was non-finite when the forward read it.
        step: the step it was produced at (``None`` from ``locate_nonfinite``).
        source: the user's ``file:line`` of the operator's call, where it is known.
        value: ``"NaN"`` or ``"Inf"`` (the first non-finite value's kind).
        note: how it was found, or why it could not be narrowed down further.
    """

    phase: str
    module: str | None = None
    op: str | None = None
    parameter: str | None = None
    step: int | None = None
    source: str | None = None
    value: str = "NaN"
    note: str | None = None

    def __str__(self) -> str:
        """One line: "NaN first produced by `aten.log` in 'encoder.2.act' (forward, step 41), at train.py:88"."""
        if self.phase == "optimizer":
            head = f"{self.value} first produced by the optimizer's update of '{self.parameter}'"
        elif self.op is not None:
            head = f"{self.value} first produced by `{self.op}`"
            if self.phase == "backward":
                head += "'s backward"
        elif self.parameter is not None:
            head = f"{self.value} already in parameter '{self.parameter}'"
        else:
            head = f"{self.value} first seen"
        where = f" in '{self.module}'" if self.module else ("" if self.phase == "optimizer" else " outside any module")
        when = self.phase if self.step is None else f"{self.phase}, step {self.step}"
        line = f"{head}{where} ({when})"
        if self.source:
            line += f", at {self.source}"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "module": self.module, "op": self.op, "parameter": self.parameter,
                "step": self.step, "source": self.source, "value": self.value, "note": self.note}


def _value_kind(t: torch.Tensor) -> str:
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _float_leaves(obj: Any) -> list[torch.Tensor]:
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
    frame = sys._getframe(1)
    while frame is not None:
        yield frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back


_ANOMALY_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _node_source(node: Any) -> str | None:
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


def backward_op(node: Any) -> str:
    """``SqrtBackward0`` -> ``aten.sqrt``; ``NativeLayerNormBackward0`` -> ``aten.native_layer_norm``."""
    name = re.sub(r"Backward\d*$", "", type(node).__name__ if not hasattr(node, "name") else node.name())
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    return f"aten.{name}"


# ops whose output is uninitialised memory: garbage, not a computation that went wrong
_UNINITIALISED = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted")


class _Modules:
    """The stack of running forwards and which module created each autograd node (innermost first)."""

    def __init__(self, names: Mapping[nn.Module, str]) -> None:
        self.names = names
        self.stack: list[tuple[str, int]] = []  # (name, sequence number of its start)
        self.seq = 0
        self.owner: dict[Any, tuple[str, int]] = {}  # node -> (module name, start of that call)
        self._inputs: list[set[Any]] = []

    @property
    def current(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seq += 1
        self.stack.append((self.names[module], self.seq))
        self._inputs.append({t.grad_fn for t in _float_leaves((args, kwargs)) if t.grad_fn is not None})

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.stack:
            return
        name, start = self.stack.pop()
        stop = self._inputs.pop()
        # nodes created since this call started belong to it unless an inner call (ended already) took them
        todo = [t.grad_fn for t in _float_leaves(output) if t.grad_fn is not None]
        seen: set[Any] = set()
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
    bad = [t for t in outputs if not _finite(t)]
    if not bad:
        return None
    nan_in = any(bool(torch.isnan(t).any()) for t in inputs)
    nan_out = next((t for t in bad if bool(torch.isnan(t).any())), None)
    if nan_out is not None and not nan_in:
        return nan_out
    finite_in = not nan_in and all(_finite(t) for t in inputs) and all(math.isfinite(x) for x in scalars)
    return bad[0] if finite_in else None


def _scalars(obj: Any) -> list[float]:
    return [float(x) for x in pytree.tree_leaves(obj) if isinstance(x, float)]


def _internal_call() -> bool:
    """The op was called by torchdiag's own code (capture's statistics, the signals), not by the model: the first
    frame outside torch is one of torchdiag's, other than the replay's own (which drives the model)."""
    torch_dir = _internal_dirs()[1:]
    here = _internal_dirs()[0]
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
        frame = frame.f_back
    if frame is None:
        return False
    name = frame.f_code.co_filename
    return name.startswith(here) and not name.endswith(("origin.py", "losses.py"))


class _ForwardCheck(TorchDispatchMode):
    """The first ATen call that made a non-finite output (``_made``)."""

    def __init__(self, modules: _Modules) -> None:
        super().__init__()
        self.modules = modules
        self.found: NonfiniteOrigin | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.found is not None or func.overloadpacket.__name__ in _UNINITIALISED or _internal_call():
            return func(*args, **kwargs)
        inputs = [t.clone() if func._schema.is_mutable else t for t in _float_leaves((args, kwargs))]
        out = func(*args, **kwargs)  # (in-place ops write their inputs: those were cloned before)
        bad = _made(inputs, _scalars((args, kwargs)), _float_leaves(out))
        if bad is not None:
            self.found = NonfiniteOrigin("forward", module=self.modules.current,
                                         op=f"aten.{func.overloadpacket.__name__}",
                                         source=user_source(_live_frames()), value=_value_kind(bad))
        return out


class _BackwardCheck:
    """A hook on every autograd node of the loss's graph: the first node whose outgoing gradients are
    non-finite although its incoming ones were finite."""

    def __init__(self, modules: _Modules) -> None:
        self.modules = modules
        self.found: NonfiniteOrigin | None = None
        self.handles: list[Any] = []

    def install(self, roots: list[Any]) -> None:
        todo, seen = list(roots), set()
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ != "AccumulateGrad":
                self.handles.append(node.register_hook(self._make_hook(node)))
            todo.extend(fn for fn, _ in node.next_functions)

    def _make_hook(self, node: Any) -> Callable[..., None]:
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            if self.found is not None:
                return
            bad = _made(_float_leaves(grad_outputs), [], _float_leaves(grad_inputs))
            if bad is not None:
                owner = self.modules.owner.get(node)
                self.found = NonfiniteOrigin("backward", module=owner[0] if owner else None, op=backward_op(node),
                                             source=_node_source(node), value=_value_kind(bad))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@contextlib.contextmanager
def _module_hooks(names: Mapping[nn.Module, str], modules: _Modules) -> Iterator[None]:
    handles = []
    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(modules.pre, with_kwargs=True))
            handles.append(m.register_forward_hook(modules.post, with_kwargs=True, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _anomaly() -> contextlib.AbstractContextManager:
    """Anomaly mode records each node's creation traceback (the backward origin's line); its NaN check is off."""
    try:
        return torch.autograd.detect_anomaly(check_nan=False)
    except TypeError:  # an older torch without check_nan: no lines for backward origins
        return contextlib.nullcontext()


def replay(model: nn.Module, args: tuple, kwargs: dict | None = None, *,
           loss_fn: Callable[[Any], torch.Tensor] | None = None,
           names: Mapping[nn.Module, str] | None = None,
           parameters: Mapping[str, torch.Tensor] | None = None) -> NonfiniteOrigin | None:
    """Run ``model(*args, **kwargs)`` and a backward of its loss with the operator-level checks.

    ``names`` maps the modules to attribute to their names (default: every submodule). ``parameters``
    replaces some of the model's parameters for the replay (``torch.func.functional_call``: the weights
    from before an optimizer step). Returns ``None`` when everything stayed finite.
    """
    kwargs = kwargs or {}
    if names is None:
        names = {m: n for n, m in model.named_modules() if n}
    params = dict(model.named_parameters())
    if parameters:
        params.update(parameters)
    owners = {id(p): n for n, p in params.items()}
    for name, p in params.items():
        if p.is_floating_point() and not _finite(p.detach()):
            module = name.rpartition(".")[0] or None
            return NonfiniteOrigin("forward", module=module, parameter=owners.get(id(p), name),
                                   value=_value_kind(p.detach()),
                                   note="a parameter was non-finite before the forward read it")
    for t in _float_leaves((args, kwargs)):
        if not _finite(t):
            return NonfiniteOrigin("forward", value=_value_kind(t), note="the input batch already held NaN/Inf")

    modules = _Modules(names)
    fwd, bwd = _ForwardCheck(modules), _BackwardCheck(modules)
    with preserved_state(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's "this mode will increase the runtime"
        with _anomaly():
            with _module_hooks(names, modules):
                with fwd:
                    if parameters:
                        replaced = {n: p.detach().requires_grad_(True) for n, p in parameters.items()}
                        out = torch.func.functional_call(model, replaced, args, kwargs)
                    else:
                        out = model(*args, **kwargs)
                    loss = loss_fn(out) if loss_fn is not None else projection_loss(out)
            if fwd.found is not None:
                return fwd.found
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                return None
            targets = [p for p in (replaced.values() if parameters else ()) if p.requires_grad]
            targets += [p for n, p in model.named_parameters() if p.requires_grad and n not in (parameters or {})]
            if not targets:
                return None
            bwd.install([loss.grad_fn])
            try:
                torch.autograd.grad(loss, targets, allow_unused=True)
            finally:
                bwd.remove()
    return bwd.found


def locate_nonfinite(model: nn.Module, *inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None,
                     **kwargs: Any) -> NonfiniteOrigin | None:
    """Replay one batch and say where its first NaN/Inf is produced, or ``None`` if all stays finite.

    The forward ``model(*inputs, **kwargs)`` runs under an operator-level check, then the backward of
    ``loss_fn(output)`` (default: the fixed random projection ``check()`` uses). Parameters, ``.grad``,
    buffers, train/eval modes and the RNG state are as they were afterwards.

    Example:
        >>> import torch, torchdiag
        >>> class Log(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.log(x)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), Log())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(-1.0), net[0].bias.zero_()
        >>> origin = torchdiag.locate_nonfinite(net, torch.ones(2, 4))
        >>> origin.phase, origin.module, origin.op
        ('forward', '1', 'aten.log')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"locate_nonfinite(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    if not inputs and not kwargs:
        raise TypeError("locate_nonfinite(model, *inputs): give the batch the model's forward takes")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"locate_nonfinite(loss_fn=...): expected a callable of the model's output, got"
                        f" {type(loss_fn).__name__}")
    target = getattr(model, "_orig_mod", model)  # a torch.compile'd model: replayed eagerly
    try:
        return replay(target, inputs, kwargs, loss_fn=loss_fn)
    except TorchDiagError:
        raise
    except Exception as e:
        raise TorchDiagError(f"locate_nonfinite(): the model raised {type(e).__name__} on the given inputs: {e}") from e


__all__ = ["NonfiniteOrigin", "locate_nonfinite", "replay", "PHASES"]


class _LiveCheck:
    """The operator-level check on the user's own forward and backward of one recorded step (when no replay could
    narrow a trip down): entered as the model's forward starts, left as it returns; the backward's node hooks are
    on the graph it made. It only reads values (numbers, RNG, graph: as without it)."""

    def __init__(self, names: Mapping[nn.Module, str]) -> None:
        self.modules = _Modules(names)
        self.fwd = _ForwardCheck(self.modules)
        self.bwd = _BackwardCheck(self.modules)
        self._entries: list[Any] = []
        self._anomaly: Any = None
        self._warnings: Any = None

    def start(self) -> None:
        from .signals import GlobalHooks

        for m in self.modules.names:
            self._entries.append(GlobalHooks.add(m, pre=lambda mod, a: self.modules.pre(mod, a, {}),
                                                 post=self.modules.post))
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        self._anomaly = _anomaly()
        self._anomaly.__enter__()
        self.fwd.__enter__()

    def stop(self, output: Any) -> None:
        from .signals import GlobalHooks

        self.fwd.__exit__(None, None, None)
        self._anomaly.__exit__(None, None, None)
        self._warnings.__exit__(None, None, None)
        for e in self._entries:
            GlobalHooks.discard(e)
        self._entries = []
        if self.fwd.found is None:
            self.bwd.install([t.grad_fn for t in _float_leaves(output) if t.grad_fn is not None])

    def result(self) -> NonfiniteOrigin | None:
        self.bwd.remove()
        return self.fwd.found or self.bwd.found


class Tripwire:
    """The watch's side of the origin: keeps the batch of the latest recorded forward of the model (a reference
    to the user's own arguments, taken as the forward returns, dropped when the step ends) and, after the first
    step whose statistics hold a NaN/Inf, finds where it was produced (once per watch).

    The replay runs on the weights the step's forward saw when it can: the current weights if they are
    finite, else (with ``optimizer=``) the weights from before that step's update; otherwise it says why not.
    """

    def __init__(self, model: nn.Module, layers: Mapping[nn.Module, str], recording: Callable[[], bool]) -> None:
        self._model = model
        self._layers = layers
        self._recording = recording
        self._batch: tuple | None = None  # (args, kwargs, autocast state)
        self._handle: Any = None
        self.origin: NonfiniteOrigin | None = None
        self.scaler = False  # a GradScaler is in use: backward-only non-finite steps are its skipped steps
        self._armed = False  # the origin is a module only: check the next recorded step live
        self._live: _LiveCheck | None = None
        self.no_snapshot = ("watch(..., optimizer=opt) keeps the weights from before the update, or call"
                            " torchdiag.locate_nonfinite(model, batch) from a checkpoint")

    def install(self) -> None:
        from .signals import GlobalHooks

        self._handle = GlobalHooks.add(self._model, pre=self._pre, post=self._post)

    def _pre(self, module: nn.Module, args: tuple) -> None:
        from .runtime import in_backward, tracing

        if self._armed and self._live is None and module.training and torch.is_grad_enabled() and not tracing() \
                and not in_backward() and self._recording():
            self._live = _LiveCheck({m: n for m, n in self._layers.items() if n})
            self._live.start()

    def remove(self) -> None:
        from .signals import GlobalHooks

        if self._handle is not None:
            GlobalHooks.discard(self._handle)
            self._handle = None
        self._batch = None
        if self._live is not None:
            self._live.result()
            self._live = None

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        from .runtime import in_backward, tracing

        live = self._live
        if live is not None and live.fwd is not None and live._entries:
            live.stop(output)
        if self.origin is None and module.training and torch.is_grad_enabled() and not tracing() \
                and not in_backward() and self._recording():
            self._batch = (args, kwargs, _autocast_state())

    def take_batch(self) -> tuple | None:
        """The batch of the step that ends (the reference is dropped here)."""
        batch, self._batch = self._batch, None
        return batch

    def after_step(self, report: Any, batch: tuple | None, pre_update: Mapping[str, torch.Tensor] | None = None,
                   bad_loss: tuple[int, str] | None = None) -> NonfiniteOrigin | None:
        """The origin of the step's first NaN/Inf, if this step has the run's first (or the live check of this step
        found the one a replay could not); ``None`` otherwise."""
        if self._live is not None:  # this step ran under the live check
            found, self._live, self._armed = self._live.result(), None, False
            if found is not None:
                self.origin = dataclasses.replace(found, step=report.step, note=f"found live at step {report.step}"
                                                  f" (step {self.origin.step}'s could not be narrowed down)")
                return self.origin
            self.origin = dataclasses.replace(self.origin, note=f"{self.origin.note}; the live check of step"
                                              f" {report.step} saw no NaN/Inf produced")
            return None
        if self.origin is not None:
            return None
        forward, backward = report.first_nonfinite, report.first_nonfinite_grad
        if forward is None and bad_loss is not None:  # finite outputs, a non-finite loss: the loss computation
            step, value = bad_loss
            origin = NonfiniteOrigin("forward", step=step, value=value, note="the loss given to step(loss=) was"
                                     " non-finite while every output of the model was finite: the loss computation made"
                                     " it; torchdiag.locate_nonfinite(model, batch, loss_fn=your_loss) names its op")
        elif forward is None and backward is None:
            origin = self._optimizer_origin(report)
        elif forward is None and self.scaler:
            return None  # GradScaler's skipped step: the scaler doing its job
        else:
            origin = self._replayed(report, batch, pre_update)
            if origin.op is None and origin.parameter is None and origin.note and "not replayed" not in origin.note:
                self._armed = True  # no replay could narrow it down: the next recorded step is checked live
                origin = dataclasses.replace(origin, note=f"{origin.note}; the next recorded step is checked live")
        self.origin = origin
        return origin

    def _optimizer_origin(self, report: Any) -> NonfiniteOrigin | None:
        """Finite activations and gradients, non-finite weights after the update: the optimizer made them."""
        # a ratio past 1e3 (update_ratio_high is 0.5) is an update that blew up: only then are the weights read
        if not any(r.update_ratio is not None and not r.update_ratio <= 1e3 for r in report.layers):
            return None
        for name, p in self._model.named_parameters():
            if p.is_floating_point() and not _finite(p.detach()):
                return NonfiniteOrigin("optimizer", module=name.rpartition(".")[0] or None, parameter=name,
                                       step=report.step, value=_value_kind(p.detach()),
                                       note="the gradients were finite; the optimizer's update was not")
        return None

    def _replayed(self, report: Any, batch: tuple | None,
                  pre_update: Mapping[str, torch.Tensor] | None) -> NonfiniteOrigin:
        phase = "forward" if report.first_nonfinite is not None else "backward"
        module = report.first_nonfinite or report.first_nonfinite_grad
        coarse = NonfiniteOrigin(phase, module=module, step=report.step)
        if batch is None:
            return dataclasses.replace(coarse, note="the batch of that step was not kept (its forward ran compiled, or"
                                                    " outside a recorded training step): the first module that held it")
        args, kwargs, autocast = batch
        model = getattr(self._model, "_orig_mod", self._model)  # a torch.compile'd model: replayed eagerly
        params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        replace = None
        if not all(_finite(p.detach()) for p in params.values()):
            if pre_update and all(_finite(p.detach()) for n, p in params.items() if n not in pre_update):
                replace, note = dict(pre_update), "replayed on the weights from before that step's update"
            else:
                return dataclasses.replace(coarse, note=f"not replayed: that step's update already made the weights"
                                                        f" non-finite; {self.no_snapshot}")
        else:
            note = "replayed on the weights after that step"
        try:
            # a copy of the modules sharing the parameters: no hook of the watch sees the replay, buffers stay
            twin = copy.deepcopy(model, {id(p): p for p in model.parameters()})
        except Exception as e:  # noqa: BLE001 - a module that cannot be copied (a lock, a file)
            return dataclasses.replace(coarse, note=f"not replayed: the model cannot be copied ({type(e).__name__}:"
                                                    f" {e}); call torchdiag.locate_nonfinite(model, batch)")
        names = {t: self._layers[m] for m, t in zip(model.modules(), twin.modules()) if self._layers.get(m)}
        try:
            with contextlib.ExitStack() as stack:
                for device_type, dtype in autocast:  # the step's autocast, as it ran
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
                found = replay(twin, args, kwargs, names=names, parameters=replace)
        except Exception as e:  # noqa: BLE001 - the replay is torchdiag's: it never raises into training
            return dataclasses.replace(coarse, note=f"the replay failed ({type(e).__name__}: {e}): the first module"
                                                    " that held it")
        if found is None:
            return dataclasses.replace(coarse, note="the replay of that step's batch stayed finite (a random op, or the"
                                                    " weights changed): the first module that held it")
        return dataclasses.replace(found, step=report.step, note=found.note or note)


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The autocast contexts in effect: (device type, dtype) of each enabled one."""
    out = []
    for device_type in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device_type):
                out.append((device_type, torch.get_autocast_dtype(device_type)))
        except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: the older per-device queries
            if device_type == "cpu" and torch.is_autocast_cpu_enabled():
                out.append(("cpu", torch.get_autocast_cpu_dtype()))
            elif device_type == "cuda" and torch.is_autocast_enabled():
                out.append(("cuda", torch.get_autocast_gpu_dtype()))
    return out
