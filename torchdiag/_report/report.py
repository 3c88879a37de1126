"""Report and LayerReport: what the diagnosis found, as data, a flat dict of scalars and a dict; the table is
``render`` (re-exported here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .render import common_prefix, elide_name, fit_widths, render, run_lines, suggestion_text, use_color
from .tags import STEP_TAGS, layer_tag

if TYPE_CHECKING:
    from .._diagnose._drift import Baseline
    from .._diagnose.instability import Forecast, LossSpike
    from .._diagnose.verdict import RunFinding
    from .._origin._originrecord import NonfiniteOrigin

__all__ = ["SCALAR_FIELDS", "STATUSES", "Finding", "LayerReport", "Report", "common_prefix", "elide_name", "fit_widths",
           "render", "run_lines", "suggestion_text", "use_color"]

STATUSES = ("exploding", "vanishing", "nonfinite", "dead", "saturated", "large_updates", "small_updates",
            "attention_logits", "attention_entropy", "output_logits", "adam_epsilon", "overflow_risk", "underflow")


@dataclass
class Finding:
    """One problem on one layer: which, in which direction, the figure and the threshold."""

    problem: str  # one of STATUSES
    direction: str | None  # 'forward' / 'backward' for drift, None otherwise
    value: float  # the measured figure
    threshold: float  # the configured threshold it crossed
    key: str  # the config key of that threshold
    message: str  # the full sentence, with the fix
    cause: str | None = None  # drift: the weighted layer whose weights to change (this layer or the one feeding it)
    covers: int = 1  # drift: how many layers of the same chain this finding stands for
    fixable: bool | None = None  # drift: whether re-initialising the weights fixes it (None: not known)
    reason: str | None = None  # the cause, one of REASONS (None: not known)


#: what a finding is blamed on, each with its kind of fix: the weights as drawn (rescale or re-initialise), the
#: architecture (no init fixes it), the training (learning rate, warm-up, clipping, Adam's eps: never a weight
#: rescale), a half-precision dtype's range (a GradScaler, bf16, a layer kept in float32)
REASONS = ("init", "architecture", "optimisation", "data", "precision")


@dataclass
class LayerReport:
    """Diagnosis of one watched module at one recorded step. Unmeasurable values are None."""

    name: str
    module_type: str
    index: int
    calls: int
    act_mean: float | None = None
    act_std: float | None = None
    act_rms: float | None = None
    act_absmax: float | None = None
    zero_fraction: float | None = None
    saturated_fraction: float | None = None
    grad_mean: float | None = None
    grad_std: float | None = None
    grad_norm: float | None = None
    weight_std: float | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    gain: float | None = None
    update_ratio: float | None = None
    forward_ratio: float | None = None
    backward_ratio: float | None = None
    nonlinearity: str | None = None
    suggested_scale: float | None = None
    measured_scale: float | None = None  # textbook gain / measured gain on the actual inputs (LSUV reasoning)
    suggested_init: str | None = None
    attention_logit_max: float | None = None  # attention layers: the largest q.k/sqrt(d) on the sampled queries
    attention_entropy: float | None = None  # ... their heads' mean entropy over the uniform one (1 uniform, 0 one-hot)
    output_logz: float | None = None  # the layer making the output logits: their mean log-sum-exp
    adam_grad_rms: float | None = None  # with an Adam optimizer: the weight gradient's rms as the optimizer sees it
    # a half-precision layer (or check(precision=)) against its format's range: bits of growth left before the first
    # Inf, log2(format max / absmax), and the share of the non-zero values below the smallest normal
    precision: str | None = None  # the format: 'float16', 'float8_e4m3fn'...
    act_headroom: float | None = None
    grad_headroom: float | None = None  # of the gradient as the backward computed it (scaled, under a GradScaler)
    act_underflow: float | None = None
    grad_underflow: float | None = None
    status: set[str] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No flag on this layer at this step."""
        return not self.status

    @property
    def init_fixes(self) -> bool:
        """Flagged with a drift or saturation that multiplying its weights by ``suggested_scale`` fixes."""
        return self.suggested_scale is not None and any(
            f.problem in ("vanishing", "exploding", "saturated") and f.fixable is not False and f.key != "norm_weight"
            and f.reason in (None, "init") for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python values (JSON-ready): ``status`` a sorted list, findings as dicts."""
        d = dataclasses.asdict(self)
        d["status"] = sorted(self.status)
        return d



#: the measured float fields of a ``LayerReport``: what ``Report.scalars`` gives per layer
SCALAR_FIELDS = tuple(f.name for f in dataclasses.fields(LayerReport) if f.type == "float | None")


@dataclass
class Report:
    """Per-layer diagnosis of one recorded step.

    Attributes:
        layers: ``LayerReport`` rows in execution order.
        step: the watcher's step number the statistics come from.
        first_nonfinite: name of the first layer (execution order) whose output held NaN/Inf.
        notes: model-level remarks (modules never called, grads that could not be measured...).
    """

    layers: list[LayerReport]
    step: int = 0
    first_nonfinite: str | None = None
    notes: list[str] = field(default_factory=list)
    rescale_grads: bool = False
    amp_scale: float | None = None
    amp_skipped_steps: int | None = None  # steps GradScaler skipped so far in this watch (scale decreases)
    grad_norm_preclip: float | None = None
    grad_norm_postclip: float | None = None
    clipped: bool | None = None
    first_nonfinite_grad: str | None = None  # finite forward, NaN/Inf gradient: the first layer it reached
    run_findings: list[RunFinding] = field(default_factory=list)  # the run's findings so far
    new_findings: list[RunFinding] = field(default_factory=list, repr=False)  # those that became findings at this step
    nonfinite_origin: NonfiniteOrigin | None = None  # where the run's first NaN/Inf was produced, once found
    loss_spikes: list[LossSpike] = field(default_factory=list)  # spikes found at this step
    forecasts: list[Forecast] = field(default_factory=list)  # trends warned at this step
    drift_seen: Baseline | None = field(default=None, repr=False)  # the chains' drift at this step
    trained: bool = False  # a step was recorded before this one: what appears now is the training's doing
    output_grad_std: float | None = None  # std of the gradient at the model's output (the loss's pull)
    cadence: str | None = None  # which steps the watch records, and why (the time budget, every=N)
    record_interval: int | None = None  # one step in this many is recorded (the time budget's cadence, or every=N)

    @property
    def flagged(self) -> list[LayerReport]:
        """Layers with at least one problem, in execution order."""
        return [layer for layer in self.layers if layer.status]

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in this report; layers are {[x.name for x in self.layers]}")

    def scalars(self) -> dict[str, float]:
        """The step's numbers as one flat dict, for any logger (``wandb.log``, Lightning's ``log_dict``...).

        Keys are ``"<layer>/<field>"`` for every measured float field of every layer (``act_std``, ``grad_norm``,
        ``gain``, ``update_ratio``, ``suggested_scale``...; the root module's layer is ``"(root)"``; a value that
        was not measured is left out), then the step's own figures without a layer: ``flagged_layers`` and,
        where measured, ``grad_norm_preclip``, ``grad_norm_postclip``, ``clipped`` (0 or 1), ``amp_scale``,
        ``amp_skipped_steps``: the numbers TensorBoard gets.

        Example:
            >>> import torch, torchdiag
            >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
            >>> scalars = torchdiag.check(net, torch.randn(8, 16)).scalars()
            >>> sorted(k for k in scalars if k.startswith("1/"))[:3]
            ['1/act_absmax', '1/act_mean', '1/act_rms']
        """
        out: dict[str, float] = {}
        for layer in self.layers:
            name = layer_tag(layer.name)
            for attr in SCALAR_FIELDS:
                v = getattr(layer, attr)
                if v is not None:
                    out[f"{name}/{attr}"] = float(v)
        out["flagged_layers"] = float(len(self.flagged))
        for attr in STEP_TAGS.values():
            v = getattr(self, attr)
            if v is not None:
                out[attr] = float(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values (JSON-ready): the step's figures and every layer's ``to_dict``."""
        return {
            "step": self.step,
            "first_nonfinite": self.first_nonfinite,
            "first_nonfinite_grad": self.first_nonfinite_grad,
            "run_findings": [dataclasses.asdict(f) for f in self.run_findings],
            "rescale_grads": self.rescale_grads,
            "amp_scale": self.amp_scale,
            "amp_skipped_steps": self.amp_skipped_steps,
            "grad_norm_preclip": self.grad_norm_preclip,
            "grad_norm_postclip": self.grad_norm_postclip,
            "clipped": self.clipped,
            "nonfinite_origin": None if self.nonfinite_origin is None else self.nonfinite_origin.as_dict(),
            "loss_spikes": [dataclasses.asdict(x) for x in self.loss_spikes],
            "forecasts": [dataclasses.asdict(x) for x in self.forecasts],
            "notes": list(self.notes),
            "cadence": self.cadence,
            "record_interval": self.record_interval,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def __str__(self) -> str:
        return render(self, color=False)
