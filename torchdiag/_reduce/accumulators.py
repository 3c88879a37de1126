"""Host-side accumulators of one step, each field declaring how it combines across ranks.

A leaf (it imports nothing else of torchdiag). Every field of an accumulator carries its cross-rank
reduction in its metadata, as torchmetrics' ``add_state(..., dist_reduce_fx=...)`` does, so that
``distributed.reduce`` packs any accumulator without knowing what it measures:

* ``SUM``: summed over ranks (counts, sums of squares);
* ``MAX`` / ``MIN``: the extreme over ranks (a NaN on any rank makes the result NaN);
* ``MEAN``: the mean over the ranks that hold the accumulator (replicated figures, DDP's gradient norm);
* ``POOLED``: ``mean`` and ``m2`` of a ``MomentAccumulator``, pooled exactly over ranks about a shift every
  rank knows (the centre of the global range), so that they do not cancel where ``|mean| >> std``.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, Protocol, TypeVar

SUM, MAX, MIN, MEAN, POOLED = "sum", "max", "min", "mean", "pooled"

T = TypeVar("T")


class Accumulator(Protocol):
    """What ``reduce`` knows of an accumulator: a dataclass whose fields declare their reductions (``state``), that
    says whether it holds anything."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def is_empty(self) -> bool: ...


def state(default: T, reduce: str) -> T:
    """A dataclass field with its cross-rank reduction (typed as its default, as ``dataclasses.field`` is)."""
    return field(default=default, metadata={"reduce": reduce})


def reductions(acc: Accumulator | type[Accumulator]) -> list[tuple[str, str]]:
    """``[(field name, reduction), ...]`` of an accumulator (class or instance), in declaration order."""
    return [(f.name, f.metadata["reduce"]) for f in fields(acc)]


def row_moments(n: float, r: float, sd: float, sdd: float) -> tuple[float, float]:
    """(mean, M2) of ``n`` values from their sums about a shift ``r``: ``sd = sum(x - r)``, ``sdd = sum((x - r)^2)``
    (``stats``' rows, and the cross-rank sums of ``reduce``). The one place sums become moments;
    ``MomentAccumulator.merge`` combines moments, ``moment_sums`` goes back."""
    return r + sd / n, max(sdd - sd * sd / n, 0.0)


def moment_sums(n: float, mean: float, m2: float, r: float) -> tuple[float, float]:
    """``(sum(x - r), sum((x - r)^2))`` of ``n`` values with moments ``(mean, m2)``: the inverse of ``row_moments``
    (sums about a shift every rank knows add up exactly across ranks)."""
    d = mean - r
    return n * d, m2 + n * d * d


@dataclass
class MomentAccumulator:
    """Exact moments of everything merged so far, in float64 on the host."""

    n: int = state(0, SUM)
    mean: float = state(0.0, POOLED)
    m2: float = state(0.0, POOLED)  # sum of squared deviations from the mean
    min: float = state(math.inf, MIN)
    max: float = state(-math.inf, MAX)
    zeros: float = state(0.0, SUM)
    saturated: float = state(0.0, SUM)
    nonfinite: int = state(0, SUM)  # number of merged calls whose tensor held NaN/Inf
    calls: int = state(0, SUM)

    ACT_COLS = 7  # an activation row: r, sum(x-r), sum((x-r)^2), min, max, nonzero count, saturated count

    def add_row(self, n: int, row: list[float]) -> None:
        """Merge one call's row (see ``stats.act_row`` / ``stats.grad_row``)."""
        self.calls += 1
        r, sd, sdd = row[:3]
        if len(row) >= 5:
            mn, mx = row[3:5]
            finite = math.isfinite(mn) and math.isfinite(mx) and not math.isnan(sd)
            if math.isnan(mn) or math.isnan(mx):
                self.min, self.max = math.nan, math.nan
            else:
                self.min, self.max = min(self.min, mn), max(self.max, mx)
        else:
            finite = math.isfinite(sd) and math.isfinite(sdd)
        if not finite:
            self.nonfinite += 1
        if len(row) >= self.ACT_COLS:
            nonzero, sat = row[5:7]
            self.zeros += n - nonzero  # NaN when not counted
            self.saturated += sat
        self.merge(n, *row_moments(n, r, sd, sdd))

    def merge(self, n: int, mean: float, m2: float) -> None:
        """Chan et al. parallel merge of (n, mean, M2)."""
        if n == 0:
            return
        tot = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / tot
        self.m2 += m2 + delta * delta * self.n * n / tot
        self.n = tot

    def rescale(self, factor: float) -> None:
        """Moments of ``factor * x`` (GradScaler: report unscaled gradients)."""
        self.mean *= factor
        self.m2 *= factor * factor
        self.min, self.max = sorted((self.min * factor, self.max * factor))

    def is_empty(self) -> bool:
        return self.n == 0

    @property
    def var(self) -> float:
        return self.m2 / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.n else math.nan

    @property
    def rms(self) -> float:
        return math.sqrt(self.var + self.mean * self.mean) if self.n else math.nan

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def sumsq(self) -> float:
        """sum(x^2) = M2 + n * mean^2."""
        return self.m2 + self.n * self.mean * self.mean


@dataclass
class RangeCounts:
    """A half-precision tensor family against its format's range: the format's max (which format), the largest
    magnitude, and the element, non-zero and at-or-above-the-precision-floor (``normal``) counts."""

    fmax: float = state(0.0, MAX)
    absmax: float = state(0.0, MAX)
    n: float = state(0.0, SUM)
    nonzero: float = state(0.0, SUM)
    normal: float = state(0.0, SUM)

    def add_row(self, n: int, row: list[float]) -> None:
        """A statistics row with the format's max in place of its shift (``stats.range_row``): ``[format max, .,
        ., min, max, non-zero, at or above the floor]``."""
        fmax, mn, mx, nonzero, normal = row[0], row[3], row[4], row[5], row[6]
        absmax = math.nan if math.isnan(mn) or math.isnan(mx) else max(-mn, mx)
        self.fmax = max(self.fmax, fmax)
        self.absmax = absmax if math.isnan(absmax) else max(self.absmax, absmax)
        self.n += n
        self.nonzero += nonzero
        self.normal += normal

    def is_empty(self) -> bool:
        return self.n == 0


@dataclass
class SumSq:
    """A sum of squares and its element count (a weighted layer's input, the model's input)."""

    total: float = state(0.0, SUM)
    n: int = state(0, SUM)

    def add_row(self, n: int, row: list[float]) -> None:
        """Merge ``[sum(x^2)]`` or a statistics row ``[r, sum(x - r), sum((x - r)^2), ...]`` of ``n`` values."""
        if len(row) == 1:
            self.total += row[0]
        else:
            self.total += moment_sums(n, *row_moments(n, *row[:3]), 0.0)[1]
        self.n += n

    def is_empty(self) -> bool:
        return self.n == 0


@dataclass
class Update:
    """||w_new - w_old||^2, ||w_old||^2 and the elements of one layer across an optimizer step (sharded
    parameters: each rank's shard, summed)."""

    dd: float = state(0.0, SUM)
    ww: float = state(0.0, SUM)
    n: float = state(0.0, SUM)

    def is_empty(self) -> bool:
        return False


@dataclass
class GradNorms:
    """The step's gradient sum of squares before and after the user's clipping: replicated parameters' parts
    are the same on every rank (averaged), sharded ones' are summed over shards."""

    pre_replicated: float = state(0.0, MEAN)
    post_replicated: float = state(0.0, MEAN)
    pre_sharded: float = state(0.0, SUM)
    post_sharded: float = state(0.0, SUM)

    def is_empty(self) -> bool:
        return False


@dataclass
class Scale:
    """GradScaler's scale in effect for the step's backward."""

    value: float = state(-math.inf, MAX)

    def is_empty(self) -> bool:
        return False


@dataclass
class LayerCall:
    """A layer's first-call position in the step and how often it was called (per rank: the earliest, the most)."""

    first: float = state(math.inf, MIN)
    calls: int = state(0, MAX)

    def is_empty(self) -> bool:
        return False


@dataclass
class AttentionFigures:
    """An attention layer's divergence signals on one rank: its largest logit (the largest of any rank) and its
    mean entropy (the mean over the ranks that measured it). A figure that is not finite counts as not measured."""

    top: float = state(-math.inf, MAX)
    entropy: float = state(0.0, SUM)
    n: float = state(0.0, SUM)

    def __post_init__(self) -> None:
        if not math.isfinite(self.top):
            self.top = -math.inf
        if not math.isfinite(self.entropy):
            self.entropy, self.n = 0.0, 0.0

    def is_empty(self) -> bool:
        return self.n == 0 and not math.isfinite(self.top)


@dataclass
class MeanFigure:
    """A figure averaged over the ranks that measured it (the output log Z); not finite: not measured."""

    total: float = state(0.0, SUM)
    n: float = state(0.0, SUM)

    def __post_init__(self) -> None:
        if not math.isfinite(self.total):
            self.total, self.n = 0.0, 0.0

    def is_empty(self) -> bool:
        return self.n == 0


@dataclass
class Largest:
    """A figure whose largest over the ranks is what counts (how far the output's gradient is from summing to zero:
    under a threshold on every rank when its largest is)."""

    value: float = state(-math.inf, MAX)

    def is_empty(self) -> bool:
        return False


@dataclass
class Figure:
    """One number as it is, NaN included (a loss). Left out of every reduction layout: each rank's own."""

    value: float = state(math.nan, MEAN)

    def is_empty(self) -> bool:
        return False


@dataclass
class GradRms:
    """A weight's mean squared gradient and Adam's eps on one rank (``sq / n`` over the ranks: the square of the rms of
    every rank's gradient; DDP's agree anyway). Not finite: not measured."""

    sq: float = state(0.0, SUM)
    n: float = state(0.0, SUM)
    eps: float = state(0.0, SUM)

    def __post_init__(self) -> None:
        if not math.isfinite(self.sq):
            self.sq, self.n, self.eps = 0.0, 0.0, 0.0

    def is_empty(self) -> bool:
        return self.n == 0


@dataclass
class StepNumber:
    """The step number on every rank: ``low != high`` means the ranks are at different steps."""

    low: float = state(math.inf, MIN)
    high: float = state(-math.inf, MAX)

    def is_empty(self) -> bool:
        return False


@dataclass
class Interval:
    """The recording interval a rank's time budget asks for, from its cost and step time, torchdiag's work at a
    step not recorded and a histogram step's extra time (seconds), and the lengthening of the histogram windows
    (``_record.cadence.Cadence.propose``): every rank applies the largest of each."""

    steps: float = state(1.0, MAX)
    cost: float = state(math.nan, MAX)
    step: float = state(math.nan, MAX)
    every_step: float = state(-math.inf, MAX)  # -inf while not timed
    heavy: float = state(-math.inf, MAX)  # -inf while not timed (a rank that bins no histograms)
    stretch: float = state(1.0, MAX)

    def is_empty(self) -> bool:
        return False
