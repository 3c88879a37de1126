"""``watch`` and ``check``: the one module that wires capture, buffer, diagnosis and sinks."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from . import capture, distributed, gains
from .buffer import Recorder
from .config import Config, ConfigLike, resolve_config
from .diagnose import StepStats, diagnose
from .errors import TorchDiagError, warn_self
from .losses import projection_loss
from .optim import OptimizerMonitor
from .preserve import preserved_state
from .report import Report
from .sentinel import Sentinel
from .sinks.console import ConsoleSink
from .sinks.tensorboard import TensorBoardSink, open_writer, writer_logdir
from .taxonomy import describe, select_modules
from .verdict import RunFinding, RunVerdict
from .vocab import Role

RescaleSpec = Union[bool, float, Callable[[str, nn.Module], float]]


class Watcher:
    """Records per-layer statistics of a model while the user's loop runs. Use via ``watch``."""

    def __init__(self, model: nn.Module, config: Config, *, logdir: str | None, writer: Any,
                 rescale_grads: RescaleSpec, warn: bool = True, scaler: Any = None, optimizer: Any = None,
                 group: distributed.Group | None = None, auto_step: bool = True, record_eval: bool = False) -> None:
        self.config = config
        self._group = group  # None: a single process (or a one-rank group), nothing is reduced
        self._writes = group is None or group.is_writer  # rank 0 of the group alone writes and warns
        self._scaler = scaler
        self._auto_step_on = auto_step
        self._amp_prev: float | None = None
        self._amp_skipped = 0
        self._optimizer = optimizer
        self._optim_monitor: OptimizerMonitor | None = None
        self._model: nn.Module | None = model
        self._logdir = logdir
        self._user_writer = writer
        self._rescale = rescale_grads
        self._warn = warn and config.warnings and self._writes
        self._selected = select_modules(model, config)
        if not self._selected:
            raise TorchDiagError(
                f"no module of {type(model).__name__} was selected for watching: check the config keys "
                f"'include' {list(config.include)}, 'exclude' {list(config.exclude)}, 'exclude_types' "
                f"{list(config.exclude_types)}"
            )
        self._recorder: Recorder | None = None
        self._module_refs: list[weakref.ref] = []
        self._console = ConsoleSink()
        self._verdict = RunVerdict.from_config(config)
        self._tb: TensorBoardSink | None = None
        self._last: Report | None = None
        self._step_report: Report | None = None  # what the latest end of a step produced, at step number:
        self._step_report_at = -1
        self._entered = False
        self._closed = False
        self._rescale_handles: list[Any] = []
        self._rescale_hook: _RescaleHook | None = None
        self._sentinel: Sentinel | None = None
        self._record_eval = record_eval
        self._tb_failed = False
        self._finalizer: Any = None
        # the registered modules and what describes them; the model itself last if no slot is its own
        self._modules = [m for _, m in self._selected]
        self._slots = [describe(n, m, is_layer=True, is_root=m is model, saturation_level=config.saturation_level)
                       for n, m in self._selected]
        if not any(m is model for m in self._modules):
            self._modules.append(model)
            self._slots.append(describe("", model, is_layer=False, is_root=True,
                                        saturation_level=config.saturation_level))
        self._rescale_factors = self._rescale_factors_of(self._slots)  # a bad factor: raised by watch() itself

    # ------------------------------------------------------------ context
    def __enter__(self) -> Watcher:
        if self._entered:
            raise TorchDiagError("this Watcher was already entered; call torchdiag.watch(...) again for a new watch")
        model = self._model
        assert model is not None
        modules, slots = self._modules, self._slots
        # histograms are binned only when something will write them
        writer = self._user_writer
        histograms = self._writes and (callable(getattr(writer, "add_histogram_raw", None)) if writer is not None
                                       else self._logdir is not None)
        self._recorder = Recorder(slots, modules, self.config.every,
                                  on_auto_step=_WeakCall(self, "_end_step_in_hook"),
                                  histogram_every=self.config.histogram_every if histograms else 0)
        cap = self._recorder.capture
        cap.record_eval = self._record_eval
        cap.scaler = self._scaler
        cap.auto_step = self._auto_step_on
        self._recorder.defer = _defer(self.config.defer_report, model)
        if self._group is not None:
            self._recorder.reducer = distributed.StepReducer(slots, self._group, schedule={
                "every": self.config.every, "histogram_every": self.config.histogram_every,
                "profile_every": self.config.profile_every, "defer_report": float(self._recorder.defer)},
                recorder=self._recorder)
        capture.attach(cap, modules, roots=[i for i, s in enumerate(slots) if s.is_root])
        capture.set_recording(cap, cap.recording)
        self._module_refs = [weakref.ref(m) for m in modules]
        self._entered = True
        try:
            self._install_rescale()
            if self._optimizer is not None:
                cap.auto_step = False  # a step is an optimizer step
                weights = [(i, getattr(m, slot.weight_name)) for i, (slot, m) in enumerate(zip(slots, modules))
                           if slot.is_layer and slot.role in (Role.WEIGHTED, Role.NORM)
                           and slot.weight_name is not None]
                owned = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
                weights = [(i, w) for i, w in weights if id(w) in owned]  # another optimizer's layers: no ratio
                self._optim_monitor = OptimizerMonitor(self._optimizer, self._recorder, weights,
                                                       end_step=_WeakCall(self, "_end_step_in_hook"),
                                                       scaler=self._scaler, distributed=self._group is not None)
            self._install_sentinel(model)
            if not self._writes:  # not rank 0 of the group: no writer is opened, nothing is written
                self._tb = None
            elif self._user_writer is not None:
                self._tb = self._guard_sink(TensorBoardSink, _with_optional_methods(self._user_writer), owned=False,
                                            config=self.config)
            elif self._logdir is not None:
                self._tb = self._guard_sink(lambda: TensorBoardSink(open_writer(self._logdir), owned=True,
                                                                    config=self.config))
        except BaseException:
            self._close()
            raise
        # a Watcher dropped without leaving its `with` (garbage-collected) unhooks the model all the same
        self._finalizer = weakref.finalize(self, _abandon, self._module_refs, self._rescale_handles,
                                           self._optim_monitor, self._tb, id(cap), self._sentinel)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            rec = self._recorder
            if rec is not None and self._group is not None and exc_type is None:
                if rec.recording:  # every rank leaves at the same step: all join this step's collective
                    self._end_step()
            elif rec is not None and rec.peek_possible():
                # (under torch.distributed, an exception may be this rank's alone: its own numbers, no collective)
                self._end_step(reduce=False)
            if rec is not None and rec.has_pending:  # a deferred step: diagnosed and written before closing
                self._end_step(reduce=self._group is None or exc_type is None, deferred_only=True)
        except Exception:  # noqa: BLE001 - never mask the user's exception, never raise from cleanup
            if exc_type is None:
                raise
        finally:
            if self._recorder is not None and self._recorder.reducer is not None:
                # after this rank's last collective: says in the store how it left (a rank still waiting on it
                # names it), closes its side of torchdiag's group (that rank's collective fails at once)
                self._recorder.reducer.leave(exc_type)
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._recorder is not None:
            self._recorder.close()
        for h in self._rescale_handles:
            h.remove()
        self._rescale_handles = []
        if self._optim_monitor is not None:
            self._optim_monitor.remove()
            self._optim_monitor = None
        if self._sentinel is not None:
            self._sentinel.remove()
            self._sentinel = None  # it holds the model
        self._optimizer = self._scaler = None
        capture.detach(self._module_refs)
        self._module_refs = []
        self._model = None
        self._selected = []
        self._modules = []
        if self._tb is not None:
            tb, self._tb = self._tb, None
            self._guard_sink(tb.close)  # never raises: a user's exception in the `with` stays theirs

    # ------------------------------------------------------------ sinks
    def _sink_name(self) -> str:
        if self._logdir is not None:
            return f"logdir {self._logdir!r}"
        where = writer_logdir(self._user_writer) if self._user_writer is not None else None
        return f"the writer ({type(self._user_writer).__name__}" + (f", {where!r})" if where else ")")

    def _guard_sink(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a TensorBoard call. A failure (a full disk: the writer thread's ENOSPC resurfaces at the next
        add/flush/close; a writer that raises) warns once, naming the logdir and the error, and switches
        TensorBoard writing off for the rest of the watch; training and the in-memory reports go on."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a sink never stops training
            tb, self._tb = self._tb, None
            if not self._tb_failed:
                self._tb_failed = True
                warn_self(f"torchdiag: writing TensorBoard events to {self._sink_name()} failed"
                          f" ({type(e).__name__}: {e}); TensorBoard writing is off for the rest of this watch;"
                          " training and report() go on")
            if self._recorder is not None:
                self._recorder.histogram_every = 0  # nothing will write them
                self._recorder.histogram_step = False
            if tb is not None and tb.owned:  # release the file, quietly: it failed already
                try:
                    tb.close()
                except Exception:  # noqa: BLE001, S110
                    pass
            return None

    # ------------------------------------------------------------ steps
    def step(self, loss: Any = None) -> Report | None:
        """End the current step. Returns its report if the step was recorded, else None.

        With ``watch(..., optimizer=opt)`` steps end at each ``opt.step()`` instead; then this only
        returns the report of the step that just ended (None if it was not recorded).

        ``loss`` (a float or a 0-d tensor, optional): the step's loss, for the loss-spike monitor. A tensor is
        kept detached and read with the next recorded step (no host sync on the steps in between).
        """
        if self._recorder is None or self._closed:
            raise TorchDiagError("Watcher.step() called outside the `with torchdiag.watch(...)` block")
        if loss is not None and self._sentinel is not None:
            self._sentinel.add_loss(self._recorder.step - (self._optim_monitor is not None), loss)
        if self._optim_monitor is not None:  # the report the latest optimizer step produced, if any
            return self._step_report if self._step_report_at == self._recorder.step else None
        self._recorder.capture.auto_step = False
        return self._end_step()

    def _end_step(self, reduce: bool = True, in_hook: bool = False, deferred_only: bool = False) -> Report | None:
        """The one path that ends a step and publishes what became ready: ``step()``, the auto-step forward
        pre-hook and ``opt.step()`` (``in_hook``: inside the user's code), leaving the watch, and ``report()``.
        ``deferred_only``: end no step, complete the deferred one (leaving the watch, ``report()``)."""
        assert self._recorder is not None
        if deferred_only:
            return self._publish(self._recorder.flush(reduce=reduce), in_hook=in_hook)
        if self._rescale_hook is not None:
            self._rescale_hook.end_step()
        if self._sentinel is not None:
            self._sentinel.end_step(self._recorder.step, self._recorder.recording)
        try:
            stats = self._recorder.end_step(reduce=reduce)
        except Exception as e:  # noqa: BLE001 - torchdiag's own failure: the step is lost, training goes on
            warn_self(f"torchdiag: completing step {self._recorder.step - 1} failed ({type(e).__name__}: {e});"
                      " its statistics are lost, recording goes on")
            stats = None
        report = self._publish(stats, in_hook=in_hook)
        self._step_report, self._step_report_at = report, self._recorder.step
        return report

    def _end_step_in_hook(self) -> None:
        """A step ended from inside the user's code (the auto-step forward pre-hook, ``opt.step()``)."""
        if not self._closed:
            self._end_step(in_hook=True)

    def _publish(self, stats: StepStats | None, in_hook: bool = False) -> Report | None:
        """Diagnose a completed step, warn and write it (with deferral, the step before the one that ended).

        ``in_hook``: called from inside the user's forward or ``opt.step()``, where a warnings filter that
        makes warnings errors (``-W error``) must not raise either: a warning that would raise is printed.
        """
        if stats is None:
            return None
        try:
            report = self._diagnose(stats)
        except Exception as e:  # noqa: BLE001 - torchdiag's own failure never reaches the training step
            warn_self(f"torchdiag: diagnosing step {stats.step} failed ({type(e).__name__}: {e})")
            return None
        if self._recorder is not None and self._recorder.notes:
            report.notes += self._recorder.notes
            self._recorder.notes = []
        if self._sentinel is not None:
            try:
                self._sentinel.publish(report)
            except Exception as e:  # noqa: BLE001 - torchdiag's own failure never reaches the training step
                warn_self(f"torchdiag: the instability signals of step {stats.step} failed ({type(e).__name__}: {e})")
        self._last = report
        report.new_findings = self._verdict.add(report)
        report.run_findings = self._verdict.findings()
        messages = (self._console_write_in_hook(report) if in_hook else self._console.write(report)) if self._warn \
            else []
        if self._tb is not None:
            self._guard_sink(self._tb.write, report, messages, stats.histograms)
        return report

    def _console_write_in_hook(self, report: Report) -> list[str]:
        """The console sink's warnings, none of them raised: each one a filter turns into an exception is
        printed instead, and the sink resumes after it (it never repeats a warning it emitted)."""
        messages: list[str] = []
        for _ in range(len(report.layers) * 8 + 8):  # bounded: each pass gets one warning further
            try:
                messages += self._console.write(report)
                return messages
            except Warning as w:
                text = str(w)
                warn_self(text)  # prints it, as the filter makes warnings raise
                messages.append(text.split("): ", 1)[1] if text.startswith("torchdiag (step ") else text)
            except Exception as e:  # noqa: BLE001 - the console sink failed: the step goes on
                warn_self(f"torchdiag: the console warnings failed ({type(e).__name__}: {e})")
                return messages
        return messages

    def _diagnose(self, stats: StepStats) -> Report:
        stats.rescale_grads = self._rescale is not False
        report = diagnose(stats, self.config)
        if report.amp_scale is not None and self._scaler is not None:
            report.amp_skipped_steps = self._count_skipped(report.amp_scale)
        return report

    def _count_skipped(self, scale: float) -> int:
        """GradScaler multiplies its scale by the backoff factor at each step it skips (inf/NaN gradients)."""
        prev, self._amp_prev = self._amp_prev, scale
        if prev is not None and 0 < scale < prev:
            backoff = float(self._scaler.get_backoff_factor()) if hasattr(self._scaler, "get_backoff_factor") else 0.5
            if 0 < backoff < 1:
                self._amp_skipped += max(1, round(math.log(prev / scale) / math.log(1 / backoff)))
        return self._amp_skipped

    def report(self) -> Report:
        """Diagnosis of the latest recorded step (the current one if it has data).

        Under torch.distributed a step is reduced across ranks when it ends (a collective needs every
        rank), so inside the watch this is the latest step that ended; before any has, this rank's own
        numbers of the step in progress, with a note saying so.
        """
        if self._recorder is not None and not self._closed and self._recorder.has_pending:
            self._end_step(deferred_only=True)  # a deferred step: its copy is done or nearly
        if self._recorder is not None and not self._closed and (self._group is None or self._last is None):
            stats = self._recorder.peek()
            if stats is not None:
                report = self._diagnose(stats)
                if self._group is not None:
                    report.notes.append(f"rank {self._group.rank}'s own statistics of the step in progress: not yet"
                                        f" reduced across the {self._group.world} ranks (that happens when the step"
                                        " ends)")
                report.run_findings = self._verdict.findings()  # the steps that ended (this one has not yet)
                if self._sentinel is not None:
                    report.nonfinite_origin = self._sentinel.origin
                return report
        if self._last is not None:
            return self._last
        notes = ["no step was recorded: run a forward (and backward) pass with grad enabled inside the watch"]
        if self._recorder is not None and self._recorder.eval_skipped:
            notes.append(f"{self._recorder.eval_skipped} forward(s) of the model in eval mode were not recorded"
                         " (validation is not the training step): call model.train() for the steps to watch")
        return Report(layers=[], notes=notes)

    @property
    def findings(self) -> list[RunFinding]:
        """The run's findings so far: flags raised at the first recorded step, non-finite values, and flags that
        persisted (``finding_steps`` of the last ``finding_window`` recorded steps), each with the step it first
        appeared at and whether it recovered. Empty: nothing was wrong during training.

        Example:
            >>> import torch, torchdiag
            >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
            >>> with torchdiag.watch(net) as diag:
            ...     net(torch.randn(4, 8)).sum().backward()
            ...     _ = diag.step()
            >>> diag.findings
            []
        """
        return self._verdict.findings()

    @property
    def step_count(self) -> int:
        """The number of the current step (0 until the first ``step()``)."""
        return self._recorder.step if self._recorder is not None else 0

    # ------------------------------------------------------------ gradient rescale
    def _rescale_factors_of(self, slots: list[Any]) -> weakref.WeakKeyDictionary[nn.Module, float]:
        """The gradient factor of each weighted layer (``rescale_grads``), computed when ``watch()`` is called so
        that a bad factor, or a callable that raises, is an error of that call, never of the ``with``."""
        factors: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()
        if self._rescale is False:
            return factors
        for (name, m), info in zip(self._selected, slots):  # slots[i] describes self._selected[i]
            if info.role != Role.WEIGHTED:
                continue
            if self._rescale is True:
                if info.fan_in is None or not info.fan_out:
                    continue
                factor = gains.rescale_factor(info.fan_in, info.fan_out)
            elif callable(self._rescale):
                try:
                    factor = self._rescale(name, m)
                except Exception as e:
                    raise TorchDiagError(f"watch(rescale_grads=...): the callable raised {type(e).__name__} for layer"
                                         f" '{name}' ({type(m).__name__}): {e}") from e
            else:
                factor = float(self._rescale)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise TorchDiagError(f"rescale_grads: the factor for layer '{name}' must be a finite number,"
                                     f" got {factor!r}")
            if factor != 1.0:
                factors[m] = float(factor)
        return factors

    def _install_sentinel(self, model: nn.Module) -> None:
        """The divergence signals, loss spikes and non-finite origin (``sentinel.py``)."""
        rec = self._recorder
        assert rec is not None
        layers = {m: s.name for s, m in zip(self._slots, self._modules) if s.is_layer and s.name}
        weights = {id(getattr(m, s.weight_name)): s.name for s, m in zip(self._slots, self._modules)
                   if s.is_layer and s.weight_name is not None and s.name}
        lookups = {id(m.weight) for m in self._modules if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        recording = _recording_of(rec)
        self._sentinel = Sentinel(model, layers, self.config, recording, optimizer=self._optimizer,
                                  scaler=self._scaler, weights=weights, lookups=lookups, monitor=self._optim_monitor,
                                  deferred=rec.defer, distributed=self._group is not None,
                                  reducer=lambda: rec.reducer if self._group is not None else None)
        self._sentinel.install()

    def _install_rescale(self) -> None:
        if len(self._rescale_factors):
            self._rescale_hook = _RescaleHook(self._rescale_factors)
            self._rescale_handles.append(nn.modules.module.register_module_forward_hook(self._rescale_hook))


class _RescaleHook:
    """Process-wide forward hook: ``grad * factor`` on the output gradients of the modules in a weak map.

    One global hook rather than one per module: a per-module hook would be copied by
    ``copy.deepcopy(model)`` (EMA models) into a module that no watcher ever unhooks. The forward
    is unchanged.

    A tensor hook on a tensor of this step's graph dies with the graph. A module that returns a tensor
    that outlives the step (a parameter through ``Identity`` or ``Dropout(0.0)``: a leaf) would get one
    more hook per step, compounding the factor and outliving the watch: such tensors get one hook per
    step, removed when the step ends (``end_step``) and when the watch ends.
    """

    def __init__(self, factors: weakref.WeakKeyDictionary) -> None:
        self.factors = factors
        self.leaf_hooks: dict[int, tuple[weakref.ref, Any]] = {}  # id(leaf) -> (its weak ref, hook handle)

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        factor = self.factors.get(module)
        if factor is not None and torch.is_grad_enabled():
            for t in capture.iter_float_tensors(output):
                if not t.requires_grad:
                    continue
                if t.grad_fn is not None:
                    t.register_hook(_GradScale(factor))
                    continue
                held = self.leaf_hooks.get(id(t))
                if held is not None and held[0]() is t:
                    continue  # already scaled once in this step
                self.leaf_hooks[id(t)] = (weakref.ref(t), t.register_hook(_GradScale(factor)))

    def end_step(self) -> None:
        hooks, self.leaf_hooks = self.leaf_hooks, {}
        for _, handle in hooks.values():
            handle.remove()


def _recording_of(recorder: Recorder) -> Callable[[], bool]:
    ref = weakref.ref(recorder)

    def recording() -> bool:
        rec = ref()
        return rec is not None and rec.recording and not rec.closed
    return recording


class _WeakCall:
    """``getattr(obj, name)()`` without keeping ``obj`` alive (the optimizer's hooks and the recorder hold this)."""

    def __init__(self, obj: Any, name: str) -> None:
        self._ref = weakref.ref(obj)
        self._name = name

    def __call__(self) -> None:
        obj = self._ref()
        if obj is not None:
            getattr(obj, self._name)()


def _abandon(module_refs: list, rescale_handles: list, monitor: Any, tb: Any, recorder_id: int,
             sentinel: Any = None) -> None:
    """A Watcher garbage-collected inside its watch (entered, never exited): remove what it added."""
    try:
        if sentinel is not None:
            sentinel.remove()
        capture.forget(recorder_id)
        capture.detach(module_refs)
        for h in rescale_handles:
            h.remove()
        if monitor is not None:
            monitor.remove()
        if tb is not None:
            tb.close()
    except Exception:  # noqa: BLE001, S110 - called by the garbage collector: nothing to raise into
        pass


class _WithOptionalMethods:
    """A user's writer that lacks ``flush`` (only ``add_scalar``, as the README allows): flush does nothing."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def flush(self) -> None:
        pass


def _with_optional_methods(writer: Any) -> Any:
    return writer if callable(getattr(writer, "flush", None)) else _WithOptionalMethods(writer)


class _GradScale:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.factor


def _defer(setting: str, model: nn.Module) -> bool:
    """Config ``defer_report``: auto defers where a parameter or buffer of the model is on a GPU."""
    if setting != "auto":
        return setting == "always"
    return any(t.is_cuda for t in (*model.parameters(), *model.buffers()))


def watch(model: nn.Module, *, logdir: str | os.PathLike | None = None, writer: Any = None,
          config: ConfigLike = None, every: int | None = None, rescale_grads: RescaleSpec = False,
          scaler: Any = None, optimizer: Any = None, process_group: Any = None,
          auto_step: bool = True, **config_keys: Any) -> Watcher:
    """Watch ``model``: record per-layer statistics while your own training loop runs.

    Args:
        model: any ``nn.Module``.
        logdir: write TensorBoard events here (torchdiag owns and closes that writer).
        writer: a ``SummaryWriter`` of yours to write into instead (not closed by torchdiag).
        config: a YAML path, a dict or a ``torchdiag.Config``; keyword arguments override it.
        every: record every N steps (steps 0, N, 2N, ...).
        rescale_grads: False, True (multiply each weighted layer's output gradient by
            sqrt(fan_in / fan_out)), a float factor, or a callable ``(name, module) -> float``.
            This changes training; off by default.
        scaler: a ``torch.amp.GradScaler``: gradient statistics are reported unscaled (divided by
            the scale in effect for that backward) and the scale is reported.
        optimizer: the optimizer that steps this model: a step is then an optimizer step (ended
            by ``opt.step()``; several backward passes before it are merged), and each layer gets
            its update-to-weight ratio and the step its gradient norm before and after clipping.
        process_group: under ``torch.distributed`` statistics are reduced over the default process group
            (every rank gets the global report; rank 0 alone writes and warns); pass a group to reduce
            over that group instead (its rank 0 writes). A ``DistributedDataParallel`` model is watched
            through ``model.module``: layer names carry no ``module.`` prefix.
        auto_step: without any ``step()`` call, each training-mode forward of the model starts a new
            step (the default). False: a step ends only at ``step()`` (or ``opt.step()`` with
            ``optimizer=``), e.g. for several forwards per step under gradient accumulation.
        **config_keys: any configuration key (``histogram_every=10``, ``exclude=["head"]``...), validated
            exactly as in a config file and overriding ``config=``.

    Returns:
        A ``Watcher``, to be used as a context manager.

    Example:
        >>> import torch, torchdiag
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> with torchdiag.watch(model) as diag:
        ...     model(torch.randn(4, 8)).sum().backward()
        ...     _ = diag.step()
        >>> [layer.name for layer in diag.report().layers]
        ['0', '1', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    model = distributed.unwrap(model)  # DDP: the user's model, names without 'module.'
    unknown = sorted(set(config_keys) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise TypeError(f"watch() got an unexpected keyword argument {unknown[0]!r}: besides its own arguments it"
                        f" takes any config key ({', '.join(f.name for f in dataclasses.fields(Config))}), which can"
                        " also go in config= (a dict, a YAML path or a torchdiag.Config)")
    cfg = resolve_config(config, every=every, **config_keys)
    if not isinstance(auto_step, bool):
        raise TypeError(f"watch(auto_step=...): expected True or False, got {auto_step!r} ({type(auto_step).__name__})")
    if logdir is not None:
        if not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"watch(logdir=...): expected a path (str or os.PathLike), got {logdir!r}"
                            f" ({type(logdir).__name__})")
        path = os.fspath(logdir)
        if ("\0" if isinstance(path, str) else b"\0") in path:
            raise ValueError(f"watch(logdir=...): the path holds a NUL byte, which no file system allows: {logdir!r}")
    if logdir is not None and writer is not None:
        raise TorchDiagError("watch(): pass either logdir= or writer=, not both")
    if writer is not None and not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(f"watch(writer=...): expected a SummaryWriter (with add_scalar), got {type(writer).__name__}")
    group = distributed.resolve(process_group)
    if logdir is not None and (group is None or group.is_writer):  # other ranks never create it
        logdir = _check_logdir(logdir)
    if not (isinstance(rescale_grads, (bool, int, float)) or callable(rescale_grads)):
        raise TypeError("watch(rescale_grads=...): expected False, True, a float or a callable (name, module) -> float,"
                        f" got {type(rescale_grads).__name__}")
    if isinstance(rescale_grads, (int, float)) and not isinstance(rescale_grads, bool):
        if not (math.isfinite(rescale_grads) and rescale_grads > 0):
            raise ValueError(f"watch(rescale_grads=...): a factor must be a finite number > 0, got {rescale_grads!r}")
    if scaler is not None and not (callable(getattr(scaler, "scale", None)) and hasattr(scaler, "get_scale")):
        raise TypeError(f"watch(scaler=...): expected a torch.amp.GradScaler, got {type(scaler).__name__}")
    if optimizer is not None and not callable(getattr(optimizer, "register_step_post_hook", None)):
        raise TypeError(f"watch(optimizer=...): expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if capture.is_watched(model):
        raise TorchDiagError(f"{type(model).__name__} is already being watched; nested watches of one model are not"
                             " supported: leave the first `with torchdiag.watch(...)` block first")
    return Watcher(model, cfg, logdir=logdir, writer=writer, rescale_grads=rescale_grads, scaler=scaler,
                   optimizer=optimizer, group=group, auto_step=auto_step)


def _check_logdir(logdir: str | os.PathLike) -> str:
    path = Path(logdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TorchDiagError(f"watch(logdir=...): cannot create {str(path)!r}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise TorchDiagError(f"watch(logdir=...): {str(path)!r} is not writable")
    return str(path)


# ------------------------------------------------------------------ check
def check(model: nn.Module, *inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None,
          config: ConfigLike = None) -> Report:
    """Run one recorded forward and backward pass and return its diagnosis.

    Parameters, ``.grad``, buffers (BatchNorm running statistics included), train/eval mode
    and the global RNG state are as they were afterwards. Without ``loss_fn`` the loss is a
    fixed random projection of every floating output, so gradients are not degenerate.

    Example:
        >>> import torch, torchdiag
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
        >>> report = torchdiag.check(net, torch.randn(8, 16))
        >>> report.flagged
        []
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    if not inputs:
        raise TypeError("check(model, *inputs): give at least one input for the model's forward")
    cfg = resolve_config(config, every=1)
    if any(nn.parameter.is_lazy(t) for t in (*model.parameters(), *model.buffers())):
        return _check_lazy(model, inputs, loss_fn, cfg)
    return _check(model, inputs, loss_fn, cfg)


def _check_lazy(model: nn.Module, inputs: tuple, loss_fn: Any, cfg: Config) -> Report:
    """``check`` of a model with lazy modules (``LazyLinear``...): the inputs would materialise them, so that
    later training would start from other weights. A copy is materialised and checked instead."""
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"} - {None})
    with torch.random.fork_rng(devices=devices):
        try:
            twin = copy.deepcopy(model)
        except Exception as e:
            lazy = [n or type(m).__name__ for n, m in model.named_modules()
                    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
            raise TorchDiagError(f"check(): the model has lazy modules with uninitialised parameters or buffers"
                                 f" ({', '.join(lazy[:5])}), which check() would initialise and which cannot be"
                                 " copied: run one forward pass of the model first to initialise them") from e
        try:
            with torch.no_grad():
                twin(*inputs)  # materialises the lazy parameters of the copy
        except Exception as e:
            raise TorchDiagError(f"check(): the model raised {type(e).__name__} on the given inputs: {e}") from e
        report = _check(twin, inputs, loss_fn, cfg)
    report.notes.append("the model has lazy modules: a copy was initialised by these inputs and checked; the model"
                        " itself is left uninitialised, as it was")
    return report


def _check(model: nn.Module, inputs: tuple, loss_fn: Any, cfg: Config) -> Report:
    with preserved_state(model), torch.enable_grad():
        w = Watcher(model, cfg, logdir=None, writer=None, rescale_grads=False, warn=False, record_eval=True)
        with w:
            # inputs need a gradient only where no parameter gives the graph one: a model may set requires_grad
            # on views of its input itself (Hugging Face's Wav2Vec2 feature encoder), which a leaf input forbids
            trainable = any(p.requires_grad for p in model.parameters())
            xs = tuple(x.detach().clone().requires_grad_(not trainable) if isinstance(x, torch.Tensor)
                       and x.is_floating_point() else x for x in inputs)
            try:
                out = model(*xs)
            except Exception as e:
                raise TorchDiagError(
                    f"check(): the model raised {type(e).__name__} on the given inputs: {e}") from e
            loss = loss_fn(out) if loss_fn is not None else projection_loss(out)
            targets = [p for p in model.parameters() if p.requires_grad]
            targets += [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
            if isinstance(loss, torch.Tensor) and loss.requires_grad and targets:
                torch.autograd.grad(loss, targets, allow_unused=True)
            report = w.step() or w.report()  # the step ends: its signals (attention, logits) are read with it
        if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
            report.notes.append("the loss does not require grad: no gradient was measured")
    return report
