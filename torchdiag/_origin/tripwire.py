"""The watch's side of the non-finite origin: keep the batch of a recorded step, replay it once after the first
NaN/Inf (on a parameter-sharing copy of the modules, under the step's autocast, on the weights from before the
update where they were kept), or check the next recorded step live when no replay can narrow it down."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._capture.globalhooks import GlobalHooks
from ._opcheck import BackwardCheck, ForwardCheck, ModuleStack, anomaly_traces, finite, float_leaves, value_kind
from ._originrecord import NonfiniteOrigin
from .origin import replay

if TYPE_CHECKING:
    from torch.utils._python_dispatch import TorchDispatchMode

    from .._report.report import Report

    _HookEntry = tuple[nn.Module, Callable[..., None] | None, Callable[..., None] | None]  # GlobalHooks.add's


def _pop_dispatch_mode(mode: TorchDispatchMode) -> None:
    """Leave a ``TorchDispatchMode`` entered with ``__enter__`` if it is the innermost mode (a mode entered after it
    by code that was interrupted was left by that code's own ``with`` as the exception went through it)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is mode:
        mode.__exit__(None, None, None)
    else:
        from ..errors import warn_self

        warn_self("torchdiag: the live NaN check's dispatch mode is not the innermost one and was left on")


class _LiveCheck:
    """The operator-level check on the user's own forward and backward of one recorded step (when no replay could
    narrow a trip down): entered as the model's forward starts, left as it returns; the backward's node hooks are
    on the graph it made. It only reads values (numbers, RNG, graph: as without it)."""

    def __init__(self, names: Mapping[nn.Module, str]) -> None:
        self.modules = ModuleStack(names)
        self.fwd = ForwardCheck(self.modules)
        self.bwd = BackwardCheck(self.modules)
        self._entries: list[_HookEntry] = []
        self._anomaly: contextlib.AbstractContextManager | None = None
        self._warnings: warnings.catch_warnings | None = None
        self._fwd_entered = False

    def start(self) -> None:
        for m in self.modules.names:
            self._entries.append(GlobalHooks.add(m, pre=lambda mod, a: self.modules.pre(mod, a, {}),
                                                 post=self.modules.post))
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        self._anomaly = anomaly_traces()
        self._anomaly.__enter__()
        self.fwd.__enter__()
        self._fwd_entered = True

    @property
    def in_forward(self) -> bool:
        """The forward's modes (dispatch mode, anomaly mode, warning filter) are entered and not yet left."""
        return self._warnings is not None

    def stop(self, output: object) -> None:
        self.leave()
        if self.fwd.found is None:
            self.bwd.install([t.grad_fn for t in float_leaves(output) if t.grad_fn is not None])

    def leave(self) -> None:
        """Leave whatever ``start`` entered, in reverse order; also when the forward never returned (a
        ``KeyboardInterrupt``: PyTorch runs the ``always_call`` forward hook for an ``Exception`` only)."""
        if self._fwd_entered:
            self._fwd_entered = False
            _pop_dispatch_mode(self.fwd)
        if self._anomaly is not None:
            anomaly, self._anomaly = self._anomaly, None
            anomaly.__exit__(None, None, None)
        if self._warnings is not None:
            caught, self._warnings = self._warnings, None
            caught.__exit__(None, None, None)
        for e in self._entries:
            GlobalHooks.discard(e)
        self._entries = []

    def result(self) -> NonfiniteOrigin | None:
        self.leave()
        self.bwd.remove()
        return self.fwd.found or self.bwd.found


class Tripwire:
    """The watch's side of the origin: keeps the batch of the latest recorded forward of the model (a reference
    to the user's own arguments, taken as the forward returns, dropped when the step ends) and, after the first
    step whose statistics hold a NaN/Inf, finds where it was produced (once per watch).

    The replay runs on the weights the step's forward saw when it can: the current weights if they are
    finite, else (with ``optimizer=``) the weights from before that step's update; otherwise it says why not.
    """

    def __init__(self, model: nn.Module, layers: Mapping[nn.Module, str], recording: Callable[[], bool],
                 scaler: bool = False, no_snapshot: str | None = None) -> None:
        """``scaler``: a GradScaler is in use (backward-only non-finite steps are its skipped steps);
        ``no_snapshot``: why no weights from before an update can be replayed on (the default names the remedies)."""
        self._model = model
        self._layers = layers
        self._recording = recording
        self._batch: tuple | None = None  # (args, kwargs, autocast state)
        self._handle: _HookEntry | None = None
        self.origin: NonfiniteOrigin | None = None
        self.scaler = scaler
        self._armed = False  # the origin is a module only: check the next recorded step live
        self._live: _LiveCheck | None = None
        self.no_snapshot = no_snapshot or ("watch(..., optimizer=opt) keeps the weights from before the update, or"
                                           " call torchdiag.locate_nonfinite(model, batch) from a checkpoint")

    def install(self) -> None:
        self._handle = GlobalHooks.add(self._model, pre=self._pre, post=self._post)

    def _pre(self, module: nn.Module, args: tuple) -> None:
        from .._capture.runtime import in_backward, tracing

        if self._armed and self._live is None and module.training and torch.is_grad_enabled() and not tracing() \
                and not in_backward() and self._recording():
            self._live = _LiveCheck({m: n for m, n in self._layers.items() if n})
            self._live.start()

    def remove(self) -> None:
        if self._handle is not None:
            GlobalHooks.discard(self._handle)
            self._handle = None
        self._batch = None
        if self._live is not None:
            self._live.result()
            self._live = None

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        from .._capture.runtime import in_backward, tracing

        live = self._live
        if live is not None and live.in_forward:
            live.stop(output)
        if self.origin is None and module.training and torch.is_grad_enabled() and not tracing() \
                and not in_backward() and self._recording():
            self._batch = (args, kwargs, _autocast_state())

    def end_step(self) -> None:
        """A step ends: a live check whose forward never returned (interrupted) leaves its modes now."""
        if self._live is not None and self._live.in_forward:
            self._live.leave()

    def take_batch(self) -> tuple | None:
        """The batch of the step that ends (the reference is dropped here)."""
        batch, self._batch = self._batch, None
        return batch

    def after_step(self, report: Report, batch: tuple | None, pre_update: Mapping[str, torch.Tensor] | None = None,
                   bad_loss: tuple[int, str] | None = None) -> NonfiniteOrigin | None:
        """The origin of the step's first NaN/Inf, if this step has the run's first (or the live check of this step
        found the one a replay could not); ``None`` otherwise."""
        if self._live is not None:  # this step ran under the live check
            # armed (below) only where self.origin was set to the origin no replay narrowed down; never reset
            assert self.origin is not None
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
        origin: NonfiniteOrigin | None
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

    def _optimizer_origin(self, report: Report) -> NonfiniteOrigin | None:
        """Finite activations and gradients, non-finite weights after the update: the optimizer made them."""
        # a ratio past 1e3 (update_ratio_high is 0.5) is an update that blew up: only then are the weights read
        if not any(r.update_ratio is not None and not r.update_ratio <= 1e3 for r in report.layers):
            return None
        for name, p in self._model.named_parameters():
            if p.is_floating_point() and not finite(p.detach()):
                return NonfiniteOrigin("optimizer", module=name.rpartition(".")[0] or None, parameter=name,
                                       step=report.step, value=value_kind(p.detach()),
                                       note="the gradients were finite; the optimizer's update was not")
        return None

    def _replayed(self, report: Report, batch: tuple | None,
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
        if not all(finite(p.detach()) for p in params.values()):
            if pre_update and all(finite(p.detach()) for n, p in params.items() if n not in pre_update):
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
        # every submodule by its name (a watched layer by its report name): a NaN made in the forward body of an
        # unwatched container is attributed to it, not to "outside any module" (which means the loss)
        names = {t: self._layers.get(m) or n for (n, m), t in zip(model.named_modules(), twin.modules())
                 if self._layers.get(m) or n}
        try:
            args, kwargs = private_batch(args, kwargs)
        except Exception as e:  # noqa: BLE001 - an object in the batch that cannot be copied (a lock, a file)
            return dataclasses.replace(coarse, note=f"not replayed: the batch holds an object that cannot be copied"
                                                    f" ({type(e).__name__}: {e}), and the forward may change it;"
                                                    " call torchdiag.locate_nonfinite(model, batch)")
        try:
            with contextlib.ExitStack() as stack:
                for device_type, dtype in autocast:  # the step's autocast, as it ran
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
                found = replay(twin, args, kwargs, names=names, parameters=replace, disposable=True)
        except Exception as e:  # noqa: BLE001 - the replay is torchdiag's: it never raises into training
            return dataclasses.replace(coarse, note=f"the replay failed ({type(e).__name__}: {e}): the first module"
                                                    " that held it")
        if found is None:
            return dataclasses.replace(coarse, note="the replay of that step's batch stayed finite (a random op, or the"
                                                    " weights changed): the first module that held it")
        return dataclasses.replace(found, step=report.step, note=found.note or note)


def private_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The batch the replay runs on: its tensors shared (a forward reads them), every other object copied, so that a
    forward that appends to a list, fills a cache or counts calls in an object it is given does so on a copy, not on
    the user's. Raises what ``copy.deepcopy`` raises for an object that cannot be copied."""
    memo: dict[int, object] = {}
    seen: set[int] = set()

    def share(obj: object, depth: int = 0) -> None:
        if id(obj) in seen or depth > 32:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            memo[id(obj)] = obj
        elif isinstance(obj, dict):
            for v in obj.values():
                share(v, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                share(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for v in vars(obj).values():
                share(v, depth + 1)

    share((args, kwargs))
    return copy.deepcopy((args, kwargs), memo)


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
