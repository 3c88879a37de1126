"""Run-level verdict: which per-step flags are findings of the run. Pure Python, no tensors.

A per-step flag is evidence; a finding is a flag that is an init problem (raised at the first recorded
step), non-finite (never noise), a float16 output within its overflow margin (an Inf is one step of growth away),
a divergence the updates made (``_URGENT``, with reason ``optimisation``), or
persistent (raised at ``finding_steps`` of the last ``finding_window`` recorded steps). A finding keeps the step
it first appeared at and whether it has recovered (not raised at the latest recorded step). ``report()``,
``summarize``, ``check`` and the demo judge a run by its findings, so their verdict does not depend on which step
they read.

``decide`` turns the problems found into the verdict line and exit status of ``torchdiag check`` and
``torchdiag summarize`` (``OK`` 0, ``FLAGGED`` 1; ``ERROR`` 2 is theirs: nothing could be judged).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .._report.report import STATUSES, LayerReport, Report
from ..config import Config

OK, FLAGGED, ERROR = 0, 1, 2  # the exit status of `torchdiag check` and `torchdiag summarize`

#: what a trained run's updates did that is never a wobble: a chain whose drift moved orders of magnitude from its
#: start, attention or output logits past the figures every diverged run passed. Findings when first raised, so the
#: warning comes while the loss diverges, not steps later.
_URGENT = frozenset({"exploding", "vanishing", "attention_logits", "attention_entropy", "output_logits"})

#: (layer name, problem, direction): one flag on one layer
Key = tuple[str, str, "str | None"]


@dataclass
class RunFinding:
    """One problem on one layer over a run."""

    layer: str
    module_type: str
    index: int  # execution order of the layer
    problem: str  # one of report.STATUSES
    direction: str | None  # 'forward' / 'backward' for drift
    first_step: int  # the watcher's step it was first raised at (it may have been raised before it persisted)
    last_step: int  # the latest step it was raised at
    steps: int  # how many recorded steps raised it
    recovered: bool  # not raised at the latest recorded step
    message: str  # the latest step's sentence, with its fix
    cause: str | None = None  # the weighted layer whose weights to change (drift), or None
    reason: str | None = None  # what it is blamed on: one of REASONS ('init', 'optimisation', 'data'...)

    def describe(self) -> str:
        """One line: the layer, the problem, from which step, and whether it is still there."""
        where = f" ({self.direction})" if self.direction else ""
        state = f"recovered after step {self.last_step}" if self.recovered else f"still at step {self.last_step}"
        return f"'{self.layer}' {self.problem}{where} from step {self.first_step}, {state}"


@dataclass
class _Seen:
    """What one flag looked like at the recorded steps so far."""

    module_type: str
    index: int
    first_step: int
    last_step: int
    steps: int
    message: str
    cause: str | None
    reason: str | None = None
    finding: bool = False
    found_at: int | None = None  # the step it became a finding at


class RunVerdict:
    """Accumulates per-step flags into run-level findings.

    Example:
        >>> from torchdiag._report.report import Report, LayerReport, Finding
        >>> v = RunVerdict.from_config(Config.defaults())
        >>> row = LayerReport(name="0", module_type="Linear", index=0, calls=1, status={"dead"},
        ...                   findings=[Finding("dead", None, 0.95, 0.9, "dead_fraction", "...")])
        >>> [f.layer for f in v.add(Report(layers=[row], step=0))]
        ['0']
    """

    def __init__(self, steps: int = 3, window: int = 5) -> None:
        if not 1 <= steps <= window:
            raise ValueError(f"RunVerdict: expected 1 <= steps <= window, got steps={steps}, window={window}")
        self.steps, self.window = steps, window
        self._recorded: deque[int] = deque(maxlen=window)  # the latest recorded steps
        self._raised: dict[Key, deque[int]] = {}  # per flag: the recorded steps (within the window) that raised it
        self._seen: dict[Key, _Seen] = {}
        self._first: int | None = None

    @classmethod
    def from_config(cls, config: Config) -> RunVerdict:
        return cls(config.finding_steps, config.finding_window)

    @property
    def recorded_steps(self) -> int:
        return 0 if self._first is None else len(self._recorded)

    def add(self, report: Report) -> list[RunFinding]:
        """Take one recorded step's report; return the flags that became findings at this step."""
        return self.add_flags(report.step, ((layer.name, layer.module_type, layer.index, problem, direction, message,
                                             cause, reason) for layer in report.layers
                                            for problem, direction, message, cause, reason in _flags(layer)))

    def add_flags(self, step: int, flags: Iterable[tuple]) -> list[RunFinding]:
        """Take one recorded step's flags, each ``(layer, module_type, index, problem, direction, message, cause)``
        and optionally its reason (what ``summarize`` reads back from a logdir); return those that became findings
        at this step."""
        if self._first is None:
            self._first = step
        self._recorded.append(step)
        oldest = self._recorded[0]
        new: list[RunFinding] = []
        raised_now: set[Key] = set()
        for name, module_type, index, problem, direction, message, cause, *reason in flags:
            key = (name, problem, direction)
            raised_now.add(key)
            seen = self._seen.get(key)
            if seen is None:
                seen = self._seen[key] = _Seen(module_type, index, step, step, 0, message, cause)
            seen.last_step, seen.message, seen.cause = step, message, cause
            if reason and (seen.reason is None or seen.steps == 0):
                seen.reason = reason[0]  # the cause it first had (an init problem stays one)
            seen.steps += 1
            hist = self._raised.setdefault(key, deque())
            hist.append(step)
            while hist and hist[0] < oldest:
                hist.popleft()
            immediate = (problem == "nonfinite" or (problem == "overflow_risk" and key[2] == "forward")
                         or (reason and reason[0] == "optimisation" and problem in _URGENT))
            if not seen.finding and (step == self._first or immediate or len(hist) >= self.steps):
                seen.finding, seen.found_at = True, step
                new.append(self._finding(key, seen))
        for key, hist in self._raised.items():
            if key not in raised_now:
                while hist and hist[0] < oldest:
                    hist.popleft()
        return new

    def findings(self) -> list[RunFinding]:
        """Every finding of the run so far, in execution order of the layers."""
        out = [self._finding(k, s) for k, s in self._seen.items() if s.finding]
        return sorted(out, key=lambda f: (f.index, f.problem, f.direction or ""))

    def _finding(self, key: Key, seen: _Seen) -> RunFinding:
        name, problem, direction = key
        recovered = seen.last_step != self._recorded[-1]
        return RunFinding(name, seen.module_type, seen.index, problem, direction, seen.first_step, seen.last_step,
                          seen.steps, recovered, seen.message, seen.cause, seen.reason)


def _flags(layer: LayerReport) -> Iterable[tuple[str, str | None, str, str | None, str | None]]:
    """(problem, direction, message, cause, reason) of each finding a layer carries at one step. Flags without a
    sentence of their own (the layers after the first non-finite one) are its consequences, not findings."""
    for f in layer.findings:
        yield f.problem, f.direction, f.message, f.cause, f.reason


def verdict_of(reports: Iterable, config: Config | None = None) -> list[RunFinding]:
    """The run's findings from its per-step reports, in step order (what summarize judges a logdir by)."""
    v = RunVerdict.from_config(config or Config.defaults())
    for r in reports:
        v.add(r)
    return v.findings()


@dataclass
class Verdict:
    """The judgement of one report or run: exit status (``OK`` or ``FLAGGED``), one line, what it blames."""

    status: int
    line: str
    problems: list[str]  # the problems that count (in ``fail_on``), in ``STATUSES`` order
    layers: list[str] = field(default_factory=list)  # the layers flagged, in execution order
    found: list[str] = field(default_factory=list)  # every problem found, in ``STATUSES`` order


def decide(found: Iterable[str], fail_on: Iterable[str], *, verb: str, where: str = "",
           layers: Iterable[str] = ()) -> Verdict:
    """The verdict of ``torchdiag check`` and ``torchdiag summarize``: ``FLAGGED`` when a problem found is one of
    ``fail_on``, else ``OK``; the line says which (``verb``: "flagged", "found"; ``where``: "at step 3"...).

    Example:
        >>> decide({"dead", "vanishing"}, {"dead"}, verb="found", where="at step 2").line
        'FAIL: dead found at step 2'
        >>> decide({"vanishing"}, {"dead"}, verb="flagged").status
        0
    """
    found, fail = set(found), set(fail_on)
    seen = [p for p in STATUSES if p in found]
    hit = [p for p in seen if p in fail]
    at = f" {where}" if where else ""
    if hit:
        return Verdict(FLAGGED, f"FAIL: {', '.join(hit)} {verb}{at}", hit, list(layers), seen)
    if seen:
        return Verdict(OK, f"OK: {', '.join(seen)} {verb}{at}, not in --fail-on"
                           f" ({', '.join(p for p in STATUSES if p in fail)})", [], list(layers), seen)
    return Verdict(OK, f"OK: nothing {verb}{at}", [], [], [])
