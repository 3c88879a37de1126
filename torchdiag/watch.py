"""``watch``: the one module that wires capture, the recorder, diagnosis and the sinks for one watch.

``Watcher`` wires: the recorder and its hooks (``buffer``, ``capture``), the optimizer's hooks (``optim``), the
gradient rescale (``rescale``), torchdiag's collectives (``distributed``) and where completed steps go
(``publish``: diagnosis, verdict, console, TensorBoard). Every end of a step goes through ``_end_step``.
"""

from __future__ import annotations

import gc
import os
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._arguments import check_watch_arguments
from ._capture import capture
from ._capture.installed import Installed, WeakCall, abandon
from ._diagnose.verdict import RunFinding
from ._layers.taxonomy import Slot, describe_watched, hookable, select_watched
from ._record.buffer import Recorder
from ._record.cadence import Cadence
from ._reduce import distributed
from ._report.report import Report
from ._signals.sentinel import Sentinel
from ._sinks import eventfiles
from ._sinks.publish import Publisher
from ._stats import library
from ._training.optim import OptimizerMonitor, watched_weights
from ._training.rescale import RescaleHook, RescaleSpec, factors
from ._vocab import Format, StepStats
from .config import Config, ConfigLike
from .errors import TorchDiagError, warn_self

# TensorBoard's event records are checksummed with the CRC built with the CPU kernel where google-crc32c is absent
eventfiles.offer_crc32c(library.crc32c)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["RescaleSpec", "Watcher", "watch"]


class _CollectionPaused:
    """Python's automatic cyclic garbage collection off while torchdiag closes a step, and on again after (only
    if it was on). Closing a step makes some tens of objects per layer (decoded rows, accumulators, statistics)
    that die before it ends; a collection in between would promote them to an older generation, and a deep
    model's steps would then set off a full collection every few steps (``benchmarks/step_cost.py``: at 1,000
    modules, 30 ms a step before, 6 ms after). Explicit ``gc.collect()`` calls work as ever. (A class, not a
    generator: it runs at every step.)"""

    __slots__ = ("was_on",)

    def __enter__(self) -> None:
        self.was_on = gc.isenabled()
        if self.was_on:
            gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was_on:
            gc.enable()


class Watcher:
    """Records per-layer statistics of a model while the user's loop runs. Use via ``watch``."""

    def __init__(self, model: nn.Module, config: Config, *, logdir: str | None, writer: object,
                 rescale_grads: RescaleSpec, warn: bool = True, scaler: torch.amp.GradScaler | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 group: distributed.Group | None = None, auto_step: bool = True, record_eval: bool = False,
                 precision: Format | None = None) -> None:
        self.config = config
        self._group = group  # None: a single process (or a one-rank group), nothing is reduced
        self._writes = group is None or group.is_writer  # rank 0 of the group alone writes and warns
        self._scaler = scaler
        self._auto_step_on = auto_step
        self._optimizer = optimizer
        self._optim_monitor: OptimizerMonitor | None = None
        self._model: nn.Module | None = model
        self._logdir = logdir
        self._user_writer = writer
        # (what no hook can see, a TorchScript module or layers torch.export inlined, is left out: said at entry)
        selected, self._unhookable = hookable(model, select_watched(model, config))
        self._recorder: Recorder | None = None
        self._installed = Installed()  # what the watch adds beyond its recorder, removed in one place
        self._out = Publisher(config, warn=warn and config.warnings and self._writes,
                              rescaled=rescale_grads is not False, scaler=scaler, logdir=logdir, writer=writer)
        self._step_report: Report | None = None  # what the latest end of a step produced, at step number:
        self._step_report_at = -1
        self._entered = False
        self._closed = False
        self._rescale_hook: RescaleHook | None = None
        self._sentinel: Sentinel | None = None
        self._record_eval = record_eval
        self._precision = precision  # check(precision=): outputs and gradients against this format, as fp8 would scale
        self._finalizer: weakref.finalize[..., Watcher] | None = None
        self._step_end: float | None = None  # host clock at the end of torchdiag's work of the previous step
        self._failures: set[tuple[str, str]] = set()  # the failures of torchdiag's own step end, said once each
        self._unrecordable: str | None = None  # why nothing can be recorded (a model on the meta device)
        # the registered modules and what describes them; the model itself last if no slot is its own
        self._modules, self._slots = describe_watched(model, selected, config.saturation_level)
        # computed here, so that a bad factor (or a callable that raises) is an error of watch() itself
        self._rescale_factors = factors(rescale_grads, selected, self._slots)

    # ------------------------------------------------------------ context
    def __enter__(self) -> Watcher:
        if self._entered:
            raise TorchDiagError("this Watcher was already entered; call torchdiag.watch(...) again for a new watch")
        model = self._model
        assert model is not None
        modules, slots = self._modules, self._slots
        writer = self._user_writer  # histograms are binned only when something will write them
        histograms = self._writes and (callable(getattr(writer, "add_histogram_raw", None)) if writer is not None
                                       else self._logdir is not None)
        self._recorder = rec = _recorder(self.config, slots, modules, model, WeakCall(self, "_end_step_in_hook"),
                                         histograms, self._group)
        cap = rec.capture
        cap.record_eval = self._record_eval
        cap.precision = self._precision
        cap.precision_scaled = self._precision is not None and self._precision.name.startswith("float8")
        cap.scaler = self._scaler
        cap.auto_step = self._auto_step_on
        capture.attach(cap, modules, roots=[i for i, s in enumerate(slots) if s.is_root])
        capture.set_recording(cap, cap.recording)
        if self._unhookable is not None:
            warn_self("torchdiag: " + self._unhookable)
            if not any(s.is_layer for s in slots):  # nothing left to record: the report says why, not "run a forward"
                self._unrecordable = self._unhookable
                rec.close()
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # no data to read: said once, not per step
            self._unrecordable = ("the model has tensors on the meta device, which hold no data: nothing is recorded"
                                  " in this watch (move the model to a real device, e.g. model.to_empty(device='cpu')"
                                  " and its init, to watch it)")
            warn_self("torchdiag: " + self._unrecordable)
            rec.close()
        installed = self._installed
        installed.module_refs = [weakref.ref(m) for m in modules]
        self._entered = True
        try:
            if len(self._rescale_factors):
                self._rescale_hook = RescaleHook(self._rescale_factors)
                installed.add(self._rescale_hook.install())
            if self._optimizer is not None:
                if _has_stepped(self._optimizer):  # a model already in training: judged by change from its first step
                    self._out.baseline.started = True
                cap.auto_step = False  # a step is an optimizer step
                self._optim_monitor = installed.add(OptimizerMonitor(
                    self._optimizer, rec, watched_weights(self._optimizer, slots, modules),
                    end_step=WeakCall(self, "_end_step_in_hook"), scaler=self._scaler,
                    distributed=self._group is not None))
            self._sentinel = self._out.sentinel = installed.add(_sentinel(
                model, slots, modules, self.config, rec, self._optimizer, self._scaler, self._optim_monitor,
                self._group is not None))
            self._out.on_sink_failed = rec.histograms_off
            if self._writes:  # not rank 0 of the group: no writer is opened, nothing is written
                self._out.open_sink()
        except BaseException:
            self._close()
            raise
        # a Watcher dropped without leaving its `with` (garbage-collected) unhooks the model all the same
        self._finalizer = weakref.finalize(self, abandon, installed, self._out.tb, id(cap), os.getpid())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._foreign():  # a forked child leaving the parent's `with`: unhook here, write and join nothing
            self._close()
            return
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

    def _foreign(self) -> bool:
        """In another process than the one that entered the watch (a forked child: a DataLoader worker, an
        ``os.fork()`` inside the ``with``): the watch records nothing there, ends no step and writes nothing."""
        rec = self._recorder
        return rec is not None and rec.capture.foreign

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        foreign = self._foreign()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._recorder is not None:
            self._recorder.close()
        self._installed.remove()
        self._optim_monitor = self._sentinel = self._out.sentinel = None  # the sentinel holds the model
        self._optimizer = self._scaler = None
        self._model = None
        self._modules = []
        if not foreign:  # (a forked child's copy of the writer: its thread is the parent's, flushing it would block)
            self._out.close()  # never raises: a user's exception in the `with` stays theirs

    # ------------------------------------------------------------ steps
    def step(self, loss: float | torch.Tensor | None = None) -> Report | None:
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
        ``deferred_only``: end no step, complete the deferred one (leaving the watch, ``report()``).

        Python's automatic garbage collection is paused meanwhile (``_CollectionPaused``). In a process forked
        from the one that entered the watch, nothing (``_foreign``)."""
        if self._foreign():
            return None
        with _CollectionPaused():
            return self._end_step_now(reduce, in_hook, deferred_only)

    def _end_step_now(self, reduce: bool, in_hook: bool, deferred_only: bool) -> Report | None:
        rec = self._recorder
        assert rec is not None
        if deferred_only:
            return self._published(rec.flush(reduce=reduce), in_hook)
        start = time.perf_counter()
        if self._rescale_hook is not None:
            self._rescale_hook.end_step()
        if self._sentinel is not None:
            self._sentinel.end_step(rec.step, rec.recording, rec.buffer)
            if self._sentinel.alarm:  # a loss spike at an unrecorded step: the steps after it are recorded
                self._sentinel.alarm = False
                rec.cadence.trip(rec.step)
        try:
            stats = rec.end_step(reduce=reduce)
        except Exception as e:  # noqa: BLE001 - torchdiag's own failure: the step is lost, training goes on
            said = (type(e).__name__, str(e).split("\n", 1)[0])
            if said not in self._failures:  # the same failure again at later steps: said once
                self._failures.add(said)
                warn_self(f"torchdiag: completing step {rec.step - 1} failed ({type(e).__name__}: {e});"
                          " its statistics are lost, recording goes on (the same failure at later steps is not"
                          " repeated)")
            stats = None
        report = self._published(stats, in_hook)
        self._step_report, self._step_report_at = report, rec.step
        end = time.perf_counter()
        if self._step_end is not None:  # the step whole, from the end of torchdiag's work at the one before
            # a histogram step's binning, writing and overview images (their own schedule, not a recording's cost)
            # are paid where it completes: at the step after it, where the report is deferred
            heavy = bool(stats is not None and stats.histograms)
            cadence = rec.cadence
            cadence.observe(end - self._step_end, rec.worked, end - start, rec.worked and stats is not None, heavy,
                            early=rec.step - 1 < cadence.record_first)
        self._step_end = end
        return report

    def _published(self, stats: StepStats | None, in_hook: bool) -> Report | None:
        """Publish a completed step, saying the cadence in effect; a trip (something new in it) records the steps
        after it in full under the time budget."""
        rec = self._recorder
        assert rec is not None
        cadence = rec.cadence
        report = self._out.publish(stats, in_hook=in_hook, take_notes=rec.take_notes,
                                   cadence=cadence if cadence.every != 1 else None)
        if report is not None and cadence.budgeted:
            flags = frozenset((layer.name, p) for layer in report.layers for p in layer.status)
            trends: frozenset[tuple[str | None, str]] = frozenset()
            if self._sentinel is not None:  # a figure on its way to its threshold: record the steps a forecast needs
                trends = frozenset((layer, "approaching " + figure)
                                   for figure, layer in self._sentinel.forecasts.approaching)
            events = bool(report.first_nonfinite or report.first_nonfinite_grad or report.loss_spikes)
            cadence.observe_report(report.step, flags, events, trends, forecast=bool(report.forecasts))
            if cadence.tripped:
                rec.record_now()
        return report

    def _end_step_in_hook(self) -> None:
        """A step ended from inside the user's code (the auto-step forward pre-hook, ``opt.step()``)."""
        if not self._closed:
            self._end_step(in_hook=True)

    def report(self) -> Report:
        """Diagnosis of the latest recorded step (the current one if it has data).

        Under torch.distributed a step is reduced across ranks when it ends (a collective needs every
        rank), so inside the watch this is the latest step that ended; before any has, this rank's own
        numbers of the step in progress, with a note saying so.
        """
        if self._recorder is not None and not self._closed and self._recorder.has_pending:
            self._end_step(deferred_only=True)  # a deferred step: its copy is done or nearly
        if self._recorder is not None and not self._closed and (self._group is None or self._out.last is None):
            stats = self._recorder.peek()
            if stats is not None:
                return self._out.provisional(stats, self._group)
        if self._out.last is not None:
            return self._out.last
        notes = [self._unrecordable or "no step was recorded: run a forward (and backward) pass with grad enabled"
                 " inside the watch"]
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
        return self._out.verdict.findings()

    @property
    def step_count(self) -> int:
        """The number of the current step (0 until the first ``step()``)."""
        return self._recorder.step if self._recorder is not None else 0


def _recorder(config: Config, slots: list[Slot], modules: list[nn.Module], model: nn.Module,
              on_auto_step: Callable[[], None], histograms: bool, group: distributed.Group | None) -> Recorder:
    """The recorder of one watch on its config's schedule: every, the histogram window (when something will write
    them), deferral, and under torch.distributed torchdiag's collectives for its steps."""
    every = config.every if isinstance(config.every, int) else None
    cadence = Cadence(every, budget=config.budget, record_first=config.record_first,
                      settle=config.finding_window, settle_trend=config.forecast_window,
                      heavy_every=config.histogram_every if histograms else 0)
    defer = _defer(config.defer_report, model)
    schedule = {
        "every": float(every or 0), "budget": config.budget if every is None else 0.0,
        "record_first": float(config.record_first), "histogram_every": config.histogram_every,
        # the signals' figures are reduced with the step's: ranks whose rules differ would pack different vectors
        "attention_rules": float(config.attention_rules), "output_logits_rule": float(config.output_logits_rule),
        "adam_epsilon_rule": float(config.adam_epsilon_rule), "attention_sample": float(config.attention_sample),
        "profile_every": config.profile_every, "defer_report": float(defer)}
    return Recorder(slots, modules, cadence, on_auto_step=on_auto_step,
                    histogram_every=config.histogram_every if histograms else 0, defer=defer, group=group,
                    schedule=schedule)


def _sentinel(model: nn.Module, slots: list[Slot], modules: list[nn.Module], config: Config, rec: Recorder,
              optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None,
              monitor: OptimizerMonitor | None, distributed: bool) -> Sentinel:
    """The divergence signals, loss spikes and non-finite origin (``sentinel.py``), installed."""
    layers = {m: s.name for s, m in zip(slots, modules) if s.is_layer and s.name}
    weights = {id(getattr(m, s.weight_name)): s.name for s, m in zip(slots, modules)
               if s.is_layer and s.weight_name is not None and s.name}
    lookups = {id(m.weight) for m in modules if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    sentinel = Sentinel(model, layers, config, _recording_of(rec), optimizer=optimizer, scaler=scaler,
                        weights=weights, lookups=lookups, monitor=monitor, deferred=rec.defer, distributed=distributed)
    sentinel.install()
    rec.reduce_also(sentinel.layout())
    return sentinel


def _recording_of(recorder: Recorder) -> Callable[[], bool]:
    ref = weakref.ref(recorder)

    def recording() -> bool:
        rec = ref()
        return rec is not None and rec.recording and not rec.closed
    return recording


def _defer(setting: str, model: nn.Module) -> bool:
    """Config ``defer_report``: auto defers where a parameter or buffer of the model is on a GPU."""
    if setting != "auto":
        return setting == "always"
    return any(t.is_cuda for t in (*model.parameters(), *model.buffers()))


def watch(model: nn.Module, *, logdir: str | bytes | os.PathLike | None = None, writer: object = None,
          config: ConfigLike = None, every: int | None = None, rescale_grads: RescaleSpec = False,
          scaler: torch.amp.GradScaler | None = None, optimizer: torch.optim.Optimizer | None = None,
          process_group: ProcessGroup | None = None, auto_step: bool = True, **config_keys: Any) -> Watcher:
    """Watch ``model``: record per-layer statistics while your own training loop runs.

    Args:
        model: any ``nn.Module``.
        logdir: write TensorBoard events here (torchdiag owns and closes that writer).
        writer: a ``SummaryWriter`` of yours to write into instead (not closed by torchdiag).
        config: a YAML path, a dict or a ``torchdiag.Config``; keyword arguments override it.
        every: record every N steps (steps 0, N, 2N, ...) whatever they cost; by default (config ``every:
            auto``) as many steps as the time budget (config ``budget``, 3 % of the training time) allows.
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
    args = check_watch_arguments(model, logdir=logdir, writer=writer, config=config, every=every,
                                 rescale_grads=rescale_grads, scaler=scaler, optimizer=optimizer,
                                 process_group=process_group, auto_step=auto_step, config_keys=config_keys)
    return Watcher(args.model, args.config, logdir=args.logdir, writer=writer, rescale_grads=rescale_grads,
                   scaler=scaler, optimizer=optimizer, group=args.group, auto_step=auto_step)


def _has_stepped(optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer has taken steps before the watch (its per-parameter state holds a step count or moments): the
    model the watch sees first is a trained one, not an init."""
    try:
        return any(len(state) > 0 for state in optimizer.state.values())
    except (AttributeError, TypeError):
        return False
