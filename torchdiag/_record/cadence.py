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
out to measure it.

The budget covers what torchdiag does at the steps it does not record, and its histogram steps, too. Its work at a
plain step (``step()``, the hooks coming off and on), timed directly, takes its share of every step. Histogram
steps (the histograms and the overview images, on windows of their own: ``histogram_every``, ``overview_every``)
are not what a recording costs: their extra time over a recording is measured apart, and under the budget their
windows lengthen, doubling (``stretch``), until they take at most ``_HEAVY_SHARE`` of it. The recordings get what
is left, at least a tenth of the budget (``_LEAST_SHARE``): on a model whose step is as short as torchdiag's work at
a plain step, the budget cannot be kept, and the report says what a step costs.

Under torch.distributed every rank must record the same steps (each recorded step runs a collective): each rank
proposes its ``k`` (``propose``) and the largest, reduced with the step's statistics, is what every rank applies
(``agree``); trips come from the reduced report, the same on every rank.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from .._reduce.accumulators import Interval

_PROBE_EVERY = 100  # recording every step: one plain step in this many measures the step without torchdiag
_MAX_INTERVAL = 1000  # the sparsest budget cadence: a recorded step at least every 1000 steps
_PLAIN_KEEP, _RECORDING_KEEP = 15, 9  # step times kept for the medians
_RECENT = 100  # a flag raised again within this many steps is not news
_RAMP = 4  # the gap between recorded steps grows at most this many times from one to the next
_HEAVY_SHARE = 1 / 3  # of the budget, at most, for the histogram steps (their windows lengthen until it fits)
_LEAST_SHARE = 0.1  # of the budget, at least, for the recordings, whatever the plain steps and histograms take
_MAX_STRETCH = 64  # the histogram and overview windows lengthen at most this many times


class Cadence:
    """The recording schedule of one watch.

    ``decide(step)`` says whether a step is recorded. ``every``: a fixed cadence (steps 0, N, 2N...), or None for
    the time budget: ``budget`` (the fraction of the training time torchdiag may take), ``record_first`` (steps
    always recorded at the start), ``settle`` (recorded steps without anything new before a trip is over: what a
    flag needs to become a finding), ``settle_trend`` (the same after a figure heading for its threshold: what a
    forecast fits) and ``heavy_every`` (the histogram window, ``histogram_every``: 0 for none; its steps' cost is
    weighed against it).
    """

    def __init__(self, every: int | None, budget: float = 0.03, record_first: int = 5, settle: int = 5,
                 settle_trend: int | None = None, heavy_every: int = 0) -> None:
        self.every = every
        self.budget = budget
        self.heavy_every = heavy_every
        # the budget's agreed lengthening of the histogram and overview windows (a power of two), in effect from the
        # next step decided: a step's histograms and its overview images are decided with the same one
        self.stretch = self._agreed_stretch = 1
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
        self._plain_own: deque[float] = deque(maxlen=_PLAIN_KEEP)  # torchdiag's work at a plain step, timed directly
        self._recording: deque[float] = deque(maxlen=_RECORDING_KEEP)
        self._own: deque[float] = deque(maxlen=_RECORDING_KEEP)  # torchdiag's end-of-step work, timed directly
        self._heavy: deque[tuple[float, float]] = deque(maxlen=_RECORDING_KEEP)  # histogram steps (time, own)
        self._early: list[tuple[float, float]] = []  # the first steps' recordings (time, own)
        self._probes = 0  # plain steps decided while every step fits the budget
        self._recording_steps = 0  # steps that recorded or completed a recording
        self._recordings = 0  # steps recorded
        self._last_plain = -1  # the last step decided plain
        self._cost = self._step_time = math.nan  # the latest agreed estimates (seconds)
        # (seconds; -inf while not timed): torchdiag's work at a plain step; a histogram step's extra time
        self._every_step = self._heavy_cost = -math.inf

    @property
    def budgeted(self) -> bool:
        return self.every is None

    def no_heavy(self) -> None:
        """No more histogram steps (histograms turned off): none of the budget goes to them from now on."""
        self.heavy_every = 0
        self._heavy.clear()

    # ---------------------------------------------------------------- the schedule
    def decide(self, step: int) -> bool:
        """Whether ``step`` is recorded; called once per step, in order. Depends only on step numbers, agreed
        intervals and reports, never on a clock read on this rank alone, so that every rank of a group decides
        alike."""
        self.stretch = self._agreed_stretch
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
        ``own``: torchdiag's work at the end of it (all of its work, at a plain step); ``recorded``: it recorded;
        ``heavy``: it also binned histograms (their own schedule: not what a recording costs, unless nothing else
        is known yet); ``early``: one of the first ``record_first`` steps, slowed by what a run's
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
            self._plain_own.append(own)

    def propose(self) -> Interval:
        """This rank's proposal (``Interval``'s defaults where nothing is known yet), in seconds where timed: the
        interval of its recordings, the cost of a recording and the plain step's time, torchdiag's work at a plain
        step and the extra time of a histogram step (not timed on a rank that bins no histograms), and the
        lengthening of the histogram and overview windows (``stretch``)."""
        pool = list(zip(self._recording, self._own))
        if len(pool) < 3:
            pool += self._early
        if not self.budgeted or not (pool or self._heavy):
            return Interval()
        if pool:
            rec, own = statistics.median(s for s, _ in pool), statistics.median(o for _, o in pool)
        else:  # only histogram steps so far (step 0): an upper bound
            rec, own = statistics.median(s for s, _ in self._heavy), statistics.median(o for _, o in self._heavy)
        per = self._recording_steps / max(self._recordings, 1)  # recording steps per recording (deferral: 2)
        if self._plain:
            plain = statistics.median(self._plain)
            cost = per * max(rec - plain, own)
            every_step = statistics.median(self._plain_own)
        else:  # no plain step yet: what torchdiag's end-of-step work took, the step without it
            plain = max(rec - own, 1e-9)
            cost = per * own
            every_step = 0.0
        heavy, stretch = -math.inf, 1
        if len(self._recording) >= 3 and self._heavy and self.heavy_every:
            # a histogram step's time over a recording's (its work, timed directly, a floor), against recordings
            # after the first steps: until then the windows are as configured
            heavy = max(statistics.median(s for s, _ in self._heavy) - rec,
                        statistics.median(o for _, o in self._heavy) - own, 0.0)
            while stretch < _MAX_STRETCH and heavy > _HEAVY_SHARE * self.budget * stretch * self.heavy_every * plain:
                stretch *= 2
        left = self.budget - every_step / plain - (heavy / (stretch * self.heavy_every * plain)
                                                   if math.isfinite(heavy) else 0.0)
        left = max(left, _LEAST_SHARE * self.budget)
        interval = float(min(max(1, math.ceil(cost / (left * plain) - 1e-9)), _MAX_INTERVAL))
        return Interval(interval, cost, plain, every_step if self._plain else -math.inf, heavy, float(stretch))

    def agree(self, agreed: Interval) -> None:
        """What every rank applies: the largest of each field proposed (in a single process, this one's proposal);
        the times are what the reports state (-inf: not timed on any rank). The stretch takes effect at the next
        step decided."""
        if self.budgeted and math.isfinite(agreed.steps):
            self.interval = int(min(max(1, agreed.steps), _MAX_INTERVAL))
            self._agreed_stretch = int(min(max(1, agreed.stretch), _MAX_STRETCH)) if math.isfinite(agreed.stretch) \
                else 1
            self._cost, self._step_time = agreed.cost, agreed.step
            self._every_step, self._heavy_cost = agreed.every_step, agreed.heavy

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
        why = f"recording costs {_ms(self._cost)} on a {_ms(self._step_time)} step"
        if math.isfinite(self._every_step) and self._every_step >= _LEAST_SHARE * self.budget * self._step_time:
            why += f", a step not recorded {_ms(self._every_step)}"  # (where it takes a share of the budget)
        if self.stretch > 1 and math.isfinite(self._heavy_cost):
            why += (f", a histogram step {_ms(self._heavy_cost)} more (histogram and overview windows"
                    f" {self.stretch}x longer)")
        share = self._every_step / self._step_time if math.isfinite(self._every_step) else 0.0
        if share > (1 - _LEAST_SHARE) * self.budget:  # the recordings keep their tenth: the budget cannot be kept
            pct += f", not kept: a step not recorded takes {100 * share:.2g} % of the step"
        if self.interval <= 1:
            return (f"every step but one in {_PROBE_EVERY} (left unrecorded to time the step without torchdiag):"
                    f" {why}; time budget {pct}")
        return f"one step in {self.interval}: {why}; time budget {pct}"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2g} ms" if ms < 10 else f"{ms:.0f} ms"
