"""Publishing a completed step: diagnose it, add it to the run's verdict, warn on the console, write it to
TensorBoard. A sink never stops training: a failing writer warns once and is switched off."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .._diagnose.diagnose import Baseline, diagnose
from .._diagnose.verdict import RunVerdict
from .._report.report import Report
from .._training.amp import SkippedSteps
from .._vocab import StepStats
from ..config import Config
from ..errors import warn_self
from .console import ConsoleSink
from .tensorboard import TensorBoardSink, open_writer, writer_logdir

if TYPE_CHECKING:
    import torch

    from .._record.cadence import Cadence
    from .._reduce._groups import Group
    from .._signals.sentinel import Sentinel

T = TypeVar("T")


class Publisher:
    """Where a watch's completed steps go: the diagnosis, the run's verdict, the console and TensorBoard.

    ``warn``: console warnings (rank 0 of a group alone warns). ``rescaled``: ``rescale_grads`` is on (the
    diagnosis says so). ``scaler``: a GradScaler whose skipped steps the reports count. ``on_sink_failed``:
    called when TensorBoard writing is switched off (the recorder then stops binning histograms).
    """

    def __init__(self, config: Config, *, warn: bool, rescaled: bool, scaler: torch.amp.GradScaler | None = None,
                 logdir: str | None = None, writer: object = None) -> None:
        self.config = config
        self.warn = warn
        self.rescaled = rescaled
        self.skipped = SkippedSteps(scaler) if scaler is not None else None
        self.console = ConsoleSink()
        self.verdict = RunVerdict.from_config(config)
        self.baseline = Baseline()  # what the published steps fixed: the init is judged once, a trained net by change
        self.tb: TensorBoardSink | None = None
        self.last: Report | None = None  # the latest step published
        self.on_sink_failed: Callable[[], None] | None = None
        self.sentinel: Sentinel | None = None  # the watch's instability signals and non-finite origin
        self._logdir, self._writer = logdir, writer
        self._tb_failed = False

    # ------------------------------------------------------------ TensorBoard
    def open_sink(self) -> None:
        """The TensorBoard sink: into the user's writer (never closed by torchdiag), or a writer of its own."""
        if self._writer is not None:
            self.tb = self.guard(TensorBoardSink, _with_optional_methods(self._writer), owned=False, config=self.config)
        elif self._logdir is not None:
            logdir = self._logdir
            self.tb = self.guard(lambda: TensorBoardSink(open_writer(logdir), owned=True, config=self.config))

    def _sink_name(self) -> str:
        if self._logdir is not None:
            return f"logdir {self._logdir!r}"
        where = writer_logdir(self._writer) if self._writer is not None else None
        return f"the writer ({type(self._writer).__name__}" + (f", {where!r})" if where else ")")

    def guard(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T | None:
        """Run a TensorBoard call. A failure (a full disk: the writer thread's ENOSPC resurfaces at the next
        add/flush/close; a writer that raises) warns once, naming the logdir and the error, and switches
        TensorBoard writing off for the rest of the watch; training and the in-memory reports go on."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a sink never stops training
            tb, self.tb = self.tb, None
            if not self._tb_failed:
                self._tb_failed = True
                warn_self(f"torchdiag: writing TensorBoard events to {self._sink_name()} failed"
                          f" ({type(e).__name__}: {e}); TensorBoard writing is off for the rest of this watch;"
                          " training and report() go on")
            if self.on_sink_failed is not None:
                self.on_sink_failed()  # nothing will write histograms
            if tb is not None and tb.owned:  # release the file, quietly: it failed already
                try:
                    tb.close()
                except Exception:  # noqa: BLE001, S110
                    pass
            return None

    def close(self) -> None:
        """Close (or flush) the sink; never raises: a user's exception in the `with` stays theirs."""
        self.skipped = None  # the user's scaler is not held past the watch
        if self.tb is not None:
            tb, self.tb = self.tb, None
            self.guard(tb.close)

    # ------------------------------------------------------------ a step
    def diagnose(self, stats: StepStats) -> Report:
        stats.rescale_grads = self.rescaled
        report = diagnose(stats, self.config, self.baseline)
        if report.amp_scale is not None and self.skipped is not None:
            report.amp_skipped_steps = self.skipped.add(report.amp_scale)
        return report

    def provisional(self, stats: StepStats, group: Group | None = None) -> Report:
        """The report of the step in progress (``Watcher.report()`` before it ended), not published: under
        torch.distributed this rank's own numbers, with a note saying so; the run's findings of the steps that
        ended (this one has not yet). A failure of the diagnosis gives a report that says so, never an exception."""
        try:
            report = self.diagnose(stats)
        except Exception as e:  # noqa: BLE001 - torchdiag's own failure never reaches the user's code
            report = Report(layers=[], step=stats.step,
                            notes=[f"diagnosing step {stats.step} failed ({type(e).__name__}: {e})"])
        if group is not None:
            report.notes.append(f"rank {group.rank}'s own statistics of the step in progress: not yet reduced across"
                                f" the {group.world} ranks (that happens when the step ends)")
        report.run_findings = self.verdict.findings()
        if self.sentinel is not None:
            report.nonfinite_origin = self.sentinel.origin
        return report

    def publish(self, stats: StepStats | None, in_hook: bool = False,
                take_notes: Callable[[], list[str]] | None = None,
                cadence: Cadence | None = None) -> Report | None:
        """Diagnose a completed step, warn and write it; ``take_notes``: the recorder's notes for its report;
        ``cadence``: the watch's ``_record.cadence.Cadence`` (``Report.cadence``, ``Report.record_interval``).

        ``in_hook``: called from inside the user's forward or ``opt.step()``, where a warnings filter that
        makes warnings errors (``-W error``) must not raise either: a warning that would raise is printed.
        """
        if stats is None:
            return None
        try:
            report = self.diagnose(stats)
        except Exception as e:  # noqa: BLE001 - torchdiag's own failure never reaches the training step
            warn_self(f"torchdiag: diagnosing step {stats.step} failed ({type(e).__name__}: {e})")
            return None
        if take_notes is not None:
            report.notes += take_notes()
        if cadence is not None:
            report.cadence = cadence.describe()
            report.record_interval = cadence.current_interval
        if self.sentinel is not None:
            try:
                self.sentinel.publish(report, stats.signals)
            except Exception as e:  # noqa: BLE001 - torchdiag's own failure never reaches the training step
                warn_self(f"torchdiag: the instability signals of step {stats.step} failed ({type(e).__name__}: {e})")
        self.last = report
        assert report.drift_seen is not None  # diagnose() always gives the step's drift
        self.baseline.commit(report.drift_seen)
        report.new_findings = self.verdict.add(report)
        report.run_findings = self.verdict.findings()
        messages = (self._console_write_in_hook(report) if in_hook else self.console.write(report)) if self.warn \
            else []
        if self.tb is not None:
            self.guard(self.tb.write, report, messages, stats.histograms, cadence.stretch if cadence is not None else 1)
        return report

    def _console_write_in_hook(self, report: Report) -> list[str]:
        """The console sink's warnings, none of them raised: each one a filter turns into an exception is
        printed instead, and the sink resumes after it (it never repeats a warning it emitted)."""
        messages: list[str] = []
        for _ in range(len(report.layers) * 8 + 8):  # bounded: each pass gets one warning further
            try:
                messages += self.console.write(report)
                return messages
            except Warning as w:
                text = str(w)
                warn_self(text)  # prints it, as the filter makes warnings raise
                messages.append(text.split("): ", 1)[1] if text.startswith("torchdiag (step ") else text)
            except Exception as e:  # noqa: BLE001 - the console sink failed: the step goes on
                warn_self(f"torchdiag: the console warnings failed ({type(e).__name__}: {e})")
                return messages
        return messages


class _WithOptionalMethods:
    """A user's writer that lacks ``flush`` (only ``add_scalar``, as the README allows): flush does nothing."""

    def __init__(self, writer: object) -> None:
        self._writer = writer

    def __getattr__(self, name: str) -> Any:  # the writer's own attribute
        return getattr(self._writer, name)

    def flush(self) -> None:
        pass


def _with_optional_methods(writer: object) -> object:
    return writer if callable(getattr(writer, "flush", None)) else _WithOptionalMethods(writer)
