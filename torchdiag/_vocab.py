"""Shared vocabulary of the pipeline: row kinds, layer roles, the per-step numbers and histograms,
the divergence signals of a step.

A leaf: it imports nothing else of torchdiag, so that capture, the step buffer, the reduction, diagnosis
and the sinks can all speak it without importing each other. Plain data, no tensors.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Row(enum.IntEnum):
    """What one row of the step buffer measures (the hooks write rows; the host decodes them by this)."""

    ACT = 0  # a module's output
    GRAD = 1  # the gradient with respect to that output
    INPUT = 2  # a weighted layer's input: sum of squares (or the producer's row)
    WEIGHT = 3  # a layer's main weight, once per recorded step
    ROOT_IN = 4  # the model's input: sum of squares
    ROOT_GRAD = 5  # the gradient at the model's output
    UPDATE = 6  # ||w_new - w_old||^2, ||w_old||^2 across an optimizer step
    CLIP = 7  # step level: gradient sum of squares before and after the user's clipping
    SCALE = 8  # step level: GradScaler's scale
    PROBE = 9  # a weighted layer's input range and zeros (which functional activation ran before it)
    ACT_RANGE = 10  # a half-precision output against its dtype's range: [format max, absmax, nonzero, normal counts]
    GRAD_RANGE = 11  # the same of the gradient with respect to that output (as the backward computed it)


class Role:
    """A watched module's role in the network (``LayerStats.role``): plain strings, compared as such."""

    WEIGHTED = "weighted"  # has a >= 2-D parameter (Linear, Conv, Embedding, attention, a custom layer...)
    ACTIVATION = "activation"
    NORM = "norm"
    PASSTHROUGH = "passthrough"  # dropout, identity, flatten: the signal goes through unchanged in scale
    OTHER = "other"
    ALL = (WEIGHTED, ACTIVATION, NORM, PASSTHROUGH, OTHER)


@dataclass(frozen=True)
class Nonlinearity:
    """The activation that follows a layer: a ``calculate_gain`` name and its parameter."""

    name: str  # 'linear', 'relu', 'leaky_relu', 'tanh', 'gelu', ...
    param: float | None = None  # negative slope of leaky_relu

    def __str__(self) -> str:
        return self.name if self.param is None else f"{self.name}({self.param:g})"


@dataclass
class Summary:
    """What the diagnosis needs of one recorded tensor family (plain floats), read from a host-side
    ``accumulators.MomentAccumulator``."""

    n: int
    mean: float
    std: float
    rms: float
    absmax: float
    nonfinite: bool
    zero_fraction: float | None = None
    saturated_fraction: float | None = None
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Format:
    """A floating-point format's range: its largest finite value, its smallest normal one (below it values are
    subnormal, with fewer significant bits, and below half the smallest subnormal they round to zero) and its
    mantissa bits."""

    name: str
    max: float
    tiny: float
    mantissa: int

    @property
    def floor(self) -> float:
        """Eight of the format's smallest subnormal steps: a value below it keeps 3 significant bits or fewer
        (rounded by up to 1/16 of itself), and half a step below it is zero (float16: 2**-21, about 4.8e-7)."""
        return self.tiny * 2.0 ** (3 - self.mantissa)


#: the formats whose range a layer can run out of (bfloat16 and float32 share float32's exponent range)
FORMATS = {
    "float16": Format("float16", 65504.0, 2.0 ** -14, 10),
    "bfloat16": Format("bfloat16", 3.3895313892515355e38, 2.0 ** -126, 7),
    "float8_e4m3fn": Format("float8_e4m3fn", 448.0, 2.0 ** -6, 3),
    "float8_e5m2": Format("float8_e5m2", 57344.0, 2.0 ** -14, 2),
}


@dataclass
class Range:
    """One recorded tensor family against the range of the format it was computed in (or, from ``check``, the
    format asked about): the headroom to overflow and the share of its non-zero values below the format's
    precision floor (``Format.floor``)."""

    format: str  # a ``FORMATS`` key
    headroom: float  # log2(format max / absmax): bits of growth left before the first Inf (inf: all zeros)
    low_fraction: float | None  # of the non-zero values, those below the format's precision floor
    zero_fraction: float  # exact zeros (structural ones, a ReLU's, included)
    absmax: float


@dataclass
class LayerStats:
    """The numbers of one watched module at one step, plus the static facts diagnosis needs."""

    name: str
    module_type: str
    index: int
    calls: int
    role: str  # a ``Role`` value
    act: Summary | None = None
    grad: Summary | None = None
    input_rms: float | None = None
    input_probe: Summary | None = None  # input range and zeros, when no built-in module produced it
    weight_shape: tuple[int, ...] | None = None
    weight_std: float | None = None
    weight_rms: float | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    fans_note: str | None = None  # why fan_in/fan_out are unknown
    textbook: bool = True  # the gain/sqrt(fan_in) rule applies (not for lookups, RNNs, attention)
    feeds_norm: bool = False  # its output goes straight into a normalisation layer
    nonlinearity: Nonlinearity | None = None  # for activation modules: what they apply
    relu_family: bool = False
    bounded: bool = False
    update_ratio: float | None = None  # ||w_new - w_old|| / ||w_old|| across the optimizer step
    update_base_rms: float | None = None  # rms of w_old
    act_range: Range | None = None  # a half-precision output against its dtype's range
    grad_range: Range | None = None  # ... and its gradient (scaled, under a GradScaler, as the backward computed it)


@dataclass
class Histogram:
    """One layer's activation or gradient histogram at one step, ready for ``add_histogram_raw``.

    ``edges`` has ``len(counts) + 1`` values (left edge of the first bin ... right edge of the
    last); ``min``/``max``/``num``/``sum``/``sum_squares`` are over every element recorded.
    """

    layer: str
    quantity: str  # 'act' | 'grad'
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    edges: list[float]
    counts: list[float]


@dataclass
class StepStats:
    """One recorded step: its layers' numbers, step-level figures, and its histograms if it had them."""

    layers: list[LayerStats]
    step: int = 0
    input_rms: float | None = None
    output_grad_std: float | None = None
    not_called: list[str] = field(default_factory=list)
    rescale_grads: bool = False
    grad_norm_preclip: float | None = None  # global parameter-gradient norm before the user's clipping
    grad_norm_postclip: float | None = None  # ... and as the optimizer saw it
    amp_scale: float | None = None  # GradScaler's scale in effect for this step's backward
    histograms: list[Histogram] | None = None  # on histogram steps (this rank's own, never reduced)
    # the divergence signals' figures: accumulators (``accumulators``) by key, reduced across ranks with the step
    signals: Mapping[tuple, object] = field(default_factory=dict)


@dataclass
class StepSignals:
    """What the signals measured at one recorded step (plain floats)."""

    attention: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (max logit, entropy)
    logz: float | None = None  # mean log-sum-exp of the output logits
    softmax_output: bool = False  # the output's gradient sums to zero along its last dimension
    adam: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (gradient rms, eps)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) since the last recorded step


def histogram_window(step: int, every: int) -> int:
    """The histogram window of ``step``; the first recorded step of each window gets histograms. Windows are
    ``every`` steps long: steps 0, N, 2N... where they are recorded (a histogram step costs a few steps' time: the
    init's distributions, then one every N steps)."""
    return step // every
