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
"""

from __future__ import annotations

import math
import re

from . import gains
from .config import Config
from .gains import Nonlinearity
from .report import Finding, LayerReport, Report
from .vocab import LayerStats, Role, StepStats, Summary

__all__ = ["LayerStats", "StepStats", "Summary", "diagnose"]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def diagnose(stats: StepStats, config: Config) -> Report:
    """Turn one step's statistics into a Report (flags, gains, suggestions)."""
    layers = sorted(stats.layers, key=lambda s: s.index)
    rows = [_base_row(s, stats) for s in layers]
    notes: list[str] = []
    for pos, s in enumerate(layers):
        if s.role == Role.WEIGHTED:
            _suggest(rows[pos], s, layers[pos + 1 :], config)

    first_nonfinite = None
    for row, s in zip(rows, layers):
        if s.act is not None and s.act.nonfinite:
            if first_nonfinite is None:
                first_nonfinite = s.name
                _flag(row, "nonfinite", None, math.nan, 0.0, "-",
                      f"'{s.name}' ({s.module_type}) is the first layer whose output holds NaN/Inf"
                      f" (absmax {s.act.absmax:g}); everything after it is contaminated."
                      f" Fix: {_fix_text(row)}")
            else:
                row.status.add("nonfinite")
        _dead_or_saturated(row, s, config)

    first_nonfinite_grad = None
    if first_nonfinite is None:  # a NaN/Inf made in the backward pass: the first layer it reaches, loss side first
        for row, s in zip(reversed(rows), reversed(layers)):
            if s.grad is not None and s.grad.nonfinite:
                first_nonfinite_grad = s.name
                _flag(row, "nonfinite", "backward", math.nan, 0.0, "-",
                      f"'{s.name}' ({s.module_type}) is the first layer, in backward order, whose output gradient"
                      " holds NaN/Inf while every forward output is finite: an operation's backward made it"
                      " (sqrt or log at 0, a division by a zero norm, a custom autograd function)."
                      " Fix: guard that operation (add an epsilon, clamp its input)")
                break
        for row, s in zip(rows, layers):
            if s.grad is not None and s.grad.nonfinite:
                row.status.add("nonfinite")

    if stats.step == 0:  # the first recorded step: the init as it was drawn
        _small_norm_weights(rows, layers)
    _drift(rows, layers, config, notes)
    _explain_by_dead(rows)
    _updates(rows, layers, config, notes)

    if stats.not_called:
        notes.append("watched but never called in this step: " + ", ".join(stats.not_called))
    report = Report(layers=rows, step=stats.step, first_nonfinite=first_nonfinite, notes=notes,
                    first_nonfinite_grad=first_nonfinite_grad,
                    rescale_grads=stats.rescale_grads, amp_scale=stats.amp_scale)
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
    return row


def _suggest(row: LayerReport, s: LayerStats, after: list[LayerStats], cfg: Config) -> None:
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


def _updates(rows: list[LayerReport], layers: list[LayerStats], cfg: Config, notes: list[str]) -> None:
    """Update-to-weight ratio band (needs ``watch(..., optimizer=)``)."""
    measured = [(row, s.update_ratio) for row, s in zip(rows, layers) if s.update_ratio is not None]
    for row, ratio in measured:
        row.update_ratio = ratio
    if measured and all(r == 0.0 for _, r in measured):
        notes.append("the optimizer step changed no watched weight (learning rate 0, e.g. warm-up start?)")
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
            _flag(row, "large_updates", None, ratio, cfg.update_ratio_high, "update_ratio_high",
                  f"'{row.name}' ({row.module_type}) gets large_updates: one optimizer step moved its weights by"
                  f" {ratio:.3g} of their norm (update_ratio_high {cfg.update_ratio_high:g}; ~1e-3 is typical)."
                  " Fix: lower the learning rate or clip gradients.")
        elif 0.0 < ratio < cfg.update_ratio_low:  # update_ratio_low 0 turns this off
            _flag(row, "small_updates", None, ratio, cfg.update_ratio_low, "update_ratio_low",
                  f"'{row.name}' ({row.module_type}) gets small_updates: one optimizer step moved its weights by"
                  f" only {ratio:.3g} of their norm (update_ratio_low {cfg.update_ratio_low:g})."
                  " Fix: raise the learning rate, or check its gradient (see backward drift).")


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


def _fix_text(row: LayerReport) -> str:
    if row.suggested_scale is not None and row.suggested_init is not None:
        return f"multiply its weights by {row.suggested_scale:.3g} or use {row.suggested_init}"
    return "check the weights, the learning rate and the inputs of this layer"


def _flag(row: LayerReport, problem: str, direction: str | None, value: float, threshold: float,
          key: str, message: str, cause: str | None = None, covers: int = 1, fixable: bool | None = None) -> None:
    row.status.add(problem)
    row.findings.append(Finding(problem, direction, value, threshold, key, message, cause, covers, fixable))


def _dead_or_saturated(row: LayerReport, s: LayerStats, cfg: Config) -> None:
    if s.act is None or s.act.nonfinite:
        return
    z = s.act.zero_fraction
    if s.relu_family and z is not None and z >= cfg.dead_fraction:
        _flag(row, "dead", None, z, cfg.dead_fraction, "dead_fraction",
              f"'{s.name}' ({s.module_type}) is dead: {z:.1%} of its outputs are exactly zero"
              f" (dead_fraction {cfg.dead_fraction:g}), so almost no gradient passes. Fix: check the"
              " biases and init of the layer before it, lower the learning rate, or use LeakyReLU.")
    sat = s.act.saturated_fraction
    if s.bounded and sat is not None and sat >= cfg.saturated_fraction:
        _flag(row, "saturated", None, sat, cfg.saturated_fraction, "saturated_fraction",
              f"'{s.name}' ({s.module_type}) is saturated: {sat:.1%} of its outputs are beyond"
              f" {cfg.saturation_level:g} of its range (saturated_fraction {cfg.saturated_fraction:g}),"
              " where its derivative is near zero. Fix: scale down the weights of the layer before it"
              " (its suggestion uses the gain for this activation).")


def _name_pattern(name: str) -> str:
    """The layer's place in its repeated block: its qualified name with the block indices taken out (``blocks.3.fc``
    and ``conv3`` number their block too; members of one chain that play alternating roles, ``fc1``/``fc2``, only
    add a periodic offset, which the median of pairwise slopes does not follow)."""
    return _DIGITS.sub("*", name)


_DIGITS = re.compile(r"\d+")
# attention's query and key projections, by the names PyTorch and Hugging Face models give them
_QUERY_KEY = re.compile(r"(^|[._])(q|k|query|key|queries|keys|q_proj|k_proj|q_lin|k_lin|to_q|to_k|wq|wk|qk|"
                        r"queries_keys_values|query_key_value|qkv|in_proj)(\.linear)?$")


def _chain_key(s: LayerStats) -> tuple | None:
    """Layers that have one place in repeated blocks; whether a normalisation follows is part of it (it undoes
    forward scale)."""
    if s.role in (Role.WEIGHTED, Role.ACTIVATION):
        return (_name_pattern(s.name), s.module_type, s.feeds_norm)
    return None


def _pre_step_rms(s: LayerStats) -> float | None:
    """The weight rms the recorded forward and backward ran with (before the optimizer step, where known)."""
    return s.update_base_rms if s.update_base_rms is not None else s.weight_rms


def _drift(rows: list[LayerReport], layers: list[LayerStats], cfg: Config, notes: list[str]) -> None:
    chains: dict[tuple, list[int]] = {}
    for pos, s in enumerate(layers):
        key = _chain_key(s)
        if key is not None:
            chains.setdefault(key, []).append(pos)
    zero = [_pre_step_rms(s) == 0 for s in layers]
    zero_after = [False] * (len(layers) + 1)  # zero_after[p]: a layer after position p has all-zero weights
    for pos in range(len(layers) - 1, -1, -1):
        zero_after[pos] = zero_after[pos + 1] or (pos + 1 < len(layers) and zero[pos + 1])
    _zero_grad_notes(rows, layers, zero, notes)
    norms = [s.index for s in layers if s.role == Role.NORM]
    for (pattern, _, feeds_norm), members in chains.items():
        if len(members) < cfg.min_repeats:
            continue
        first, last = layers[members[0]].index, layers[members[-1]].index
        normalized = any(first < i < last for i in norms)
        if not feeds_norm:
            _judge(rows, layers, members, cfg, "forward", zero, normalized)
        if not _QUERY_KEY.search(pattern):  # their gradient is second order in the attention logits: not a trunk figure
            _judge(rows, layers, members, cfg, "backward", zero_after, normalized)


def _figure(s: LayerStats, forward: bool) -> tuple[float | None, bool]:
    """(the figure the trend is fitted to, whether it is non-finite) for one chain member.

    Forward: output rms per element. Backward: the output gradient's norm per call (what a fan_in init keeps
    through width changes, strides and reshapes; per element it grows with what a pooling sums).
    """
    m = s.act if forward else s.grad
    if m is None:
        return None, False
    if m.nonfinite or not math.isfinite(m.rms):
        return None, True
    if forward:
        return m.rms, False
    norm = m.rms * math.sqrt(m.n / max(s.calls, 1))
    if s.feeds_norm:
        # a normalisation divides the gradient into its input by that input's std, which is this layer's own weight
        # scale: times its output std the figure is what the chain passes on, whatever that scale
        a = s.act
        if a is None or a.nonfinite or not math.isfinite(a.std):
            return None, False
        norm *= a.std
    return norm, False


def _shape(s: LayerStats, forward: bool) -> object:
    """What makes two members of a chain the same size: the weight's shape, or the tensor's size per call."""
    if s.weight_shape is not None and s.role == Role.WEIGHTED:
        return s.weight_shape
    m = s.act if forward else s.grad
    return None if m is None else m.n // max(s.calls, 1)


def _slope(xs: list[int], ys: list[float], shapes: list) -> float:
    """Median of the pairwise slopes of ``ys`` against ``xs`` (Theil-Sen): one odd member moves it little.

    Pairs of members of one shape only, where there are enough: a width or resolution change between stages (with
    an init that is not variance-preserving, or a normalisation whose gradient goes as 1/std) is a step, not a
    trend; a plain stack whose every layer has its own shape is compared across shapes.
    """
    n = len(ys)
    stride = -(-n // 64)  # long chains: pairs at a spread of positions, at most ~2,000 of them
    pairs = [(i, j) for i in range(0, n, stride) for j in range(i + 1, n, stride)]
    same = [(i, j) for i, j in pairs if shapes[i] == shapes[j]]
    if len(same) >= max(3, len(pairs) // 8):
        pairs = same
    slopes = sorted((ys[j] - ys[i]) / (xs[j] - xs[i]) for i, j in pairs)
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else 0.5 * (slopes[mid - 1] + slopes[mid])


def _judge(rows: list[LayerReport], layers: list[LayerStats], members: list[int], cfg: Config, direction: str,
           zero: list[bool], normalized: bool) -> None:
    forward = direction == "forward"
    seq = []  # (ordinal in the chain, pos, figure) of members with a usable, finite measurement
    skip = set()  # members that are not part of a drift: exact zeros from all-zero weights (a note instead)
    for k, pos in enumerate(members):
        fig, nonfinite = _figure(layers[pos], forward)
        if nonfinite:
            if forward:
                break  # past the first NaN/Inf nothing is measured any more (the members after it are still the chain)
            continue
        if fig is not None and fig == 0.0 and zero[pos]:
            skip.add(pos)
        elif fig is not None:
            seq.append((k, pos, fig))
    if len(seq) < cfg.min_repeats:
        return
    # per repeat, in log units; backward the gradient flows from the last member to the first
    slope = _slope([k for k, _, _ in seq], [math.log(max(fig, _TINY)) for _, _, fig in seq],
                   [_shape(layers[pos], forward) for _, pos, _ in seq])
    k0, k1 = seq[0][0], seq[-1][0]
    total = math.exp(slope * (k1 - k0) if forward else -slope * (k1 - k0))
    lo, hi, key_lo, key_hi = cfg.vanishing_ratio, cfg.exploding_ratio, "vanishing_ratio", "exploding_ratio"
    if normalized:
        lo, hi, key_lo, key_hi = 1 / cfg.normalized_ratio, cfg.normalized_ratio, "normalized_ratio", "normalized_ratio"
    if lo <= total <= hi:
        return
    problem, thr, key = ("vanishing", lo, key_lo) if total < lo else ("exploding", hi, key_hi)
    cause_pos = _cause(layers, seq[0][1])
    cause = layers[cause_pos]
    per = math.exp(slope if forward else -slope)
    s0, s1 = layers[members[0]], layers[members[-1]]
    chain = f"{len(members)} repeated {s0.module_type} layers ('{s0.name}' … '{s1.name}')"
    what = "output rms" if forward else "output gradient norm"
    how = "from the first to the last measured" if forward else "from the last to the first (towards the input)"
    if cause.role == Role.NORM and any(f.key == "norm_weight" for f in rows[cause_pos].findings):
        rows[cause_pos].notes.append(f"along {chain} the {what} changes {total:.3g}× ({direction}): a consequence of"
                                     " the near-zero normalisation weights")
        return
    fixable, fix = _drift_fix(rows, layers, members, cause_pos, problem, forward, cfg)
    lead = (f"'{cause.name}' ({cause.module_type}) and the layers of its kind make the signal {problem} ({direction}):"
            f" along {chain} the {what} changes {per:.3g}× per layer, {total:.3g}× {how} ({key} {thr:g}). Fix: {fix}")
    if not any(f.problem == problem and f.direction == direction for f in rows[cause_pos].findings):
        _flag(rows[cause_pos], problem, direction, total, thr, key, lead, cause.name, len(members), fixable)
        if fixable is False:
            rows[cause_pos].notes.append(f"init cannot fix this {problem} ({direction}) drift: {fix}")
    for k, pos in enumerate(members):  # every member of a drifting chain is part of it (and gets its own scale)
        if pos == cause_pos or pos in skip:
            continue
        at = math.exp(slope * (k - k0) if forward else -slope * (k1 - k))  # the trend at its place
        s = layers[pos]
        _flag(rows[pos], problem, direction, at, thr, key,
              f"'{s.name}' ({s.module_type}) is {problem} ({direction}): {at:.3g}× at its place along {chain};"
              f" see '{cause.name}'", cause.name, 1, fixable)


_TINY = 1e-45  # below float32's smallest subnormal: an exact zero (underflow) in log space


def _cause(layers: list[LayerStats], pos: int) -> int:
    """The layer whose weights to change for a drift seen at ``pos``: the first normalisation layer before it whose
    weights are near zero (it scales everything through it down), else the chain member itself, or the nearest
    weighted layer before it in execution order (an activation has no weights)."""
    for p in range(pos + 1):
        w = _pre_step_rms(layers[p])
        if layers[p].role == Role.NORM and w is not None and 0 < w < _SMALL_NORM_WEIGHT:
            return p
    for p in range(pos, -1, -1):
        s = layers[p]
        if s.role == Role.WEIGHTED:
            return pos if s.feeds_norm and p != pos else p  # behind a norm its weight scale is undone
    return pos


def _small_norm_weights(rows: list[LayerReport], layers: list[LayerStats]) -> None:
    """A normalisation layer whose weights start near zero (but not at exactly zero, a zero-init branch) scales every
    signal through it down by their rms: vanishing (forward), blamed on the first such layer."""
    small = [p for p, s in enumerate(layers)
             if s.role == Role.NORM and 0 < (_pre_step_rms(s) or 0) < _SMALL_NORM_WEIGHT]
    if not small:
        return
    first = layers[small[0]]
    w = _pre_step_rms(first)
    msg = (f"'{first.name}' ({first.module_type}) makes the signal vanishing (forward): its weights have rms {w:.3g},"
           f" where a normalisation starts at 1, so every signal through it is scaled by about that"
           f" ({len(small)} normalisation layer(s) like it). Fix: nn.init.ones_(m.weight) and nn.init.zeros_(m.bias)"
           " for every normalisation layer (an init drawn like a projection's, N(0, 0.02), is a bug)")
    for i, p in enumerate(small):
        s = layers[p]
        _flag(rows[p], "vanishing", "forward", _pre_step_rms(s), _SMALL_NORM_WEIGHT, "norm_weight",
              msg if i == 0 else f"'{s.name}' ({s.module_type}): weights of rms {_pre_step_rms(s):.3g}; see"
              f" '{first.name}'",
              first.name, len(small) if i == 0 else 1, True)


# a normalisation layer whose weight rms is below this scales every signal through it down by as much (its init
# is 1; an init drawn like a projection's, N(0, 0.02), is a bug); exact zeros are zero-init branches, a note
_SMALL_NORM_WEIGHT = 0.1


def _drift_fix(rows: list[LayerReport], layers: list[LayerStats], chain: list[int], cause_pos: int, problem: str,
               forward: bool, cfg: Config) -> tuple[bool | None, str]:
    """(whether re-initialising the weights fixes it, what to do)."""
    row = rows[cause_pos]
    if not forward and problem == "vanishing" and row.nonlinearity == "sigmoid":
        return False, ("sigmoid's slope is at most 1/4, so the gradient shrinks at every layer whatever the weight"
                       " scale; use ReLU/GELU/SiLU, or add normalisation (LayerNorm/BatchNorm) between the layers")
    weighted = [rows[p] for p in dict.fromkeys([cause_pos, *chain]) if layers[p].role == Role.WEIGHTED]
    scales = sorted(r.suggested_scale for r in weighted if r.suggested_scale is not None
                    and math.isfinite(r.suggested_scale))
    if scales:
        typical = scales[len(scales) // 2]
        tol = 1 + cfg.scale_tolerance
        if not 1 / tol <= typical <= tol:
            own = f"×{row.suggested_scale:.3g} for this one, " if row.suggested_scale not in (None, typical) else ""
            return True, (f"multiply each layer's weights by its suggested scale ({own}×{typical:.3g} for most:"
                          f" torchdiag.apply_suggestions does it) or use {row.suggested_init}")
        return False, ("the weights already have the textbook scale, so the drift comes from the structure (residual"
                       " sums that grow with depth, no normalisation): scale each residual branch down (zero-init"
                       " its last layer, or multiply it by 1/sqrt(depth), as Fixup does) or add normalisation")
    return None, _fix_text(row)



def _explain_by_dead(rows: list[LayerReport]) -> None:
    """Vanishing that follows from a dead ReLU (after it forward, before it backward) is its consequence."""
    dead = [r.index for r in rows if "dead" in r.status]
    if not dead:
        return
    first, last = min(dead), max(dead)
    for row in rows:
        keep = []
        for f in row.findings:
            downstream = (f.direction == "forward" and row.index > first) or (
                f.direction == "backward" and row.index < last)
            if f.problem == "vanishing" and downstream:
                continue
            keep.append(f)
        if len(keep) != len(row.findings):
            row.findings = keep
            row.status = {f.problem for f in keep} | (row.status & {"nonfinite"})
            row.notes.append("its signal vanishes because of the dead ReLU layer(s) before it (see 'dead')")


def _zero_grad_notes(rows: list[LayerReport], layers: list[LayerStats], zero: list[bool], notes: list[str]) -> None:
    """Name the all-zero weights (zero init) that stop the gradient, instead of calling it vanishing."""
    causes: dict[str, int] = {}
    nxt: LayerStats | None = None  # the nearest layer after the current one whose weights are all zero
    for pos in range(len(layers) - 1, -1, -1):
        row, s = rows[pos], layers[pos]
        if not (s.grad is None or s.grad.nonfinite or s.grad.rms != 0.0) and nxt is not None:
            row.notes.append(f"no gradient reaches '{s.name}' because '{nxt.name}' has all-zero weights")
            causes[nxt.name] = causes.get(nxt.name, 0) + 1
        if zero[pos]:
            nxt = s
    if causes:
        notes.append(f"no gradient reaches {sum(causes.values())} layer(s) because of all-zero weights in "
                     + ", ".join(f"'{c}'" for c in sorted(causes)) + " (zero init: expected in the first steps)")
