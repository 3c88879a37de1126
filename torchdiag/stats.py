"""Pure statistics: tensors -> on-device moment rows, host rows -> merged moments.

Each recorded tensor becomes one short row of float32 numbers computed where the tensor
lives, with no host synchronisation. Moments are taken about a shift ``r`` (the tensor's
first element), so ``sum((x-r)**2)`` does not cancel catastrophically when ``|mean| >> std``.
The host later turns rows into exact per-call moments and merges calls with Chan's
parallel formula in float64.

NaN/Inf are detected from the row's min/max (``aminmax`` propagates NaN), which costs
nothing extra; counting them element by element would cost a full pass (~20x a ``sum``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Row layouts (column meaning) for each kind of recorded tensor.
ACT_COLS = 8  # r, sum(d), sum(d^2), min, max, sum(sign x), sum(sign(x)^2), saturated count
GRAD_COLS = 5  # r, sum(d), sum(d^2), min, max
ROW_WIDTH = ACT_COLS


def _flat32(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.reshape(-1)


def _shifted_moments(x: torch.Tensor) -> list[torch.Tensor]:
    r = x[0]
    d = x - r
    mn, mx = torch.aminmax(x)
    return [r, d.sum(), torch.dot(d, d), mn, mx]


def grad_row(g: torch.Tensor) -> list[torch.Tensor]:
    """Moments of a gradient: shift, sum and sum of squares about it, min, max."""
    return _shifted_moments(_flat32(g))


def act_row(y: torch.Tensor, saturation: tuple[float, float] | None = None) -> list[torch.Tensor]:
    """Moments of an activation plus sign counts and, if asked, a saturation count.

    ``saturation`` is ``(centre, half_width)``: an element counts as saturated when
    ``|y - centre| > half_width``.
    """
    x = _flat32(y)
    row = _shifted_moments(x)
    s = torch.sign(x)
    row += [s.sum(), torch.dot(s, s)]
    if saturation is None:
        row.append(row[1].new_zeros(()))
    else:
        c, h = saturation
        row.append(((x - c).abs() > h).sum(dtype=x.dtype))
    return row


def sumsq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a tensor (for an rms), as a 0-d float tensor."""
    f = _flat32(x)
    return torch.dot(f, f)


@dataclass
class Moments:
    """Exact moments of everything merged so far, in float64 on the host."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    min: float = math.inf
    max: float = -math.inf
    zeros: float = 0.0
    positive: float = 0.0
    saturated: float = 0.0
    nonfinite: int = 0  # number of merged calls whose tensor held NaN/Inf
    calls: int = 0

    def add_row(self, n: int, row: list[float]) -> None:
        """Merge one call's row (see ``act_row`` / ``grad_row``)."""
        self.calls += 1
        r, sd, sdd, mn, mx = row[:5]
        if not (math.isfinite(mn) and math.isfinite(mx)):
            self.nonfinite += 1
        if math.isnan(mn) or math.isnan(mx):
            self.min, self.max = math.nan, math.nan
        else:
            self.min, self.max = min(self.min, mn), max(self.max, mx)
        if len(row) >= ACT_COLS:
            ssum, ssq, sat = row[5:8]
            self.zeros += n - ssq
            self.positive += (ssq + ssum) / 2
            self.saturated += sat
        mean = r + sd / n
        m2 = max(sdd - sd * sd / n, 0.0)
        self.merge(n, mean, m2)

    def merge(self, n: int, mean: float, m2: float) -> None:
        """Chan et al. parallel merge of (n, mean, M2)."""
        if n == 0:
            return
        tot = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / tot
        self.m2 += m2 + delta * delta * self.n * n / tot
        self.n = tot

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
