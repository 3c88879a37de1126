"""Drift with depth: chains of repeated layers and the trend of their scale along each chain.

Layers of the same structure (parametrised layers: same type and weight shape; activations: same type)
that repeat at least ``min_repeats`` times form a chain. Forward, the members' output rms; backward, their
output gradient norm: a robust slope (Theil-Sen) in log units gives the change per layer and over the chain,
and a total outside [vanishing_ratio, exploding_ratio] is drift, blamed on the layer whose weights to change
(``_cause``) with the fix that applies (``_drift_fix``). Near-zero normalisation weights, dead ReLUs and
all-zero weights explain what would otherwise look like vanishing. Pure, like ``rules``.

Three judgements, by what the run has seen (``Baseline``):

* the init (a chain's first recorded step): the band above; a single member whose gain stands out from its
  chain's by ``layer_step_ratio`` is that layer's own problem (``_outliers``), taken out of the trend;
* a trained net (later steps, a chain inside the band at its start): the drift's change since that start,
  outside ``drift_change_ratio``, is the optimisation's doing (never fixed by rescaling weights);
* a chain flagged at its start stays judged by the band: an init problem persists or recovers; one that crosses
  to the band's other side (vanishing at init, exploding later) is judged as a trained net's, its change counted
  from the 1x a textbook init starts at.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .._report.report import LayerReport
from .._vocab import LayerStats, Role
from ..config import Config
from ._rules import OPTIMISATION_FIX, fix_text, flag

if TYPE_CHECKING:
    from typing import TypeGuard  # Python 3.10+: named in annotations only (postponed)


@functools.lru_cache(maxsize=8192)
def _name_pattern(name: str) -> str:
    """The layer's place in its repeated block: its qualified name with the block indices taken out (``blocks.3.fc``
    → ``blocks.*.fc``; ``conv3`` numbers its block too where no index does: ``conv*``). Where an index already
    numbers the block (``layer1.0.act1``), the digits of the last part name a role inside it (``act1`` before the
    residual sum, ``act2`` after it): kept, so that two roles are never one chain."""
    parts = name.split(".")
    indexed = any(p.isdigit() for p in parts[:-1])
    last = parts[-1] if indexed and not parts[-1].isdigit() else _DIGITS.sub("*", parts[-1])
    return ".".join([_DIGITS.sub("*", p) for p in parts[:-1]] + [last])


_DIGITS = re.compile(r"\d+")
# average poolings by module type (nn.AvgPool2d, timm's AvgPool2dSame; not the adaptive ones, the global pools of
# heads and squeeze-excite gates that sit beside a chain, not on it)
_AVERAGE_POOL = re.compile(r"AvgPool[123]d")
# attention's query and key projections, by the names PyTorch and Hugging Face models give them
QUERY_KEY = re.compile(r"(^|[._])(q|k|query|key|queries|keys|q_proj|k_proj|q_lin|k_lin|to_q|to_k|wq|wk|qk|"
                        r"queries_keys_values|query_key_value|qkv|in_proj)(\.linear)?$")


def _chain_key(s: LayerStats) -> tuple | None:
    """Layers that have one place in repeated blocks; whether a normalisation follows is part of it (it undoes
    forward scale)."""
    if s.role in (Role.WEIGHTED, Role.ACTIVATION):
        return (_name_pattern(s.name), s.module_type, s.feeds_norm)
    return None


def _gated(s: LayerStats) -> bool:
    """Its output gets an exactly-zero gradient: something after it multiplies it by zero (a zero-initialised gate,
    skipinit gain or branch scale, a parameter of any name). Until that grows, the layer's scale reaches neither
    the loss nor the layers before it, so neither its forward nor its backward figure is drift."""
    g = s.grad
    return g is not None and not g.nonfinite and g.rms == 0.0


def _zero_in_forward(s: LayerStats) -> bool:
    """Its weights were all zero in the recorded forward (a zero-init branch, head or norm). Without
    ``optimizer=`` the weights are read when the step ends, after the update has moved them by ~lr, so a constant
    output (std exactly 0: zero weights times anything, plus a constant bias) of a layer whose weights are still
    tiny says so too."""
    if _pre_step_rms(s) == 0:
        return True
    a, w = s.act, s.weight_rms
    if a is None or a.nonfinite or a.std != 0 or w is None or s.update_base_rms is not None:
        return False
    small = _SMALL_NORM_WEIGHT if s.role == Role.NORM else 0.05 / math.sqrt(s.fan_in) if s.fan_in else 0.0
    return w < small


def _pre_step_rms(s: LayerStats) -> float | None:
    """The weight rms the recorded forward and backward ran with (before the optimizer step, where known)."""
    return s.update_base_rms if s.update_base_rms is not None else s.weight_rms


#: a chain and a direction: (name pattern, module type, feeds a norm, 'forward' | 'backward')
ChainKey = tuple[str, str, bool, str]


@dataclass
class Baseline:
    """What the run's earlier recorded steps fixed: each chain's drift at its first recorded step (and whether the
    band flagged it then), and the layers named alone as mis-scaled at the first recorded step."""

    totals: dict[ChainKey, tuple[float, bool]] = field(default_factory=dict)
    outliers: set[str] = field(default_factory=set)
    gains: dict[str, float] = field(default_factory=dict)  # each weighted layer's gain at the latest recorded step
    first_gains: dict[str, float] = field(default_factory=dict)  # ... at the first recorded step with gradients
    first_weights: dict[str, float] = field(default_factory=dict)  # their weight std then
    weights: dict[str, float] = field(default_factory=dict)  # (this step's, for ``first_weights``)
    gated: set[str] = field(default_factory=set)  # layers behind a zero gate at the first recorded step
    small_norms: set[str] = field(default_factory=set)  # norms with near-zero weights at the first recorded step
    low_grads: set[str] | None = None  # layers whose gradients were below their format's floor at the latest step
    started: bool = False  # a step with gradients was committed: later steps judge a trained net
    backward: bool = False  # this step measured gradients (a forward-only step judges nothing of the training)

    def commit(self, seen: Baseline) -> None:
        """Take one published step's chains: a chain keeps the drift of the first step it was judged at. A step
        without gradients (a forward-only call in train mode) does not end the init: no update has happened."""
        for key, value in seen.totals.items():
            self.totals.setdefault(key, value)
        if not self.started:
            self.outliers |= seen.outliers
            self.gated |= seen.gated
            self.small_norms |= seen.small_norms
        if not self.started:
            self.first_gains, self.first_weights = dict(seen.gains), dict(seen.weights)
        self.gains.update(seen.gains)
        if seen.low_grads is not None:
            self.low_grads = seen.low_grads
        self.started = self.started or seen.backward


def drift(rows: list[LayerReport], layers: list[LayerStats], cfg: Config, notes: list[str],
          baseline: Baseline | None = None) -> Baseline:
    """Judge every chain of this step (see the module's docstring); returns what this step saw, for ``baseline``."""
    baseline = baseline or Baseline()
    seen = Baseline()
    chains: dict[tuple, list[int]] = {}
    for pos, s in enumerate(layers):
        key = _chain_key(s)
        if key is not None:
            chains.setdefault(key, []).append(pos)
    zero = [_zero_in_forward(s) for s in layers]
    zero_after = [False] * (len(layers) + 1)  # zero_after[p]: a layer after position p has all-zero weights
    for pos in range(len(layers) - 1, -1, -1):
        zero_after[pos] = zero_after[pos + 1] or (pos + 1 < len(layers) and zero[pos + 1])
    _zero_grad_notes(rows, layers, zero, notes)
    norms = [s.index for s in layers if s.role == Role.NORM]
    pools = [s.index for s in layers if _AVERAGE_POOL.match(s.module_type)]
    long_chains = {key: members for key, members in chains.items() if len(members) >= cfg.min_repeats}
    outliers = _outliers(rows, layers, long_chains.values(), cfg,
                         None if not baseline.started else baseline.outliers)
    if baseline.started:  # a member the updates moved alone, away from its own start while its peers stayed
        outliers.update(_grown_apart(rows, layers, long_chains.values(), cfg, baseline, outliers))
    lone = _lone(rows, layers, long_chains.values(), cfg, baseline.outliers if baseline.started else None)
    seen.outliers = {layers[p].name for p in (*outliers, *lone)}
    seen.gated = {s.name for s in layers if _gated(s)}
    seen.backward = any(s.grad is not None for s in layers)
    outliers = {p: f for p, f in outliers.items() if not layers[p].feeds_norm}  # a norm after it undoes its scale
    _jumps(rows, layers, cfg, baseline.gains if baseline.started else {})
    seen.gains = {s.name: row.gain for row, s in zip(rows, layers)
                  if s.role == Role.WEIGHTED and row.gain and math.isfinite(row.gain)}
    seen.weights = {s.name: s.weight_std for s in layers if _usable(s.weight_std)}
    for (pattern, module_type, feeds_norm), members in long_chains.items():
        first, last = layers[members[0]].index, layers[members[-1]].index
        normalized = any(first < i < last for i in norms)
        for direction in ("forward", "backward"):
            if direction == "forward" and feeds_norm:
                continue
            if direction == "backward" and QUERY_KEY.search(pattern):
                continue  # their gradient is second order in the attention logits: not a trunk figure
            key = (pattern, module_type, feeds_norm, direction)
            judged = _judge(rows, layers, members, cfg, direction, zero if direction == "forward" else zero_after,
                            normalized, outliers, baseline.totals.get(key), baseline.started, baseline.gated,
                            pools)
            if judged is not None:
                seen.totals[key] = judged
    return seen


def _outliers(rows: list[LayerReport], layers: list[LayerStats], chains: Iterable[list[int]], cfg: Config,
              known: set[str] | None) -> dict[int, float]:
    """Chain members that alone scale the signal: ``{position: factor}`` where a member's measured gain is at least
    ``layer_step_ratio`` times above (or below) the median gain of its chain's weighted members (a fan-in init
    keeps the gain whatever the width, so members of every stage are compared).

    At the first recorded step each is flagged on itself, with its own factor. Later (``known``: the layers found
    then) only those are followed, so that the trend of their chain stays judged without their step: a trained
    net's members legitimately part ways. A member that feeds a normalisation is flagged too (the norm undoes its
    scale forward, but its own updates shrink by as much).
    """
    found: dict[int, float] = {}
    for members in chains:
        kinds: dict[object, dict[int, tuple[float, float]]] = {}  # position -> (gain, suggested scale)
        for p in members:
            gain, scale = rows[p].gain, rows[p].suggested_scale
            if layers[p].role == Role.WEIGHTED and _usable(gain) and _usable(scale):
                kinds.setdefault(_kind(layers[p]), {})[p] = (gain, scale)
        for group in kinds.values():
            _odd_members(layers, group, cfg, known, found)
    if known is None or known:  # the first step: new findings; later: the init problems that persist
        for p, factor in found.items():
            _flag_outlier(rows[p], layers[p], factor, cfg)
    return found


def _lone(rows: list[LayerReport], layers: list[LayerStats], chains: Iterable[list[int]], cfg: Config,
          known: set[str] | None) -> dict[int, float]:
    """Layers outside every chain that alone scale the signal: ``{position: factor}`` where the weight std and the
    measured gain both stand ``lone_layer_ratio`` times above or below the textbook (``suggested_scale`` and
    ``measured_scale`` agree on it) and the output itself is off its unit scale by the square root of that (weights
    that offset an input far from unit scale, raw pixels or a time in seconds, leave it healthy). The next weighted
    layer must receive that output as it is (its input rms within 5x of it: not a residual branch summed into a
    skip, nor a gate), unless a norm takes it (the norm undoes it forward; its updates shrink against its weights
    by as much). The model's last weighted layer is named only when large (a small or zero-init head is a
    convention). Flagged on the layer; later (``known``: the layers found at the first recorded step) only those,
    while they persist."""
    in_chain = {p for members in chains for p in members}
    weighted = [p for p, s in enumerate(layers) if s.role == Role.WEIGHTED]
    limit, found = cfg.lone_layer_ratio, {}
    for i, p in enumerate(weighted):
        s, row, act = layers[p], rows[p], layers[p].act
        if p in in_chain or not s.textbook or (known is not None and s.name not in known):
            continue
        textbook, measured = row.suggested_scale, row.measured_scale
        if not (_usable(textbook) and _usable(measured) and act is not None and _usable(act.rms)):
            continue
        if textbook >= limit and measured >= limit and act.rms <= limit ** -0.5:
            small = True
        elif textbook <= 1 / limit and measured <= 1 / limit and act.rms >= limit ** 0.5:
            small = False
        else:
            continue
        last = i == len(weighted) - 1
        if last and small:
            continue
        if not last and not s.feeds_norm:
            carried = layers[weighted[i + 1]].input_rms
            if not (_usable(carried) and 0.2 <= carried / act.rms <= 5.0):
                continue
        found[p] = 1 / textbook
        flag(row, "vanishing" if small else "exploding", "forward", 1 / textbook, 1 / limit if small else limit,
             "lone_layer_ratio",
             f"'{s.name}' ({s.module_type}) alone is {'vanishing' if small else 'exploding'}: its weight std is"
             f" ×{1 / textbook:.3g} the {row.suggested_init} scale and its gain {row.gain:.3g} (lone_layer_ratio"
             f" {limit:g}): {_alone_effect(s, 1 / textbook)}. Fix: multiply its weights by {textbook:.3g}"
             " (torchdiag.apply_suggestions does it) or re-initialise it"
             + (f" with {row.suggested_init}" if row.suggested_init else ""), s.name, 1, True, reason="init")
    return found


def _alone_effect(s: LayerStats, factor: float) -> str:
    """What one layer whose gain is ``factor`` times what it should be does to the run."""
    if s.feeds_norm:
        return (f"the normalisation after it undoes that forward, but its own updates are ×{1 / factor:.3g} as large"
                f" against its weights (it learns that much more slowly; ×{1 / (factor * factor):.3g} under SGD)")
    return "so everything after it (forward) and before it (backward) is scaled by that much"


def _grown_apart(rows: list[LayerReport], layers: list[LayerStats], chains: Iterable[list[int]], cfg: Config,
                 baseline: Baseline, known: dict[int, float]) -> dict[int, float]:
    """In a trained net, the one chain member whose gain the updates moved away from its own start by
    ``layer_step_ratio`` while the others of its kind stayed near theirs, that now stands as far apart from them,
    and whose own weights moved the same way by at least its square root (a gain that moves with tiny inputs, a
    bias taking over a vanished signal, is not its weights'): that layer's problem, with its own factor (the trend
    of its chain is judged without its step), blamed on the optimisation. ``{position: factor against the others'
    median gain}``, flagged on the layer."""
    limit, found = cfg.layer_step_ratio, {}
    first, weights = baseline.first_gains, baseline.first_weights
    for members in chains:
        kinds: dict[object, dict[int, float]] = {}  # position -> gain
        for p in members:
            s, gain = layers[p], rows[p].gain
            if (s.role == Role.WEIGHTED and p not in known and not s.feeds_norm and _usable(gain)
                    and _usable(first.get(s.name))):
                kinds.setdefault(_kind(s), {})[p] = gain
        for group in kinds.values():
            if len(group) < cfg.min_repeats:
                continue
            moved = {p: gain / first[layers[p].name] for p, gain in group.items()}
            typical_move = statistics.median(moved.values())
            typical = statistics.median(group.values())
            apart = [p for p, gain in group.items()
                     if _apart(moved[p] / typical_move, limit) and _apart(gain / typical, limit)]
            if len(apart) == 1:  # one layer's doing; several apart at once is the chain's trend, judged as such
                p = apart[0]
                was, now = weights.get(layers[p].name), layers[p].weight_std
                if not (_usable(was) and _usable(now)) or not _apart(now / was, math.sqrt(limit)) \
                        or (now > was) != (moved[p] > typical_move):
                    continue
                found[p] = group[p] / typical
                _flag_grown(rows[p], layers[p], found[p], moved[p] / typical_move, cfg)
    return found


def _flag_grown(row: LayerReport, s: LayerStats, factor: float, moved: float, cfg: Config) -> None:
    problem = "exploding" if factor > 1 else "vanishing"
    flag(row, problem, "forward", factor, cfg.layer_step_ratio if factor > 1 else 1 / cfg.layer_step_ratio,
         "layer_step_ratio",
         f"'{s.name}' ({s.module_type}) alone became {problem} in training: its gain moved ×{moved:.3g} from its start"
         f" against the other layers of its role, and is now ×{factor:.3g} theirs (layer_step_ratio"
         f" {cfg.layer_step_ratio:g}): everything after it (forward) and before it (backward) is scaled by that much."
         f" The updates did this, not the init. Fix: {OPTIMISATION_FIX}; or look at what trains this layer alone"
         " (its own learning rate, weight decay or a loss term on it)",
         s.name, 1, False, reason="optimisation")


def _kind(s: LayerStats) -> object:
    """What makes two weighted layers alike beyond their place: a depthwise 3x3 and a pointwise 1x1 conv of one
    block (torchvision's ``block.0``, ``block.1``) are drawn, and behave, differently."""
    shape = s.weight_shape or ()
    return (s.module_type, len(shape), shape[2:], len(shape) > 2 and shape[1] == 1)


def _odd_members(layers: list[LayerStats], group: dict[int, tuple[float, float]], cfg: Config,
                 known: set[str] | None, found: dict[int, float]) -> None:
    """Add to ``found`` the members of ``group`` (weighted layers of one kind in one chain: position -> their
    usable gain and suggested scale) that stand apart."""
    if len(group) < cfg.min_repeats:
        return
    limit = cfg.layer_step_ratio
    typical = statistics.median(gain for gain, _ in group.values())
    textbook = statistics.median(scale for _, scale in group.values())
    # the gain says it stands apart; its weights, against the textbook scale of their own fan, say why. Both, in the
    # same direction and each by the limit: a gain that differs for another reason (the pooled input of a
    # squeeze-excite, the few tokens of a late attention window) is not one layer's weights
    shapes = [layers[p].weight_shape for p in group]
    odd = {p: gain / typical for p, (gain, scale) in group.items()
           if _apart(gain / typical, limit) and _apart(textbook / scale, limit)
           and (gain > typical) == (textbook > scale)
           and shapes.count(layers[p].weight_shape) > 1}  # one of the repeats: not a head or a stem of its own
    if len(odd) > max(1, len(group) // 4):
        return  # many members apart from the median is no single layer's doing
    found.update((p, f) for p, f in odd.items() if known is None or layers[p].name in known)


def _jumps(rows: list[LayerReport], layers: list[LayerStats], cfg: Config, before: dict[str, float]) -> None:
    """A weighted layer whose own gain, std(out)/rms(in), changed by ``jump_ratio`` between two recorded steps, to a
    gain as far off the textbook one: the update in between moved its weights along its inputs (Adam moves every
    weight by ~lr, and summed over a wide layer's inputs that is many times its output). Not for layers a
    normalisation follows (their scale is undone), nor for weights growing out of a (near-)zero init."""
    limit = cfg.jump_ratio
    for row, s in zip(rows, layers):
        was = before.get(s.name)
        if not was or row.gain is None or not math.isfinite(row.gain) or s.feeds_norm or s.role != Role.WEIGHTED:
            continue
        base = _pre_step_rms(s)
        if not base or not s.fan_in or base < 0.05 / math.sqrt(s.fan_in):
            continue
        change = row.gain / was
        if 1 / limit <= change <= limit:
            continue
        off = row.measured_scale  # the factor that would give it the textbook gain now
        if off is None or (1 / limit <= off if change > 1 else off <= limit):
            continue  # it jumped, but to a gain a unit-gain init would have (a small-init head growing into its role)
        problem = "exploding" if change > 1 else "vanishing"
        ratio = f" (the update moved its weights by {s.update_ratio:.2g} of their norm)" if s.update_ratio else ""
        flag(row, problem, "forward", change, limit if change > 1 else 1 / limit, "jump_ratio",
             f"'{s.name}' ({s.module_type}) is {problem}: its gain changed ×{change:.3g} since the last recorded step"
             f" (jump_ratio {limit:g}){ratio}: an update moved its weights along its inputs, summed over"
             f" {s.fan_in} of them. Fix: {OPTIMISATION_FIX}", s.name, 1, False, reason="optimisation")


def _apart(ratio: float, limit: float) -> bool:
    return not 1 / limit < ratio < limit


def _usable(x: float | None) -> TypeGuard[float]:
    return x is not None and x > 0 and math.isfinite(x)


def _flag_outlier(row: LayerReport, s: LayerStats, factor: float, cfg: Config) -> None:
    problem = "exploding" if factor > 1 else "vanishing"
    textbook = (f"; its weight std is ×{1 / row.suggested_scale:.3g} the {row.suggested_init} scale"
                if row.suggested_scale else "")
    effect = _alone_effect(s, factor)
    flag(row, problem, "forward", factor, cfg.layer_step_ratio if factor > 1 else 1 / cfg.layer_step_ratio,
         "layer_step_ratio",
         f"'{s.name}' ({s.module_type}) alone is {problem}: its gain is ×{factor:.3g} that of the other layers of its"
         f" role (layer_step_ratio {cfg.layer_step_ratio:g}): {effect}{textbook}. Fix: multiply its weights by"
         f" {1 / factor:.3g} (torchdiag.apply_suggestions does it) or re-initialise it"
         + (f" with {row.suggested_init}" if row.suggested_init else ""),
         s.name, 1, True, reason="init")


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


def _size(s: LayerStats, forward: bool) -> int | None:
    """The tensor's elements per call."""
    m = s.act if forward else s.grad
    return None if m is None or not m.n else m.n // max(s.calls, 1)


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
           zero: list[bool], normalized: bool, outliers: dict[int, float], start: tuple[float, bool] | None,
           trained: bool, gated: AbstractSet[str] = frozenset(),
           pools: list[int] | None = None) -> tuple[float, bool] | None:
    """Judge one chain in one direction; returns (its drift, whether the band flagged it), or None: not measured.

    ``start``: the chain's (drift, flagged) at the first step it was judged at; ``trained``: a step was published
    before this one (so a chain first judged now is judged later, from this start); ``gated``: the layers behind a
    zero gate at the first recorded step, left out while they grow (below 1/``exploding_ratio`` of the others);
    ``pools``: the indices of the average poolings (nn.AvgPool1d/2d/3d and subclasses) in the step."""
    forward = direction == "forward"
    seq = []  # (ordinal in the chain, pos, figure) of members with a usable, finite measurement
    skip = set()  # members that are not part of a drift: exact zeros from all-zero weights (a note instead)
    # gradients that shrink through float32's range to exact zeros (a vanishing stack) are underflow, not a gate
    # (relative too: float16 flushes below 6e-8 without passing through 1e-30, after spanning orders of magnitude)
    sizes_ = [g.rms for g in (layers[pos].grad for pos in members)
              if g is not None and not g.nonfinite and math.isfinite(g.rms) and g.rms > 0]
    underflow = bool(sizes_) and (min(sizes_) < _UNDERFLOWING or min(sizes_) < 1e-4 * max(sizes_))
    for k, pos in enumerate(members):
        fig, nonfinite = _figure(layers[pos], forward)
        if nonfinite:
            if forward:
                break  # past the first NaN/Inf nothing is measured any more (the members after it are still the chain)
            continue
        if fig is not None and fig == 0.0 and zero[pos]:
            skip.add(pos)
        elif fig is not None and not underflow and _gated(layers[pos]):
            skip.add(pos)  # behind a zero gate (a skipinit gain, a zero-init branch scale): its scale reaches nothing
        elif fig is not None:
            seq.append((k, pos, fig))
    growing = [m for m in seq if layers[m[1]].name in gated]
    if growing:  # a gated branch grows out of zero after the first updates: judged once it has reached its scale
        others = [m[2] for m in seq if layers[m[1]].name not in gated]
        if others:
            floor = statistics.median(others) / cfg.exploding_ratio
            seq = [m for m in seq if layers[m[1]].name not in gated or m[2] >= floor]
    if len(seq) < cfg.min_repeats:
        return None
    # per repeat, in log units; backward the gradient flows from the last member to the first. A mis-scaled layer
    # named alone (``_outliers``) scales the members after it (forward) or before it (backward): taken out here
    ys = [math.log(max(fig, _TINY)) - sum(math.log(f) for p, f in outliers.items() if (p <= pos if forward else
                                                                                         p > pos))
          for _, pos, fig in seq]
    xs, shapes = [k for k, _, _ in seq], [_shape(layers[pos], forward) for _, pos, _ in seq]
    slope = _slope(xs, ys, shapes)
    k0, k1 = seq[0][0], seq[-1][0]
    lo, hi, key_lo, key_hi = cfg.vanishing_ratio, cfg.exploding_ratio, "vanishing_ratio", "exploding_ratio"
    if normalized:
        lo, hi, key_lo, key_hi = 1 / cfg.normalized_ratio, cfg.normalized_ratio, "normalized_ratio", "normalized_ratio"
    total = _exp(slope * (k1 - k0) if forward else -slope * (k1 - k0))
    sizes_or_none = [_size(layers[pos], forward) for _, pos, _ in seq]
    sizes = [n for n in sizes_or_none if n is not None]
    if not lo <= total <= hi and len(sizes) == len(sizes_or_none) and len(set(sizes)) > 1:
        # members of different sizes (resolution, width): an average pooling keeps a smooth signal's rms, and a white
        # noise's rms over the square root of its size (a 2x2 average halves white noise's rms); backward, the norm
        # per call and the rms per element: the figure of the two that moves less is the one judged, as drift that
        # depends on the input's spectrum is not the init's (asked only of a drift the first figure puts outside).
        # Backward across an average pooling, the norm times the square root of the size too: the pooling's
        # transpose spreads every gradient over its window, halving its norm (2x2) whatever the input and the
        # weights (a stride keeps it), and no init undoes that without breaking the forward rms the pooling keeps
        first, last = layers[seq[0][1]].index, layers[seq[-1][1]].index
        pooled = not forward and any(first < i < last for i in pools or ())
        for sign in (-0.5, 0.5) if pooled else (-0.5,):
            slope = min(slope, _slope(xs, [y + sign * math.log(n) for y, n in zip(ys, sizes)], shapes), key=abs)
        total = _exp(slope * (k1 - k0) if forward else -slope * (k1 - k0))
    banded = not lo <= total <= hi
    if start is None and trained:
        return total, False  # first measured on a trained net (a branch that grew out of zero): its start from now
    if start is not None and (not start[1] or (banded and (total < lo) != (start[0] < lo))):
        # inside the band at its start, or flagged then on the other side (vanishing at init, exploding now): what
        # moved it since is the updates' doing, judged by its change (from where a textbook init starts, for the latter)
        _judge_change(rows, layers, members, seq, cfg, direction, total, start[0], normalized, start[1])
        return total, banded
    if not banded:
        return total, False
    problem, thr, key = ("vanishing", lo, key_lo) if total < lo else ("exploding", hi, key_hi)
    cause_pos = _cause(layers, seq[0][1])
    cause = layers[cause_pos]
    per = _exp(slope if forward else -slope)
    s0, s1 = layers[members[0]], layers[members[-1]]
    chain = f"{len(members)} repeated {s0.module_type} layers ('{s0.name}' … '{s1.name}')"
    what = "output rms" if forward else "output gradient norm"
    how = "from the first to the last measured" if forward else "from the last to the first (towards the input)"
    if cause.role == Role.NORM and any(f.key == "norm_weight" for f in rows[cause_pos].findings):
        rows[cause_pos].notes.append(f"along {chain} the {what} changes {total:.3g}× ({direction}): a consequence of"
                                     " the near-zero normalisation weights")
        return total, True
    fixable, fix = _drift_fix(rows, layers, members, cause_pos, problem, forward, cfg)
    reason = "architecture" if fixable is False else "init"
    lead = (f"'{cause.name}' ({cause.module_type}) and the layers of its kind make the signal {problem} ({direction}):"
            f" along {chain} the {what} changes {per:.3g}× per layer, {total:.3g}× {how} ({key} {thr:g}). Fix: {fix}")
    if not any(f.problem == problem and f.direction == direction for f in rows[cause_pos].findings):
        flag(rows[cause_pos], problem, direction, total, thr, key, lead, cause.name, len(members), fixable,
             reason=reason)
        if fixable is False:
            rows[cause_pos].notes.append(f"init cannot fix this {problem} ({direction}) drift: {fix}")
    _flag_members(rows, layers, members, cause_pos, skip, problem, direction, thr, key, chain, cause.name, fixable,
                  reason, lambda k: _exp(slope * (k - k0) if forward else -slope * (k1 - k)))
    return total, True


def _flag_members(rows: list[LayerReport], layers: list[LayerStats], members: list[int], cause_pos: int, skip: set,
                  problem: str, direction: str, thr: float, key: str, chain: str, cause: str, fixable: bool | None,
                  reason: str, at_place: Callable[[int], float]) -> None:
    """Every member of a drifting chain is part of it (and gets its own figure at its place)."""
    for k, pos in enumerate(members):
        if pos == cause_pos or pos in skip:
            continue
        at = at_place(k)
        s = layers[pos]
        flag(rows[pos], problem, direction, at, thr, key,
             f"'{s.name}' ({s.module_type}) is {problem} ({direction}): {at:.3g}× at its place along {chain};"
             f" see '{cause}'", cause, 1, fixable, reason=reason)


def _judge_change(rows: list[LayerReport], layers: list[LayerStats], members: list[int], seq: list, cfg: Config,
                  direction: str, total: float, start: float, normalized: bool, flagged_at_start: bool = False) -> None:
    """A trained chain: its drift against its own start. Moved by ``drift_change_ratio`` (``normalized_ratio`` for
    a chain with norms between its members), it is the optimisation's doing: the fix is the learning rate.
    ``flagged_at_start``: the band flagged the chain's start on the other side (the init's problem, now overshot):
    its drift is held against the 1x a textbook init starts from, as a healthy chain's would be (the updates that
    undo a vanishing init are no more of a problem than those that train a healthy one)."""
    limit = cfg.normalized_ratio if normalized else cfg.drift_change_ratio
    key = "normalized_ratio" if normalized else "drift_change_ratio"
    reference = 1.0 if flagged_at_start else start
    change = total / reference if reference > 0 else math.inf
    if 1 / limit <= change <= limit:
        return
    problem, thr = ("vanishing", 1 / limit) if change < 1 else ("exploding", limit)
    forward = direction == "forward"
    cause_pos = _cause(layers, seq[0][1])
    cause = layers[cause_pos]
    s0, s1 = layers[members[0]], layers[members[-1]]
    chain = f"{len(members)} repeated {s0.module_type} layers ('{s0.name}' … '{s1.name}')"
    what = "output rms" if forward else "output gradient norm"
    since = (f"against {start:.3g}× when the run started (the init's, flagged then) and the 1× a textbook init gives"
             f" ({key} {limit:g})" if flagged_at_start else
             f"against {start:.3g}× when the run started ({change:.3g}× since; {key} {limit:g})")
    lead = (f"'{cause.name}' ({cause.module_type}) and the layers of its kind became {problem} ({direction}) in"
            f" training: along {chain} the {what} changed {total:.3g}× over the chain, {since}. The updates did"
            f" this, not the init. Fix: {_OVERSHOT_FIX if flagged_at_start else OPTIMISATION_FIX}")
    if not any(f.problem == problem and f.direction == direction for f in rows[cause_pos].findings):
        flag(rows[cause_pos], problem, direction, change, thr, key, lead, cause.name, len(members), False,
             reason="optimisation")
    _flag_members(rows, layers, members, cause_pos, set(), problem, direction, thr, key, chain, cause.name, False,
                  "optimisation", lambda k: change)


# a chain the init left on one side of the band and the updates carried to the other
_OVERSHOT_FIX = f"{OPTIMISATION_FIX} (the init's own drift the other way is fixed by its init gains)"


def _exp(x: float) -> float:
    """exp that saturates (to 1e304) instead of raising OverflowError: figures may span float64's whole range."""
    return math.exp(min(x, 700.0))


_TINY = 1e-45  # below float32's smallest subnormal: an exact zero (underflow) in log space
_UNDERFLOWING = 1e-30  # a gradient this small is on its way to float32's underflow (a gate gives exact zeros at once)


def _cause(layers: list[LayerStats], pos: int) -> int:
    """The layer whose weights to change for a drift seen at ``pos``: the first normalisation layer before it whose
    weights are near zero (it scales everything through it down), else the chain member itself, or the nearest
    weighted layer before it in execution order (an activation has no weights)."""
    for p in range(pos + 1):
        w = _pre_step_rms(layers[p])
        if layers[p].role == Role.NORM and w is not None and 0 < w < _SMALL_NORM_WEIGHT \
                and not _zero_in_forward(layers[p]):
            return p
    for p in range(pos, -1, -1):
        s = layers[p]
        if s.role == Role.WEIGHTED:
            return pos if s.feeds_norm and p != pos else p  # behind a norm its weight scale is undone
    return pos


def small_norm_weights(rows: list[LayerReport], layers: list[LayerStats], known: set[str] | None = None) -> set[str]:
    """A normalisation layer whose weights start near zero (but not at exactly zero, a zero-init branch) scales every
    signal through it down by their rms: vanishing (forward), blamed on the first such layer. ``known``: later
    steps follow the norms found at the first recorded step only (an init problem that persists, or heals).
    Returns the names of the norms flagged."""
    small: dict[int, float] = {}  # position -> weight rms
    for p, s in enumerate(layers):
        rms = _pre_step_rms(s)
        if s.role == Role.NORM and rms is not None and 0 < rms < _SMALL_NORM_WEIGHT and not _zero_in_forward(s) \
                and (known is None or s.name in known):
            small[p] = rms
    if not small:
        return set()
    first_pos, w = next(iter(small.items()))
    first = layers[first_pos]
    msg = (f"'{first.name}' ({first.module_type}) makes the signal vanishing (forward): its weights have rms {w:.3g},"
           f" where a normalisation starts at 1, so every signal through it is scaled by about that"
           f" ({len(small)} normalisation layer(s) like it). Fix: nn.init.ones_(m.weight) and nn.init.zeros_(m.bias)"
           " for every normalisation layer (an init drawn like a projection's, N(0, 0.02), is a bug)")
    for i, (p, rms) in enumerate(small.items()):
        s = layers[p]
        flag(rows[p], "vanishing", "forward", rms, _SMALL_NORM_WEIGHT, "norm_weight",
              msg if i == 0 else f"'{s.name}' ({s.module_type}): weights of rms {rms:.3g}; see"
              f" '{first.name}'",
              first.name, len(small) if i == 0 else 1, True, reason="init")
    return {layers[p].name for p in small}


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
