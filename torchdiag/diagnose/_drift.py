"""Drift with depth: chains of repeated layers and the trend of their scale along each chain.

Layers of the same structure (parametrised layers: same type and weight shape; activations: same type)
that repeat at least ``min_repeats`` times form a chain. Forward, the members' output rms; backward, their
output gradient norm: a robust slope (Theil-Sen) in log units gives the change per layer and over the chain,
and a total outside [vanishing_ratio, exploding_ratio] is drift, blamed on the layer whose weights to change
(``_cause``) with the fix that applies (``_drift_fix``). Near-zero normalisation weights, dead ReLUs and
all-zero weights explain what would otherwise look like vanishing. Pure, like ``rules``.
"""

from __future__ import annotations

import math
import re

import torch

from ..config import Config
from ..report.report import LayerReport
from ..vocab import LayerStats, Role
from ._rules import fix_text, flag


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


def drift(rows: list[LayerReport], layers: list[LayerStats], cfg: Config, notes: list[str]) -> None:
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


_LIST_MEMBERS = 24  # measured: lists cost 0.13 ms at 24 members (276 pairs) against 0.25 ms of tensor ops; at 64
# members (2,016 pairs) 3.4 ms against 0.5 ms


def _slope(xs: list[int], ys: list[float], shapes: list) -> float:
    """Median of the pairwise slopes of ``ys`` against ``xs`` (Theil-Sen): one odd member moves it little.

    Pairs of members of one shape only, where there are enough: a width or resolution change between stages (with
    an init that is not variance-preserving, or a normalisation whose gradient goes as 1/std) is a step, not a
    trend; a plain stack whose every layer has its own shape is compared across shapes. Long chains use float64
    tensor ops: the same IEEE divisions and order statistics as the lists, so the same slope to the bit (tested).
    """
    n = len(ys)
    stride = -(-n // 64)  # long chains: pairs at a spread of positions, at most ~2,000 of them
    if n <= _LIST_MEMBERS:
        pairs = [(i, j) for i in range(0, n, stride) for j in range(i + 1, n, stride)]
        same = [(i, j) for i, j in pairs if shapes[i] == shapes[j]]
        if len(same) >= max(3, len(pairs) // 8):
            pairs = same
        slopes = sorted((ys[j] - ys[i]) / (xs[j] - xs[i]) for i, j in pairs)
        mid = len(slopes) // 2
        return slopes[mid] if len(slopes) % 2 else 0.5 * (slopes[mid - 1] + slopes[mid])
    # the same pairs as tensors: i = stride * a against j = stride * b + 1 for b >= a (j < n: b < ceil((n-1)/stride))
    a, b = torch.triu_indices(-(-n // stride), -(-(n - 1) // stride), 0)
    i, j = a * stride, b * stride + 1
    ids: dict = {}
    shape_id = torch.tensor([ids.setdefault(sh, len(ids)) for sh in shapes])
    same_t = shape_id[i] == shape_id[j]
    if int(same_t.sum()) >= max(3, i.numel() // 8):
        i, j = i[same_t], j[same_t]
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    sorted_t = ((y[j] - y[i]) / (x[j] - x[i])).sort().values
    mid = sorted_t.numel() // 2
    if sorted_t.numel() % 2:
        return sorted_t[mid].item()
    lo, hi = sorted_t[mid - 1: mid + 1].tolist()
    return 0.5 * (lo + hi)


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
        flag(rows[cause_pos], problem, direction, total, thr, key, lead, cause.name, len(members), fixable)
        if fixable is False:
            rows[cause_pos].notes.append(f"init cannot fix this {problem} ({direction}) drift: {fix}")
    for k, pos in enumerate(members):  # every member of a drifting chain is part of it (and gets its own scale)
        if pos == cause_pos or pos in skip:
            continue
        at = math.exp(slope * (k - k0) if forward else -slope * (k1 - k))  # the trend at its place
        s = layers[pos]
        flag(rows[pos], problem, direction, at, thr, key,
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


def small_norm_weights(rows: list[LayerReport], layers: list[LayerStats]) -> None:
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
        flag(rows[p], "vanishing", "forward", _pre_step_rms(s), _SMALL_NORM_WEIGHT, "norm_weight",
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
    return None, fix_text(row)


def explain_by_dead(rows: list[LayerReport]) -> None:
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
