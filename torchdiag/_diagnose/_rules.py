"""The per-layer rules of the diagnosis: NaN/Inf, dead and saturated activations, update ratios, and the
textbook init a weighted layer is held against (with the nonlinearity that follows it). Pure: numbers in,
flags and notes on the ``LayerReport`` rows out. Thresholds are config keys (``defaults.yaml``).
"""

from __future__ import annotations

import math

from .._layers import gains
from .._layers.gains import Nonlinearity
from .._report.report import Finding, LayerReport
from .._vocab import FORMATS, LayerStats, Range, Role, Summary
from ..config import Config

#: the fix for what appeared after updates: the training's settings, never a weight rescale
OPTIMISATION_FIX = ("lower the learning rate, add warm-up, or clip gradients (torch.nn.utils.clip_grad_norm_); not a"
                    " weight rescale: the updates moved it there, not the init")


# a NaN/Inf after updates: the updates (a learning rate too high), a batch (a NaN in the input) or an operation
# (log(0)); the NaN origin (Report.nonfinite_origin) says which operation made it, so the fix names each possibility
_LATER_NAN_FIX = ("if it follows large updates or a loss spike, lower the learning rate, add warm-up or clip gradients;"
                  " else check the batch (a NaN in the input) and the operation the NaN origin names (log or sqrt at"
                  " 0, a division by zero); not a weight rescale")


def nonfinite_forward(rows: list[LayerReport], layers: list[LayerStats], trained: bool = False,
                      model_input_rms: float | None = None) -> str | None:
    """Flag NaN/Inf outputs: the first layer in execution order whose output holds it is the culprit (its name is
    returned), the layers after it are contaminated. ``trained``: a step was recorded before this one, so the
    weights' scale is not the fix (the cause is left open: the updates, the batch or an operation). Where that
    layer's input already held NaN/Inf (its input rms, or the model's when it is the first layer), the data
    brought them: neither the weights nor the learning rate is the fix."""
    first_nonfinite = None
    for pos, (row, s) in enumerate(zip(rows, layers)):
        if s.act is not None and s.act.nonfinite:
            if first_nonfinite is None:
                first_nonfinite = s.name
                fed = s.input_rms if s.input_rms is not None else (model_input_rms if pos == 0 else None)
                if fed is not None and not math.isfinite(fed):
                    flag(row, "nonfinite", None, math.nan, 0.0, "-",
                         f"'{s.name}' ({s.module_type}) is the first layer whose output holds NaN/Inf, and its input"
                         " already held them: the batch brought them (or an operation outside the watched layers,"
                         " before this one); everything after it is contaminated. Fix: check the data"
                         " (torch.isfinite on the batch, the loader's transforms); not the weights, not the"
                         " learning rate", reason="data")
                    continue
                flag(row, "nonfinite", None, math.nan, 0.0, "-",
                     f"'{s.name}' ({s.module_type}) is the first layer whose output holds NaN/Inf"
                     f" (absmax {s.act.absmax:g}); everything after it is contaminated."
                     f" Fix: {_LATER_NAN_FIX if trained else fix_text(row)}")
            else:
                row.status.add("nonfinite")
    return first_nonfinite


def nonfinite_backward(rows: list[LayerReport], layers: list[LayerStats]) -> str | None:
    """With every forward output finite, a NaN/Inf made in the backward pass: the first layer it reaches, loss side
    first, is the culprit (its name is returned); every layer whose output gradient holds it is flagged."""
    first_nonfinite_grad = None
    for row, s in zip(reversed(rows), reversed(layers)):
        if s.grad is not None and s.grad.nonfinite:
            first_nonfinite_grad = s.name
            flag(row, "nonfinite", "backward", math.nan, 0.0, "-",
                 f"'{s.name}' ({s.module_type}) is the first layer, in backward order, whose output gradient"
                 " holds NaN/Inf while every forward output is finite: an operation's backward made it"
                 " (sqrt or log at 0, a division by a zero norm, a custom autograd function)."
                 " Fix: guard that operation (add an epsilon, clamp its input)")
            break
    for row, s in zip(rows, layers):
        if s.grad is not None and s.grad.nonfinite:
            row.status.add("nonfinite")
    return first_nonfinite_grad


def suggest(row: LayerReport, s: LayerStats, after: list[LayerStats], cfg: Config) -> None:
    """Nonlinearity that follows a weighted layer, and the textbook fix for its weights."""
    nl, normalised, inferred = gains.LINEAR, None, False
    for nxt in after:
        if nxt.role == Role.WEIGHTED:
            guess = _infer_functional(nxt.input_probe) if normalised is None else None
            if guess is not None:
                nl, inferred = guess, True
            break
        if nxt.role == Role.NORM and normalised is None:
            normalised = nxt
        if nxt.role == Role.ACTIVATION and nxt.nonlinearity is not None:
            nl = nxt.nonlinearity
            break
    row.nonlinearity = str(nl)
    if inferred:
        row.notes.append(f"nonlinearity '{nl}' inferred from the next layer's input range and zeros"
                         " (a functional activation such as F.relu in forward(), not a module)")
    if not s.textbook:
        row.notes.append(f"{s.module_type}: the gain/sqrt(fan_in) rule does not describe it, so no scale is"
                         " suggested (a lookup sums nothing; recurrent and attention weights feed no single"
                         " pointwise activation)")
        return
    if s.fan_in is None:
        row.notes.append(s.fans_note or f"{s.module_type}: fans and textbook gain are not defined")
        return
    row.suggested_init = gains.suggested_init(nl, s.fan_in)
    if s.weight_std is not None and not math.isfinite(s.weight_std):
        row.notes.append("its weights hold NaN/Inf (an optimizer update diverged, or they were loaded so): nothing"
                         " to rescale; lower the learning rate, clip gradients, or restore a checkpoint")
        return
    if not s.weight_std:
        if s.weight_rms == 0:
            row.notes.append("weights are all zero (zero init): nothing to rescale")
        return
    row.suggested_scale = gains.target_std(s.fan_in, nl) / s.weight_std
    if row.gain:  # LSUV reasoning: the factor that gives this layer the textbook gain on its actual inputs
        row.measured_scale = gains.gain(nl) / row.gain
        ratio = row.measured_scale / row.suggested_scale
        if not 1 / (1 + cfg.scale_tolerance) <= ratio <= 1 + cfg.scale_tolerance:
            row.notes.append(
                f"measured scale ×{row.measured_scale:.3g} and textbook ×{row.suggested_scale:.3g} disagree by more"
                f" than scale_tolerance {cfg.scale_tolerance:g}: the weights or inputs are not i.i.d. (trained or"
                " structured weights, correlated inputs). Trust the measured one for this data (fix_init does),"
                " the textbook one for a fresh random init.")
    if normalised is not None:
        row.notes.append(f"followed by {normalised.module_type} '{normalised.name}': its weight scale"
                         " barely changes the forward signal")


def updates(rows: list[LayerReport], layers: list[LayerStats], cfg: Config, notes: list[str]) -> None:
    """Update-to-weight ratio band (needs ``watch(..., optimizer=)``)."""
    measured = [(row, s.update_ratio) for row, s in zip(rows, layers) if s.update_ratio is not None]
    for row, ratio in measured:
        row.update_ratio = ratio
    if measured and all(r == 0.0 for _, r in measured):
        notes.append("the optimizer step changed no watched weight: either every gradient it got was zero (a dead"
                     " network, or the step skipped) or its learning rate is 0 (a warm-up that starts at 0)")
        return
    for (row, ratio), s in zip(measured, [s for s in layers if s.update_ratio is not None]):
        if not math.isfinite(ratio):
            continue
        if s.fan_in is None:  # a token, a gate, a bias table: no scale to hold the step against (zero init is common)
            continue
        if s.feeds_norm:
            # scale-invariant weights: a large step only grows their norm, which lowers their effective learning rate
            row.notes.append("feeds a normalisation: its weight scale is undone, so the update ratio is not judged")
            continue
        if s.fan_in and s.update_base_rms is not None and s.update_base_rms < 0.05 / math.sqrt(s.fan_in):
            # weights still growing out of a zero init (zero head, zero-init gate): any step is "large"
            row.notes.append("weights near zero before the step (zero init?): update ratio not judged")
            continue
        if ratio > cfg.update_ratio_high:
            flag(row, "large_updates", None, ratio, cfg.update_ratio_high, "update_ratio_high",
                  f"'{row.name}' ({row.module_type}) gets large_updates: one optimizer step moved its weights by"
                  f" {ratio:.3g} of their norm (update_ratio_high {cfg.update_ratio_high:g}; ~1e-3 is typical)."
                  " Fix: lower the learning rate or clip gradients.", reason="optimisation")
        elif 0.0 < ratio < cfg.update_ratio_low:  # update_ratio_low 0 turns this off
            flag(row, "small_updates", None, ratio, cfg.update_ratio_low, "update_ratio_low",
                  f"'{row.name}' ({row.module_type}) gets small_updates: one optimizer step moved its weights by"
                  f" only {ratio:.3g} of their norm (update_ratio_low {cfg.update_ratio_low:g})."
                  " Fix: raise the learning rate, or check its gradient (see backward drift).", reason="optimisation")


def _infer_functional(probe: Summary | None) -> Nonlinearity | None:
    """Which pointwise activation produced a tensor, from its range and zeros (None: cannot tell)."""
    if probe is None or probe.nonfinite or probe.n == 0:
        return None
    lo, hi, zeros = probe.min, probe.max, probe.zero_fraction
    if lo is None or hi is None:
        return None
    if hi <= 0 or probe.std == 0:
        return None  # all zeros (underflow, a dead layer): nothing to read
    if lo >= 0 and zeros is not None and 0.2 <= zeros < 0.99:
        return Nonlinearity("relu")
    if -1.0 <= lo <= -0.9 and 0.9 <= hi <= 1.0 and probe.std > 0.4:
        # reaches both rails with its mass spread out (a linear Gaussian signal of this range has std ~0.2)
        return Nonlinearity("tanh")
    if 0 < lo and hi < 1.0 and hi - lo > 0.5:
        return Nonlinearity("sigmoid")
    if -0.28 <= lo < -0.01 and hi > 1.0:  # GELU's minimum is -0.170, SiLU's -0.278
        return Nonlinearity("gelu" if lo >= -0.171 else "silu")
    return None


def fix_text(row: LayerReport) -> str:
    if row.suggested_scale is not None and row.suggested_init is not None:
        return f"multiply its weights by {row.suggested_scale:.3g} or use {row.suggested_init}"
    return "check the weights, the learning rate and the inputs of this layer"


def flag(row: LayerReport, problem: str, direction: str | None, value: float, threshold: float,
         key: str, message: str, cause: str | None = None, covers: int = 1, fixable: bool | None = None,
         reason: str | None = None) -> None:
    row.status.add(problem)
    row.findings.append(Finding(problem, direction, value, threshold, key, message, cause, covers, fixable, reason))


def dead_or_saturated(row: LayerReport, s: LayerStats, cfg: Config, trained: bool = False) -> None:
    """Dead ReLU-family and saturated tanh/sigmoid outputs; ``trained``: they appeared after updates."""
    if s.act is None or s.act.nonfinite:
        return
    reason = "optimisation" if trained else "init"
    z = s.act.zero_fraction
    if s.relu_family and z is not None and z >= cfg.dead_fraction:
        flag(row, "dead", None, z, cfg.dead_fraction, "dead_fraction",
              f"'{s.name}' ({s.module_type}) is dead: {z:.1%} of its outputs are exactly zero"
              f" (dead_fraction {cfg.dead_fraction:g}), so almost no gradient passes. Fix: check the"
              + (f" {OPTIMISATION_FIX}, or use LeakyReLU." if trained else
                 " biases and init of the layer before it, lower the learning rate, or use LeakyReLU."),
              reason=reason)
    sat = s.act.saturated_fraction
    if s.bounded and sat is not None and sat >= cfg.saturated_fraction:
        flag(row, "saturated", None, sat, cfg.saturated_fraction, "saturated_fraction",
              f"'{s.name}' ({s.module_type}) is saturated: {sat:.1%} of its outputs are beyond"
              f" {cfg.saturation_level:g} of its range (saturated_fraction {cfg.saturated_fraction:g}),"
              " where its derivative is near zero. Fix: "
              + (f"{OPTIMISATION_FIX}." if trained else "scale down the weights of the layer before it"
                 " (its suggestion uses the gain for this activation)."),
              reason=reason)


def _low(r: Range | None) -> float:
    return (r.low_fraction or 0.0) if r is not None else 0.0


def _flushed(rows: list[LayerReport], layers: list[LayerStats], cfg: Config) -> set[str]:
    """Half-precision layers whose gradient is all exact zeros because the format flushed it: behind (input side of)
    a layer whose gradient is mostly under the floor, or every half-precision gradient zero while nothing else
    explains it (no all-zero weights, no dead activation: those zero a gradient in float32 too)."""
    if any(s.weight_rms == 0 for s in layers) or any("dead" in r.status for r in rows):
        return set()
    out: set[str] = set()
    loss_side_low: bool | None = None  # the nearest non-zero half-precision gradient on the loss side: mostly low?
    for s in reversed(layers):
        g = s.grad_range
        if g is None or s.grad is None or s.grad.nonfinite:
            continue
        if g.low_fraction is None and g.zero_fraction == 1.0:
            if loss_side_low is not False:
                out.add(s.name)
        else:
            loss_side_low = _low(g) > cfg.underflow_fraction
    return out


def precision(rows: list[LayerReport], layers: list[LayerStats], cfg: Config, amp_scale: float | None,
              notes: list[str], low_before: set[str] | None = None) -> set[str]:
    """A half-precision layer's output or gradient near its format's max (``overflow_risk``), or with a material
    share of its non-zero values below the format's precision floor (``underflow``). Each direction is one finding
    on the layer where it starts (forward: the first such layer; backward: the one nearest the loss, where the
    gradient enters the narrow format's range first), standing for the others, which carry the flag too.

    Under a GradScaler the gradients are the scaled ones the backward computed: their overflow is the scaler's to
    handle (it skips the step and lowers the scale), so only their underflow is judged, and only where it held at
    the previous recorded step too (``low_before``, the layers this returns for the next step): a branch behind a
    layer scale of 1e-6 (ConvNeXt) starts below the floor and leaves it after its first updates, which is the
    design, not the scale's fault. Without a scaler (or without a run's baseline) it is judged at once."""
    margin_bits = math.log2(cfg.overflow_margin)
    scaler = amp_scale is not None
    flushed = _flushed(rows, layers, cfg)

    def share(s: LayerStats, rng: Range) -> float:
        return 1.0 if rng is s.grad_range and s.name in flushed else _low(rng)

    low_now = {s.name for s in layers if s.grad_range is not None and (s.grad is None or not s.grad.nonfinite)
               and share(s, s.grad_range) > cfg.underflow_fraction}
    cases = []
    for direction in ("forward", "backward"):
        ordered = [(row, s) for row, s in zip(rows, layers)  # NaN/Inf already: the nonfinite rules say it
                   if (summary := s.act if direction == "forward" else s.grad) is None or not summary.nonfinite]
        if direction == "backward":
            ordered.reverse()
        near = [(row, s, rng) for row, s in ordered
                if (rng := (s.act_range if direction == "forward" else s.grad_range)) is not None
                and math.isfinite(rng.headroom) and rng.headroom < margin_bits
                and not (direction == "backward" and scaler) and not rng.format.startswith("float8")]
        low = [(row, s, rng) for row, s in ordered
               if (rng := (s.act_range if direction == "forward" else s.grad_range)) is not None
               and share(s, rng) > cfg.underflow_fraction
               and not (direction == "backward" and scaler and low_before is not None and s.name not in low_before)]
        cases += [("overflow_risk", direction, near), ("underflow", direction, low)]
    for problem, direction, hits in cases:
        if not hits:
            continue
        row, s, rng = hits[0]
        for other, _, _ in hits[1:]:
            other.status.add(problem)
        what = "outputs" if direction == "forward" else "output gradients"
        others = (f" (and {len(hits) - 1} more layer(s): {_names([h[1].name for h in hits[1:]])})"
                  if len(hits) > 1 else "")
        if problem == "overflow_risk":
            fmt = FORMATS[rng.format]
            message = (f"'{s.name}' ({s.module_type}) is near {rng.format}'s overflow: its {what} reach"
                       f" |x| = {rng.absmax:.3g}, {rng.headroom:.1f} bits under the format's max {fmt.max:g}"
                       f" (overflow_margin {cfg.overflow_margin:g}){others}. Fix: "
                       + (_OVERFLOW_FORWARD_FIX if direction == "forward" else _OVERFLOW_BACKWARD_FIX))
            value, threshold, key = rng.headroom, margin_bits, "overflow_margin"
        else:
            sub = share(s, rng)
            fix = (_FP8_FIX + (_FP8_GRAD_FIX if direction == "backward" and rng.format == "float8_e4m3fn" else "")
                   if rng.format.startswith("float8") else _UNDERFLOW_FORWARD_FIX if direction == "forward" else
                   _UNDERFLOW_SCALED_FIX.format(scale=amp_scale) if scaler else _UNDERFLOW_FIX)
            floor = FORMATS[rng.format].floor
            said = (f"its {what} are all exact zeros, flushed: the layer after it holds them under {floor:.2g}"
                    if s.name in flushed and direction == "backward" else
                    f"{sub:.0%} of its non-zero {what} are below {floor:.2g}, where they keep 3 significant bits or"
                    f" fewer and the smaller ones are flushed to zero ({rng.zero_fraction:.0%} exact zeros)")
            message = (f"'{s.name}' ({s.module_type}) underflows {rng.format}: {said}; underflow_fraction"
                       f" {cfg.underflow_fraction:g}{others}. Fix: {fix}")
            value, threshold, key = sub, cfg.underflow_fraction, "underflow_fraction"
        flag(row, problem, direction, value, threshold, key, message, covers=len(hits), reason="precision")
    backward_low = next((hits for problem, direction, hits in cases
                         if problem == "underflow" and direction == "backward"), [])
    if backward_low:
        _drop_backward_vanishing([row for row, _, _ in backward_low], notes)
    return low_now


def _names(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _drop_backward_vanishing(rows: list[LayerReport], notes: list[str]) -> None:
    """Gradients flushed to zero by float16 read as a vanishing gradient: on the layers whose gradients underflow
    (``rows``) the precision finding says why, so a backward vanishing finding there is not a second problem."""
    dropped = False
    for row in rows:
        keep = [f for f in row.findings if not (f.problem == "vanishing" and f.direction == "backward")]
        if len(keep) != len(row.findings):
            dropped = True
            row.findings = keep
        if "vanishing" in row.status and not any(f.problem == "vanishing" for f in row.findings):
            row.status.discard("vanishing")
    if dropped:
        notes.append("backward drift not judged: float16 flushed part of the gradients (see underflow)")


_OVERFLOW_FORWARD_FIX = ("keep this layer in float32 (torch.autocast(..., enabled=False) around it), or train in"
                         " bfloat16 (float32's range); if its outputs grew during training, the learning rate did it")
_OVERFLOW_BACKWARD_FIX = ("use a GradScaler (torch.amp.GradScaler: it skips a step whose gradients overflow and lowers"
                          " its scale), or train in bfloat16; if you use one, pass it as watch(scaler=...): its"
                          " gradients then are judged as the scaler handles them")
_UNDERFLOW_FIX = ("use a GradScaler (torch.amp.GradScaler) with float16, or train in bfloat16, or keep this layer in"
                  " float32")
_UNDERFLOW_SCALED_FIX = ("raise the GradScaler's init_scale (its scale {scale:g} leaves these gradients below"
                         " float16's precision) or lower its growth_interval, or train in bfloat16")
# float8 (check(precision=)): each tensor scaled so that its absmax is the format's max, as fp8 recipes store it
_FP8_FIX = ("its spread is wider than the format holds with one scale per tensor: keep this layer in bfloat16, or"
            " scale per block or per channel")
_FP8_GRAD_FIX = ", or use float8_e5m2 for gradients (its range is wider)"
_UNDERFLOW_FORWARD_FIX = ("keep this layer in float32 (torch.autocast(..., enabled=False) around it), or train in"
                          " bfloat16")
