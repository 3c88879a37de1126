"""The watch's instability side: the divergence signals, the loss-spike monitor and the non-finite origin,
wired as one unit (``Watcher`` calls it where a step ends and where a report is published)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._diagnose import instability
from .._origin.tripwire import Tripwire
from ..errors import warn_self
from . import signals

if TYPE_CHECKING:
    from .._origin._originrecord import NonfiniteOrigin
    from .._report.report import Report
    from .._stats.stepbuffer import StepBuffer
    from .._training.optim import OptimizerMonitor
    from ..config import Config


class Sentinel:
    """Signals, loss spikes and the non-finite origin of one watch."""

    def __init__(self, model: nn.Module, layers: dict[nn.Module, str], config: Config, recording: Callable[[], bool],
                 optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
                 weights: dict[int, str] | None = None, lookups: AbstractSet[int] = frozenset(),
                 monitor: OptimizerMonitor | None = None, deferred: bool = False,
                 distributed: bool = False) -> None:
        self._cfg = config
        self._distributed = distributed
        self._adam_weights = sorted(set((weights or {}).values()))
        self._signals = signals.Signals(model, layers, config, recording, optimizer=optimizer)
        self._signals.watch_weights(weights or {}, lookups)
        # under torch.distributed a one-rank replay of a sharded or synchronised forward would wait on its collectives
        self._tripwire = None
        if config.nonfinite_origin and not distributed:
            deferred_snapshot = monitor is not None and deferred
            self._tripwire = Tripwire(model, layers, recording, scaler=scaler is not None, no_snapshot=(
                "with defer_report 'auto' on a GPU the step's statistics are read after the next update;"
                " defer_report='never' lets torchdiag replay on the weights from before it") if deferred_snapshot
                else None)
            if monitor is not None and not deferred:
                monitor.keep_all = True  # the weights from before the update, for a replay after it
        self._monitor = monitor
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.spikes = instability.LossSpikes(config)
        self.forecasts = instability.Forecasts(config)
        self._pending: list[tuple[int, tuple | None]] = []  # (recorded step, the tripwire's batch of it)
        self._losses: list[tuple[int, signals.Loss]] = []  # of steps that ended unrecorded: judged at the next report
        self.alarm = False  # an unrecorded step's loss spiked (or is not finite): the next step is recorded
        self._ended = -1  # the step that ended last
        self._adam_near: set[str] = set()  # layers near Adam's eps at the previous recorded step
        self._pull_start: float | None = None  # the gradient std at the model's output, first recorded step

    def install(self) -> None:
        self._signals.install()
        if self._tripwire is not None:
            self._tripwire.install()

    def layout(self) -> list[tuple[tuple, type]]:
        """The signal figures a step may hold on any rank, with their reductions (``signals.layout``; installed)."""
        return signals.layout(self._signals.attention_layers, self._adam_weights)

    def remove(self) -> None:
        self._signals.remove()
        if self._tripwire is not None:
            self._tripwire.remove()
        self._pending, self._losses = [], []

    @property
    def origin(self) -> NonfiniteOrigin | None:
        return None if self._tripwire is None else self._tripwire.origin

    def add_loss(self, step: int, loss: object) -> None:
        self._signals.add_loss(step, loss)

    def end_step(self, step: int, recorded: bool, buffer: StepBuffer) -> None:
        """A step ends: what it measured goes into its step buffer (``buffer``, before the step's copy to the host
        starts), with the losses of the unrecorded steps before it: they come back with its statistics, reduced across
        ranks with them where the step is (``StepStats.signals``)."""
        raw = self._signals.take()
        self._ended = step
        if self._tripwire is not None:
            self._tripwire.end_step()
        if not recorded:
            self._losses += raw["losses"]
            if not self._distributed:  # (a rank's own loss: ranks must record alike, they trip on reports only)
                self.alarm = self.alarm or any(self.spikes.would_spike(v) for v in _host_losses(raw["losses"]))
            return
        batch = self._tripwire.take_batch() if self._tripwire is not None else None
        losses, self._losses = self._losses, []
        signals.stage(raw, losses, buffer)
        self._pending.append((step, batch))

    def publish(self, report: Report, figures: Mapping[tuple, object] | None = None) -> None:
        """Add the signals' findings, the loss spikes and the non-finite origin to the report of a step; ``figures``:
        its signals as its step buffer brought them back (``StepStats.signals``: under torch.distributed, the same on
        every rank where the step was reduced, this rank's own where it was not)."""
        mine = [p for p in self._pending if p[0] <= report.step]
        self._pending = [p for p in self._pending if p[0] > report.step]
        batch = next((b for s, b in mine if s == report.step), None)
        sig = signals.read(figures or {})
        if self._pull_start is None:
            self._pull_start = report.output_grad_std
        self._adam_near = instability.judge(report, sig, self._cfg, self._adam_near, self._pull_start)
        self.spikes.add_layers(report)
        report.loss_spikes = self.spikes.feed(sorted(sig.losses))
        report.forecasts = self.forecasts.feed(report)
        if self._tripwire is not None:
            pre = None
            if self._monitor is not None and report.step == self._ended:  # deferred: that snapshot is a later step's
                pre = {self._names[i]: t for i, t in self._monitor.pre_update().items() if i in self._names}
            bad = next(((s, "NaN" if math.isnan(v) else "Inf") for s, v in sig.losses if not math.isfinite(v)), None)
            fresh = self._tripwire.after_step(report, batch, pre_update=pre, bad_loss=bad)
            report.nonfinite_origin = self._tripwire.origin
            if fresh is not None:
                warn_self(f"torchdiag (step {report.step}): {fresh}" + (f" ({fresh.note})" if fresh.note else ""))
        for message in [s.message for s in report.loss_spikes] + [f.message for f in report.forecasts]:
            warn_self(f"torchdiag (step {report.step}): {message}")


def _host_losses(losses: list[tuple[int, signals.Loss]]) -> list[float]:
    """The losses readable without waiting for a device: numbers and CPU tensors."""
    out = []
    for _, loss in losses:
        if isinstance(loss, float):
            out.append(loss)
        elif isinstance(loss, torch.Tensor) and loss.device.type == "cpu":
            out.append(float(loss))
    return out

