"""Rules for the signals that precede divergence (``signals.py`` measures them): attention logits and entropy,
output-logit drift, gradients at Adam's epsilon, loss spikes. Pure: numbers and config in, findings out.

Thresholds and their reasons are in ``defaults.yaml``; every rule is checked against the healthy real
architectures of ``tests/helpers/real_zoo.py`` (silent on each) and against the broken cases of the papers.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from .._report.report import Finding, LayerReport, Report
from .._vocab import FORMATS, StepSignals
from ..config import Config
from ._drift import QUERY_KEY


def _flag(row: LayerReport, f: Finding) -> None:
    row.status.add(f.problem)
    row.findings.append(f)


def _row(report: Report, name: str) -> LayerReport | None:
    return next((r for r in report.layers if r.name == name), None)


def judge(report: Report, sig: StepSignals, cfg: Config, adam_before: AbstractSet[str] = frozenset(),
          pull_start: float | None = None) -> set[str]:
    """Add the attention, output-logit and Adam-epsilon findings of one recorded step to ``report``.

    ``adam_before``: the layers whose gradient was near Adam's eps at the previous recorded step; a layer is flagged
    when it is at two in a row (Adam's first updates move a layer-scaled branch, ConvNeXt's gamma = 1e-6, whose
    gradients start near eps; one step later the scale has grown out of it). ``pull_start``: the gradient std at the
    model's output at the first recorded step; once it has fallen a thousandfold the model has fitted its data and
    small gradients are not eps's doing. Returns this step's such layers."""
    near: set[str] = set()
    for name, (top, ent) in sig.attention.items():
        row = _row(report, name)
        if row is None:
            continue
        row.attention_logit_max = None if math.isnan(top) else top
        row.attention_entropy = None if math.isnan(ent) else ent
        reason = "optimisation" if report.trained else "init"
        fix = "qk-layernorm (normalise q and k before the dot product) or QK-clip, or a lower learning rate" \
            if report.trained else _query_key_init(report, name)
        if math.isfinite(top) and top > cfg.attention_logit_max:
            _flag(row, Finding(
                "attention_logits", None, top, cfg.attention_logit_max, "attention_logit_max",
                f"'{name}': the largest attention logit q.k/sqrt(d) is {top:.3g} (attention_logit_max"
                f" {cfg.attention_logit_max:g}): attention goes one-hot and small transformers whose logits passed"
                f" 1e4 all diverged (Wortsman et al. 2023). Fix: {fix}.", reason=reason))
        if math.isfinite(ent) and ent < cfg.attention_entropy_min:
            _flag(row, Finding(
                "attention_entropy", None, ent, cfg.attention_entropy_min, "attention_entropy_min",
                f"'{name}': attention entropy collapsed: its heads average {ent:.3f} of the uniform entropy"
                f" (attention_entropy_min {cfg.attention_entropy_min:g}), near one-hot (ViT-22B, Dehghani et al."
                f" 2023). Fix: {fix}.", reason=reason))
    if sig.logz is not None and sig.softmax_output and report.layers:
        head = next((r for r in reversed(report.layers) if r.fan_in is not None), report.layers[-1])
        head.output_logz = sig.logz
        if math.isfinite(sig.logz) and sig.logz < -cfg.output_logz_max:
            _flag(head, Finding(
                "output_logits", None, sig.logz, -cfg.output_logz_max, "output_logz_max",
                f"'{head.name}': the output logits diverged: mean log Z = {sig.logz:.3g} (below -output_logz_max"
                f" {cfg.output_logz_max:g}); every logit went very negative, the softmax ignores that offset so"
                " nothing pulls it back, and the logits lose precision (bf16 spacing is 0.25 at |50|). Fix: add"
                " z-loss, 1e-4 * logsumexp(logits)**2 (PaLM; Wortsman et al. 2023).", reason="optimisation"))
    pull = report.output_grad_std
    for name, (rms, eps) in sig.adam.items():
        row = _row(report, name)
        if row is None or not (rms > 0 and math.isfinite(rms)):
            continue
        row.adam_grad_rms = rms
        if pull is not None and pull_start and pull < _FITTED * pull_start:
            continue  # the loss's own pull fell a thousandfold since the start (a fitted model): nothing to learn
        if rms < cfg.adam_epsilon_factor * eps:
            near.add(name)
        if name in near and name in adam_before:
            suggest = 10.0 ** math.floor(math.log10(rms / 100.0))
            _flag(row, Finding(
                "adam_epsilon", None, rms / eps, cfg.adam_epsilon_factor, "adam_epsilon_factor",
                f"'{name}': its gradient rms {rms:.2g} is {rms / eps:.2g} x Adam's eps {eps:g}"
                f" (adam_epsilon_factor {cfg.adam_epsilon_factor:g}): the update m/(sqrt(v)+eps) is damped by"
                f" ~{eps / (rms + eps):.0%}. Fix: eps={suggest:.0e} (Wortsman et al. 2023), or a loss scale that"
                " does not shrink the gradients.", reason="optimisation"))
    return near


_FITTED = 1e-3  # the output gradient at this fraction of its start: the loss is (near) zero, nothing left to learn


def _query_key_init(report: Report, attention: str) -> str:
    """The init fix for attention that is one-hot before any update: the scale of its query/key weights."""
    parent = attention.rpartition(".")[0]  # the figures sit on the attention module, or on its query projection
    qk = [(r.name, r.weight_std, r.fan_in) for r in report.layers
          if (r.name.startswith(attention + ".") or r.name.rpartition(".")[0] == parent)
          and QUERY_KEY.search(r.name) and r.weight_std and r.fan_in]
    if not qk:
        return "the query/key weights are too large at init: re-initialise them (std 1/sqrt(d_model) or the 0.02 of" \
               " GPT-2/BERT), or add qk-layernorm"
    name, std, fan_in = max(qk, key=lambda q: q[1] * math.sqrt(q[2]))
    unit = 1 / math.sqrt(fan_in)
    return (f"nothing was trained yet: '{name}' has weight std {std:.3g}, ×{std / unit:.3g} the"
            f" 1/sqrt(fan_in) = {unit:.3g} of a unit-gain init (GPT-2/BERT use 0.02); re-initialise the query/key"
            " weights at that scale, or add qk-layernorm")


@dataclass
class LossSpike:
    """A loss far above the run's recent losses, and the layers whose gradient or update norm spiked first.

    ``median`` and ``scale`` are those of the recent losses, in log units where every loss is positive (the log of a
    loss is what a training curve shows; near zero its raw value is heavy-tailed), else in the loss's own units;
    ``sigmas`` is how many robust standard deviations (1.4826 MAD) above the median the loss is."""

    step: int
    loss: float
    median: float
    scale: float
    sigmas: float
    layers: list[tuple[str, str, int]] = field(default_factory=list)  # (layer, 'gradient' | 'update', step)
    log: bool = True

    @property
    def message(self) -> str:
        first = "; first to spike: " + ", ".join(f"'{n}' {what} norm at step {s}" for n, what, s in self.layers) \
            if self.layers else ""
        typical = math.exp(self.median) if self.log else self.median
        units = f"{math.expm1(self.scale):.2g} of it" if self.log else f"{self.scale:.2g}"
        return (f"loss spike at step {self.step}: {self.loss:.4g} is {self.sigmas:.1f} robust sigma above the median"
                f" {typical:.4g} (spread {units}) of the steps before it{first}. Fix: lower the learning rate"
                " or clip gradients; skip the batch if it repeats.")


def robust_z(history: Sequence[float], x: float) -> tuple[float, float, float, bool]:
    """(median, robust std, z of ``x``, in log units?) of ``history``: the median and 1.4826 x the median absolute
    deviation, of the logs where ``x`` and every loss are non-negative (floored at ``_LOSS_FLOOR``: a fitted model's
    losses of exactly 0 and 1e-8 are the same nothing). The std is at least 0.1 % (of the median, or in log units;
    in the loss's own units, of the largest loss too): a flat loss's rounding is not a spike."""
    log = x >= 0 and min(history) >= 0
    vals = [math.log(max(v, _LOSS_FLOOR)) for v in history] if log else list(history)
    y = math.log(max(x, _LOSS_FLOOR)) if log else x
    med = statistics.median(vals)
    mad = statistics.median(abs(v - med) for v in vals) * 1.4826
    floor = 1e-3 if log else 1e-3 * max(abs(med), max(abs(v) for v in vals))
    return med, max(mad, floor, 1e-12), (y - med) / max(mad, floor, 1e-12), log


_LOSS_FLOOR = 1e-6  # a loss below this is a fitted example (float32 cross-entropy of a margin past ~14 rounds to 0)


class LossSpikes:
    """Loss spikes against the run's own recent losses (``loss_spike_sigma`` robust standard deviations over
    ``loss_spike_window`` steps), and which layers' gradient or update norms jumped first in the recorded steps
    before one."""

    def __init__(self, cfg: Config) -> None:
        self.sigma = cfg.loss_spike_sigma
        self.min_steps = cfg.loss_spike_min_steps
        self._losses: deque[float] = deque(maxlen=cfg.loss_spike_window)
        self._layers: deque[tuple[int, dict[str, tuple[float | None, float | None]]]] = deque(maxlen=64)
        self.spikes: list[LossSpike] = []
        self._streak: list[float] = []  # consecutive spiking losses: one episode, reported once

    def add_layers(self, report: Report) -> None:
        """The recorded step's per-layer gradient norms and update ratios (what a spike is traced to)."""
        self._layers.append((report.step, {r.name: (r.grad_norm, r.update_ratio) for r in report.layers}))

    def feed(self, losses: list[tuple[int, float]]) -> list[LossSpike]:
        """Judge new (step, loss) pairs; return the spikes that start an episode (consecutive spiking losses are one
        episode; three in a row are a new level, which joins the baseline)."""
        found = []
        for step, loss in losses:
            if not math.isfinite(loss):
                continue  # a non-finite loss is the non-finite origin's
            if len(self._losses) >= self.min_steps:
                med, scale, z, log = robust_z(self._losses, loss)
                if z > self.sigma:
                    if not self._streak:
                        found.append(LossSpike(step, loss, med, scale, z, self._first_jumps(step), log))
                    self._streak.append(loss)
                    if len(self._streak) >= 3:  # not a spike: the loss moved to a new level
                        self._move_level()
                    continue
            self._streak = []
            self._losses.append(loss)
        self.spikes += found
        return found

    def would_spike(self, loss: float) -> bool:
        """Whether ``loss`` would be a spike (or is not finite) against the losses judged so far; nothing changes."""
        if not math.isfinite(loss):
            return True
        return len(self._losses) >= self.min_steps and robust_z(self._losses, loss)[2] > self.sigma

    def _move_level(self) -> None:
        """The recent losses moved to the streak's level (their median shifted onto the streak's, in log units where
        every loss is positive): the noise learnt so far is kept, the level is the new one."""
        old, new = list(self._losses), self._streak
        if min(old + new) > 0:
            shift = statistics.median(math.log(x) for x in new) - statistics.median(math.log(x) for x in old)
            moved = [x * math.exp(shift) for x in old]
        else:
            shift = statistics.median(new) - statistics.median(old)
            moved = [x + shift for x in old]
        self._losses.clear()
        self._losses.extend(moved + new)
        self._streak = []

    def _first_jumps(self, step: int, factor: float = 3.0, top: int = 3, near: int = 8) -> list[tuple[str, str, int]]:
        """Layers whose gradient norm or update ratio went above ``factor`` x its median over the recorded steps
        before, in the last ``near`` recorded steps up to ``step``: the earliest first."""
        history = [(s, layers) for s, layers in self._layers if s <= step]
        first: dict[tuple[str, str], int] = {}
        for i in range(max(3, len(history) - near), len(history)):
            s, layers = history[i]
            for name, values in layers.items():
                for what, idx in (("gradient", 0), ("update", 1)):
                    v = values[idx]
                    before = [h[1].get(name, (None, None))[idx] for h in history[:i]]
                    past = [p for p in before if p is not None and math.isfinite(p) and p > 0]
                    if v is None or len(past) < 3 or (name, what) in first:
                        continue
                    if v > factor * statistics.median(past):
                        first[(name, what)] = s
        ranked = sorted(first.items(), key=lambda kv: kv[1])
        return [(name, what, s) for (name, what), s in ranked[:top]]


@dataclass
class Forecast:
    """A figure that leads divergence, on a steady trend towards its threshold: the steps to go at that rate."""

    step: int
    layer: str | None  # None: the model's output
    figure: str  # 'attention logit' | 'output log Z'
    value: float
    threshold: float
    key: str  # the config key of the threshold
    steps_to_go: float
    rate: float  # per step: a factor (geometric figures) or an amount (log Z)

    @property
    def message(self) -> str:
        where = f"'{self.layer}'" if self.layer else "the output"
        per = f"×{self.rate:.3g} per step" if self.figure != "output log Z" else f"{self.rate:+.3g} per step"
        if self.figure in _RANGE_FIGURES:  # a half-precision tensor's absmax on its way to the format's max
            return (f"at this rate the {self.figure} of {where} reach {self.key}'s max {self.threshold:g} (Inf) in"
                    f" ~{self.steps_to_go:.0f} steps (now {self.value:.3g}, {per} over the last recorded steps)."
                    f" Fix: {_RANGE_FORECAST_FIX}.")
        return (f"at this rate the {self.figure} of {where} crosses {self.key} {self.threshold:g} in"
                f" ~{self.steps_to_go:.0f} steps (now {self.value:.3g}, {per} over the last recorded steps):"
                " a divergence on its way. Fix: lower the learning rate or clip gradients now, and "
                + ("add qk-layernorm (normalise q and k before their dot product)" if self.figure == "attention logit"
                   else "add z-loss, 1e-4 * logsumexp(logits)**2") + ".")


#: figures of a half-precision layer's range, forecast towards the format's max (the key names the format)
_RANGE_FIGURES = ("outputs", "output gradients")
_RANGE_FORECAST_FIX = ("keep this layer in float32 (torch.autocast(..., enabled=False) around it) or train in"
                       " bfloat16; lower the learning rate if the growth is the training's")


_FORECAST_FROM = 1 / 30  # a figure is extrapolated once it is within 30x of its threshold (an attention logit of 33)
_APPROACH_FROM = 1e-3  # a growing logit is followed closely from 1e-3 of its threshold (1 at 1000); at init ~1-10


class Forecasts:
    """Steps to divergence: each leading figure's recent trend (a full ``forecast_window`` of recorded steps, the
    figure within 30x of its threshold), extrapolated to its threshold; warned once per figure and layer when it
    arrives within ``forecast_horizon`` steps. The update ratio is not extrapolated: Adam's and a warm-up's first
    steps grow it steadily in healthy runs, and ``large_updates`` says when it is too large."""

    def __init__(self, cfg: Config) -> None:
        self.horizon, self.window = cfg.forecast_horizon, cfg.forecast_window
        self.cfg = cfg
        self._history: dict[tuple[str, str | None], deque[tuple[int, float]]] = {}
        self._told: set[tuple[str, str | None]] = set()
        # figures on their way to their threshold at the latest step (up at each of the last two recorded steps, at a
        # pace that would reach it within ten such gaps; a logit within 1000x of it, log Z within 30x): the steps
        # after are worth recording, where a time budget spaces them out
        self.approaching: set[tuple[str, str | None]] = set()

    def feed(self, report: Report) -> list[Forecast]:
        """Take one recorded step's figures; return the forecasts that are new at this step."""
        if self.horizon <= 0:
            return []
        cfg, step, out = self.cfg, report.step, []
        self.approaching = set()
        figures: list[tuple[str, str | None, float | None, float, str, bool]] = []
        for row in report.layers:
            figures.append(("attention logit", row.name, row.attention_logit_max, cfg.attention_logit_max,
                            "attention_logit_max", True))
            if row.output_logz is not None:
                figures.append(("output log Z", None, -row.output_logz, cfg.output_logz_max, "output_logz_max",
                                False))
            fmt = FORMATS.get(row.precision) if row.precision else None
            if fmt is not None:
                for figure, headroom in (("outputs", row.act_headroom), ("output gradients", row.grad_headroom)):
                    if headroom is not None and not (figure == "output gradients" and report.amp_scale is not None):
                        figures.append((figure, row.name, fmt.max * 2.0 ** -headroom, fmt.max, fmt.name, True))
        for figure, layer, value, threshold, key, geometric in figures:
            if value is None or not math.isfinite(value) or (geometric and value <= 0):
                continue
            hist = self._history.setdefault((figure, layer), deque(maxlen=self.window))
            hist.append((step, math.log(value) if geometric else value))
            if value >= threshold:
                continue
            target = math.log(threshold) if geometric else threshold
            ys = [y for _, y in list(hist)[-3:]]
            if value >= threshold * (_APPROACH_FROM if geometric else _FORECAST_FROM) and len(ys) == 3 \
                    and ys[0] < ys[1] < ys[2] and 10 * (ys[2] - ys[0]) >= target - ys[2]:
                self.approaching.add((figure, layer))
            if value < threshold * _FORECAST_FROM or len(hist) < self.window:
                continue  # a full window, on the way up: a healthy run's first steps grow its logits too
            found = self._extrapolate(hist, target)
            if found is None or (figure, layer) in self._told:
                continue
            to_go, slope = found
            if to_go <= self.horizon:
                self._told.add((figure, layer))
                sign = 1 if geometric else -1  # log Z is watched as -log Z, told as itself
                out.append(Forecast(step, layer, figure, sign * value, sign * threshold, key, to_go,
                                    math.exp(slope) if geometric else -slope))
        return out

    @staticmethod
    def _extrapolate(hist: deque[tuple[int, float]], target: float) -> tuple[float, float] | None:
        """(steps until the least-squares line through ``hist`` reaches ``target``, its slope per step), for a
        steady rise that is not slowing down (at least 4 points, 3 of 4 of its steps upward, the later half's slope
        at least 3/4 of the earlier half's), else None."""
        if len(hist) < 4:
            return None
        xs, ys = [float(s) for s, _ in hist], [y for _, y in hist]
        ups = sum(b > a for a, b in zip(ys, ys[1:]))
        if ups < 0.75 * (len(ys) - 1):
            return None
        slope = _ls_slope(xs, ys)
        if slope is None or slope <= 0:
            return None
        half = len(xs) // 2
        late = _ls_slope(xs[half:], ys[half:]) if len(xs) - half >= 2 else None
        early = _ls_slope(xs[: half + 1], ys[: half + 1])
        if late is None or early is None or late < 0.75 * early:
            return None  # slowing down (a warm-up's linear ramp is, in log units): not a runaway
        return (target - ys[-1]) / slope, slope


def _ls_slope(xs: list[float], ys: list[float]) -> float | None:
    """The least-squares slope of ``ys`` against ``xs`` (None where every x is the same)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return None if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
