"""Assembling a recorded step: its accumulators (reduced across ranks, or this rank's own) into ``StepStats``
that diagnosis reads, and this rank's histograms. Pure: the recorder decides when, this module only what."""

from __future__ import annotations

import math

from .._layers.taxonomy import Slot
from .._reduce.accumulators import MomentAccumulator, RangeCounts, SumSq, Update
from .._stats import stats
from .._stats.stepbuffer import Decoded, Pending
from .._vocab import FORMATS, Histogram, LayerStats, Range, Row, StepStats, Summary

ACT, GRAD, INPUT, WEIGHT, PROBE = Row.ACT, Row.GRAD, Row.INPUT, Row.WEIGHT, Row.PROBE
ROOT_IN, ROOT_GRAD = Row.ROOT_IN, Row.ROOT_GRAD
_HIST_QUANTITIES = {ACT: "act", GRAD: "grad"}


def step_stats(slots: list[Slot], number: int, step: Decoded) -> StepStats:
    """The ``StepStats`` of step ``number`` from its (reduced) accumulators: per layer in execution order, then the
    model's input and output gradient, the layers never called, the optimizer and AMP figures."""
    moms, sq, updates, scale = step.moments, step.sumsq, step.updates, step.scale
    layers = []
    root_in = root_grad = None
    for slot, index in step.order.items():
        info = slots[slot]
        act, grad, w = (moms.get((slot, k)) for k in (ACT, GRAD, WEIGHT))
        inp = _input_sumsq(sq.get((slot, INPUT)), moms.get((slot, PROBE)))
        u = updates.get(slot)
        layers.append(LayerStats(
            name=info.name, module_type=info.module_type, index=index, calls=step.calls[slot], role=info.role,
            act=_summary(act, with_act=True, with_sat=info.saturation is not None),
            grad=_summary(grad), weight_shape=info.weight_shape,
            input_rms=math.sqrt(inp.total / inp.n) if inp and inp.n else None,
            input_probe=_summary(moms.get((slot, PROBE)), with_act=True),
            weight_std=w.std if w else None, weight_rms=w.rms if w else None,
            fan_in=info.fan_in, fan_out=info.fan_out, fans_note=info.fans_note, textbook=info.textbook,
            feeds_norm=info.feeds_norm, nonlinearity=info.nonlinearity,
            relu_family=info.relu_family, bounded=info.saturation is not None,
            update_ratio=_ratio(u), update_base_rms=_base_rms(u),
            act_range=_range(step.ranges.get((slot, Row.ACT_RANGE))),
            grad_range=_range(step.ranges.get((slot, Row.GRAD_RANGE))),
        ))
    for slot, info in enumerate(slots):
        if info.is_root:
            r = sq.get((slot, ROOT_IN))
            root_in = math.sqrt(r.total / r.n) if r and r.n else None
            g = moms.get((slot, ROOT_GRAD))
            root_grad = g.std if g else None
    not_called = [s.name for i, s in enumerate(slots) if s.is_layer and i not in step.order]
    result = StepStats(layers=layers, step=number, input_rms=root_in, output_grad_std=root_grad,
                       not_called=not_called, amp_scale=scale)
    gn = step.grad_norms
    if gn is not None:
        pre, post = gn.pre_sharded + gn.pre_replicated, gn.post_sharded + gn.post_replicated
        pre = pre / (scale * scale) if scale else pre
        result.grad_norm_preclip, result.grad_norm_postclip = math.sqrt(max(pre, 0.0)), math.sqrt(max(post, 0.0))
    return result


def histograms(slots: list[Slot], pending: Pending, hist_host: dict, moms: dict, notes: list[str]) -> list[Histogram]:
    """This rank's histograms of a histogram step, from its binned rows and its own moments; a tensor whose range
    is too wide to bin in float32 gets a note instead."""
    rows: dict[tuple[int, int], list[list[float]]] = {}
    for slot, row_type, device, at in pending.hist_entries:
        if device in hist_host:
            rows.setdefault((slot, row_type), []).append(hist_host[device][at])
    out = []
    for slot in pending.order:
        for row_type, label in _HIST_QUANTITIES.items():
            rs = rows.get((slot, row_type))
            m = moms.get((slot, row_type))
            if not rs or m is None or m.n == 0:
                continue  # not recorded
            if not all(math.isfinite(r[0]) and math.isfinite(r[1]) for r in rs):
                if math.isfinite(m.min) and math.isfinite(m.max):  # finite, but too wide to bin in float32
                    notes.append(f"'{slots[slot].name}': no {label} histogram at step {pending.step}:"
                                      f" its range [{m.min:.3g}, {m.max:.3g}] is too wide to bin in float32")
                continue  # NaN/Inf in the tensor: no meaningful bins (its flag says so)
            lo, hi, counts = stats.merge_histograms(rs)
            bins = len(counts)
            edges = [lo + (hi - lo) * i / bins for i in range(bins)] + [hi]
            out.append(Histogram(layer=slots[slot].name, quantity=label, min=m.min, max=m.max, num=m.n,
                                 sum=m.mean * m.n, sum_squares=m.sumsq,
                                 edges=edges, counts=counts))
    return out


def _input_sumsq(acc: SumSq | None, probe: MomentAccumulator | None) -> SumSq | None:
    """Sum of squares and count of a weighted layer's inputs: calls fed by an activation module wrote only a
    sum of squares, the others a probe row whose moments give it."""
    if probe is None or probe.n == 0:
        return acc
    return SumSq(acc.total + probe.sumsq, acc.n + probe.n) if acc else SumSq(probe.sumsq, probe.n)


def _base_rms(u: Update | None) -> float | None:
    """rms of the weights before the update (n elements; summed over shards and ranks)."""
    if u is None or not u.n:
        return None
    return math.sqrt(u.ww / u.n)


def _ratio(u: Update | None) -> float | None:
    if u is None:
        return None
    return math.sqrt(u.dd / u.ww) if u.ww > 0 else None  # from all-zero weights there is no ratio


def _range(rc: RangeCounts | None) -> Range | None:
    """A tensor family against its format (``vocab.Range``), from its counts; None where none was taken."""
    if rc is None or rc.n == 0:
        return None
    fmt = min(FORMATS.values(), key=lambda f: abs(math.log(f.max / rc.fmax))) if rc.fmax > 0 else None
    if fmt is None:
        return None
    a = rc.absmax
    if math.isnan(a) or a == math.inf:
        headroom = -math.inf if a == math.inf else math.nan  # overflowed already (or NaN: the nonfinite rule's)
    else:
        headroom = math.log2(fmt.max / a) if a > 0 else math.inf
    # (a NaN is non-zero and not above the floor: with NaN in the tensor the share says nothing; nonfinite does)
    low = (rc.nonzero - rc.normal) / rc.nonzero if rc.nonzero > 0 and not math.isnan(a) else None
    return Range(format=fmt.name, headroom=headroom, low_fraction=low, zero_fraction=1.0 - rc.nonzero / rc.n,
                 absmax=a)


def _summary(m: MomentAccumulator | None, with_act: bool = False, with_sat: bool = False) -> Summary | None:
    """The diagnosis' view of an accumulator (``vocab.Summary``), None where nothing was recorded."""
    if m is None or m.n == 0:
        return None
    zero = m.zeros / m.n if with_act else None
    sat = m.saturated / m.n if with_sat else None
    return Summary(n=m.n, mean=m.mean, std=m.std, rms=m.rms, absmax=m.absmax, nonfinite=m.nonfinite > 0,
                   min=m.min if math.isfinite(m.min) else None, max=m.max if math.isfinite(m.max) else None,
                   zero_fraction=zero, saturated_fraction=sat)
