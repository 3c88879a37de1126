"""Pure diagnosis: per-layer numbers + config -> Report. No tensors, no hooks.

Rules (thresholds in ``defaults.yaml``):

* nonfinite: the layer's output held NaN/Inf; the first such layer in execution order is
  the culprit (``Report.first_nonfinite``).
* dead: a ReLU-family output whose zero fraction reaches ``dead_fraction``.
* saturated: a tanh/sigmoid output with at least ``saturated_fraction`` of its elements
  beyond ``saturation_level`` of the range.
* vanishing / exploding: drift with depth. Layers of the same structure (parametrised
  layers: same type and weight shape; activations: same type) that repeat at least
  ``min_repeats`` times form a group. Forward, each member's output rms is compared with
  the group's first member; backward, each member's gradient rms with the group's last
  member (the one nearest the loss). A ratio outside [vanishing_ratio, exploding_ratio]
  is drift. Output heads, normalisation layers and attention's query/key path are not
  repeated blocks of one structure, so the absolute scales they set are not judged.
  Exact zeros caused by all-zero weights (zero-init heads and residual branches) are
  reported as a note naming those weights, never as vanishing.

The per-layer rules are ``rules`` (nonfinite, dead, saturated, update ratios, the suggested init); drift
with depth along chains of repeated layers is ``drift``. This module runs them in order over one step.
"""

from __future__ import annotations

import math

from .._report.report import LayerReport, Report
from .._vocab import LayerStats, Role, StepStats, Summary
from ..config import Config
from . import _drift as drift
from . import _rules as rules
from ._drift import Baseline

__all__ = ["Baseline", "LayerStats", "StepStats", "Summary", "diagnose"]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def diagnose(stats: StepStats, config: Config, baseline: Baseline | None = None) -> Report:
    """Turn one step's statistics into a Report (flags, gains, suggestions).

    ``baseline``: what the run's earlier recorded steps fixed (``drift.Baseline``); without it, or before it has
    a step, this is the first recorded step and is judged as the init."""
    trained = baseline is not None and baseline.started
    layers = sorted(stats.layers, key=lambda s: s.index)
    rows = [_base_row(s, stats) for s in layers]
    notes: list[str] = []
    for pos, s in enumerate(layers):
        if s.role == Role.WEIGHTED:
            rules.suggest(rows[pos], s, layers[pos + 1 :], config)

    first_nonfinite = rules.nonfinite_forward(rows, layers, trained, stats.input_rms)
    for row, s in zip(rows, layers):
        rules.dead_or_saturated(row, s, config, trained)
    first_nonfinite_grad = None
    if first_nonfinite is None:
        bad = [s for s in reversed(layers) if s.grad is not None and s.grad.nonfinite]
        if stats.amp_scale is not None and stats.amp_scale >= 1.0 and bad and bad[0].grad_range is not None:
            # a GradScaler's scaled gradients overflowed float16 (the first layer they reached, loss side, computes
            # in it: float32 does not overflow at any scale a scaler sets): it skips this optimizer step and lowers
            # its scale (how it finds its scale); a problem only once the scale has fallen under 1
            notes.append(f"the gradients overflowed at GradScaler's scale {stats.amp_scale:g}: it skips this"
                         " optimizer step and lowers its scale (routine while it finds its scale)")
        else:
            first_nonfinite_grad = rules.nonfinite_backward(rows, layers)

    # the init as it was drawn, at the first recorded step; later, the norms found then, while they stay small
    small = drift.small_norm_weights(rows, layers, baseline.small_norms if trained and baseline else None)
    seen = drift.drift(rows, layers, config, notes, baseline)
    seen.small_norms = small
    drift.explain_by_dead(rows)
    rules.updates(rows, layers, config, notes)
    seen.low_grads = rules.precision(rows, layers, config, stats.amp_scale, notes,
                                     None if baseline is None else baseline.low_grads or set())

    if stats.not_called:
        notes.append("watched but never called in this step: " + ", ".join(stats.not_called))
    report = Report(layers=rows, step=stats.step, first_nonfinite=first_nonfinite, notes=notes,
                    first_nonfinite_grad=first_nonfinite_grad,
                    rescale_grads=stats.rescale_grads, amp_scale=stats.amp_scale, drift_seen=seen,
                    trained=trained, output_grad_std=_finite(stats.output_grad_std))
    pre, post = stats.grad_norm_preclip, stats.grad_norm_postclip
    if pre is not None and post is not None and math.isfinite(pre):
        report.grad_norm_preclip, report.grad_norm_postclip = pre, post
        report.clipped = post < pre * (1 - 1e-5)
    return report


def _base_row(s: LayerStats, stats: StepStats) -> LayerReport:
    row = LayerReport(name=s.name, module_type=s.module_type, index=s.index, calls=s.calls,
                      fan_in=s.fan_in, fan_out=s.fan_out, weight_std=_finite(s.weight_std))
    if s.act is not None:
        a = s.act
        row.act_mean, row.act_std, row.act_rms = _finite(a.mean), _finite(a.std), _finite(a.rms)
        row.act_absmax = a.absmax if not math.isnan(a.absmax) else None
        row.zero_fraction = _finite(a.zero_fraction)
        row.saturated_fraction = _finite(a.saturated_fraction)
        if s.input_rms and row.act_std is not None and math.isfinite(s.input_rms):
            row.gain = row.act_std / s.input_rms
        if stats.input_rms and row.act_rms is not None:
            row.forward_ratio = row.act_rms / stats.input_rms
    if s.grad is not None:
        g = s.grad
        row.grad_mean, row.grad_std = _finite(g.mean), _finite(g.std)
        row.grad_norm = _finite(g.rms * math.sqrt(g.n))
        if stats.output_grad_std and row.grad_std is not None:
            row.backward_ratio = row.grad_std / stats.output_grad_std
    if s.nonlinearity is not None:
        row.nonlinearity = str(s.nonlinearity)
    for rng, direction in ((s.act_range, "act"), (s.grad_range, "grad")):
        if rng is not None:
            row.precision = rng.format
            # float8 (check's "would it fit"): each tensor scaled to the format's max, so no headroom is left to tell
            scaled = rng.format.startswith("float8")
            setattr(row, f"{direction}_headroom", rng.headroom if math.isfinite(rng.headroom) and not scaled else None)
            setattr(row, f"{direction}_underflow", rng.low_fraction)
    return row
