"""Which steps a watch records: every N steps (config ``every: N``), or as many as a time budget allows (the
default, ``every: auto`` with ``budget``).

Under the budget the cadence is measured, never guessed. Host clocks time every step whole, from the end of
torchdiag's work at one step to the end of its work at the next, with no device synchronisation: on a GPU the
host waits for the device wherever the training loop does (``loss.item()``), so the clock sees the device's time
too. A step that recorded (or completed a deferred recording) is a recording step; any other is a plain one. A
recording costs ``m x (median recording step - median plain step)``, ``m`` being the recording steps per
recording (1, or 2 where the host copy completes at the next step); its own end-of-step work, timed directly, is
a floor on that cost. Recorded one step in ``k``, the watch costs ``cost / (k x plain)`` of the training time:
``k`` is the smallest that keeps this within ``budget``.

The gap between recorded steps grows at most ``_RAMP`` (4) times from one to the next (1, 4, 16, 64...): early
training is sampled densely, and one noisy estimate cannot leap to a gap a divergence fits in.

Always recorded: the first ``record_first`` steps (an init problem is found at step 0, the first updates' effect
at the next), and every step after a trip (a new flag, a NaN/Inf, a loss spike, a forecast) until
``settle`` recorded steps in a row bring nothing new. A plain step is needed to know what a step costs without
torchdiag: when every step fits the budget, three steps (one in two) and then one step in ``_PROBE_EVERY`` are left
out to measure it. Histogram steps (their own schedule) are not what a recording costs: they are left out of it.

Under torch.distributed every rank must record the same steps (each recorded step runs a collective): each rank
proposes its ``k`` (``propose``) and the largest, reduced with the step's statistics, is what every rank applies
(``agree``); trips come from the reduced report, the same on every rank.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

_PROBE_EVERY = 100  # recording every step: one plain step in this many measures the step without torchdiag
_MAX_INTERVAL = 1000  # the sparsest budget cadence: a recorded step at least every 1000 steps
_PLAIN_KEEP, _RECORDING_KEEP = 15, 9  # step times kept for the medians
_RECENT = 100  # a flag raised again within this many steps is not news
_RAMP = 4  # the gap between recorded steps grows at most this many times from one to the next


class Cadence:
    """The recording schedule of one watch.

    ``decide(step)`` says whether a step is recorded. ``every``: a fixed cadence (steps 0, N, 2N...), or None for
    the time budget: ``budget`` (the fraction of the training time torchdiag may take), ``record_first`` (steps
    always recorded at the start), ``settle`` (recorded steps without anything new before a trip is over: what a
    flag needs to become a finding) and ``settle_trend`` (the same after a figure heading for its threshold: what a
    forecast fits).
    """

    def __init__(self, every: int | None, budget: float = 0.03, record_first: int = 5, settle: int = 5,
                 settle_trend: int | None = None) -> None:
        self.every = every
        self.budget = budget
        self.record_first = record_first
        self.settle = settle
        self.settle_trend = settle if settle_trend is None else settle_trend
        self.interval = 1  # the budget's agreed cadence: one recorded step in `interval`
        self._last_recorded = -1
        self._last_gap = 1  # steps between the last two recorded steps
        self._trip_left = 0  # recorded steps still due in full after a trip
        self._trip_step: int | None = None
        self._seen: dict = {}  # flag -> the last step a report raised it (a trip is something not seen lately)
        self._plain: deque[float] = deque(maxlen=_PLAIN_KEEP)
        self._recording: deque[float] = deque(maxlen=_RECORDING_KEEP)
        self._own: deque[float] = deque(maxlen=_RECORDING_KEEP)  # torchdiag's end-of-step work, timed directly
        self._heavy: deque[tuple[float, float]] = deque(maxlen=_RECORDING_KEEP)  # histogram steps (time, own)
        self._early: list[tuple[float, float]] = []  # the first steps' recordings (time, own)
        self._probes = 0  # plain steps decided while every step fits the budget
        self._recording_steps = 0  # steps that recorded or completed a recording
        self._recordings = 0  # steps recorded
        self._last_plain = -1  # the last step decided plain
        self._cost = self._step_time = math.nan  # the latest estimates (seconds)

    @property
    def budgeted(self) -> bool:
        return self.every is None

    # ---------------------------------------------------------------- the schedule
    def decide(self, step: int) -> bool:
        """Whether ``step`` is recorded; called once per step, in order. Depends only on step numbers, agreed
        intervals and reports, never on a clock read on this rank alone, so that every rank of a group decides
        alike."""
        if self.every is not None:
            due = step % self.every == 0
        elif step < self.record_first or self._trip_left > 0:
            due = True
        elif self.interval <= 1:  # everything fits: record, but for a plain step now and then (3 at first: a median)
            since = step - max(self._last_plain, self.record_first - 1)
            due = since < (_PROBE_EVERY if self._probes >= 3 else 2)
        else:  # the gap grows at most _RAMP-fold from one recorded step to the next: early training is sampled
            # densely, and one noisy estimate cannot leap to a gap a divergence fits in
            due = step - self._last_recorded >= min(self.interval, _RAMP * self._last_gap)
        if due:
            self._last_gap = max(1, step - self._last_recorded) if self._last_recorded >= 0 else 1
            self._last_recorded = step
            if self._trip_left > 0:  # (a first step recorded after a trip counts: it is a step the flag is seen at)
                self._trip_left -= 1
        else:
            self._last_plain = step
            self._probes += self.interval <= 1
        return due

    def force(self, step: int) -> None:
        """``step``, decided plain, is recorded after all (a trip at the report published just before it)."""
        self._last_gap = max(1, step - self._last_recorded)
        self._last_recorded = step
        if self._trip_left > 0:
            self._trip_left -= 1

    def observe(self, seconds: float, recording: bool, own: float, recorded: bool, heavy: bool = False,
                early: bool = False) -> None:
        """The time of a step (host clock, end to end); ``recording``: it recorded or completed a recording;
        ``own``: torchdiag's end-of-step work in it; ``recorded``: it recorded; ``heavy``: it also binned
        histograms (their own schedule, one step in ``histogram_every``: not what a recording costs, unless
        nothing else is known yet); ``early``: one of the first ``record_first`` steps, slowed by what a run's
        start does once (the first calls, the writer checksumming step 0's histograms on its thread): used
        only until three later recordings are known."""
        if not self.budgeted or not math.isfinite(seconds) or seconds <= 0:
            return
        if recording:
            self._recording_steps += 1
            self._recordings += recorded
            if heavy:
                self._heavy.append((seconds, own))
                return
            if early:
                self._early.append((seconds, own))
                return
            self._recording.append(seconds)
            self._own.append(own)
        else:
            self._plain.append(seconds)

    def propose(self) -> tuple[float, float, float]:
        """This rank's interval for its budget (1 while nothing is known), the cost of a recording and the plain
        step's time it comes from (seconds; NaN while nothing is known)."""
        pool = list(zip(self._recording, self._own))
        if len(pool) < 3:
            pool += self._early
        if not self.budgeted or not (pool or self._heavy):
            return 1.0, math.nan, math.nan
        if pool:
            rec, own = statistics.median(s for s, _ in pool), statistics.median(o for _, o in pool)
        else:  # only histogram steps so far (step 0): an upper bound
            rec, own = statistics.median(s for s, _ in self._heavy), statistics.median(o for _, o in self._heavy)
        per = self._recording_steps / max(self._recordings, 1)  # recording steps per recording (deferral: 2)
        if self._plain:
            plain = statistics.median(self._plain)
            cost = per * max(rec - plain, own)
        else:  # no plain step yet: what torchdiag's end-of-step work took, the step without it
            plain = max(rec - own, 1e-9)
            cost = per * own
        interval = float(min(max(1, math.ceil(cost / (self.budget * plain) - 1e-9)), _MAX_INTERVAL))
        return interval, cost, plain

    def agree(self, interval: float, cost: float = math.nan, step: float = math.nan) -> None:
        """What every rank applies: the largest interval proposed (in a single process, this one's), and the
        largest cost and step time, which the reports state."""
        if self.budgeted and math.isfinite(interval):
            self.interval = int(min(max(1, interval), _MAX_INTERVAL))
            self._cost, self._step_time = cost, step

    def observe_report(self, step: int, flags: frozenset, events: bool, trends: frozenset = frozenset(),
                       forecast: bool = False) -> None:
        """A published report: ``flags`` what it flagged (layer and problem), ``events`` a NaN/Inf or a loss spike
        at that step; ``trends`` the figures heading for their thresholds, ``forecast`` a forecast made. Something
        new (an event, or a flag no report raised in the last ``_RECENT`` steps: a flag that flickers on and off
        trips once) is a trip: the next ``settle`` recorded steps are recorded in full, whatever the budget, or
        ``settle_trend`` of them for a trend or a forecast."""
        if not self.budgeted:
            return
        new = events or any(step - self._seen.get(f, -math.inf) > _RECENT for f in flags)
        new_trend = forecast or any(step - self._seen.get(f, -math.inf) > _RECENT for f in trends)
        self._seen.update(dict.fromkeys(flags | trends, step))
        if new or new_trend:
            self.trip(step, max(self.settle if new else 0, self.settle_trend if new_trend else 0))

    def trip(self, step: int, steps: int | None = None) -> None:
        """Something new at ``step``: the next ``steps`` (default ``settle``) steps are recorded, whatever the
        budget."""
        if self.budgeted:
            self._trip_left = max(self._trip_left, self.settle if steps is None else steps)
            self._trip_step = step

    @property
    def current_interval(self) -> int:
        """One step in this many is being recorded (1 during the first steps and after a trip)."""
        if self.every is not None:
            return self.every
        return 1 if self.tripped or self._last_recorded < self.record_first - 1 else self.interval

    @property
    def tripped(self) -> bool:
        """The steps are being recorded in full after a trip."""
        return self._trip_left > 0

    # ---------------------------------------------------------------- what the reports say
    def describe(self) -> str:
        """The cadence in effect and why, in one line."""
        if self.every is not None:
            return "every step (every=1)" if self.every == 1 else f"every {self.every} steps (every={self.every})"
        pct = f"{100 * self.budget:g} %"
        if self._trip_left > 0 and self._trip_step is not None:
            return f"every step until it settles: something new at step {self._trip_step}; time budget {pct}"
        if self._last_recorded < self.record_first - 1 or not self._recording:
            return f"every step of the first {self.record_first}, then within the time budget of {pct}"
        if not (math.isfinite(self._cost) and math.isfinite(self._step_time)):
            return f"one step in {self.interval}; time budget {pct}"
        cost, step = _ms(self._cost), _ms(self._step_time)
        if self.interval <= 1:
            return (f"every step but one in {_PROBE_EVERY} (left unrecorded to time the step without torchdiag):"
                    f" recording costs {cost} on a {step} step; time budget {pct}")
        return f"one step in {self.interval}: recording costs {cost} on a {step} step; time budget {pct}"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2g} ms" if ms < 10 else f"{ms:.0f} ms"
