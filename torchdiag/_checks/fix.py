"""Applying fixes to a model in place (the only module here that changes user weights)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._capture import capture
from .._layers import taxonomy
from .._origin.preserve import preserved_state
from .._reduce.accumulators import MomentAccumulator
from .._report.report import Report
from ..errors import TorchDiagError
from .checking import check


def apply_suggestions(model: nn.Module, report: Report, *, only_flagged: bool = True) -> dict[str, float]:
    """Multiply weights by their ``suggested_scale`` from ``report``, in place, where that fixes a problem.

    By default only the layers the report flags with a problem that re-initialising fixes (drift or saturation
    of a chain whose weights are off the textbook scale): a healthy model is left as it is, and so is a layer
    whose finding says init cannot fix it (a sigmoid stack, depth that compounds through residual sums). No
    factor that is not a finite positive number is ever applied. A weight shared by several layers (tied
    embeddings) is scaled once, by the factor of the first of them in execution order.

    Args:
        model: the model the report was made from.
        report: a ``Report`` from ``check`` or ``Watcher.report``.
        only_flagged: False: every layer with a suggestion, flagged or not (the textbook init for all of them).

    Returns:
        ``{layer name: factor applied}``.

    Example:
        >>> import torch, torchdiag
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> torchdiag.apply_suggestions(net, torchdiag.check(net, torch.randn(4, 8)))  # healthy: nothing to do
        {}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_suggestions(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(report, Report):
        raise TypeError("apply_suggestions(report=...): expected a torchdiag.Report (from torchdiag.check or"
                        f" Watcher.report()), got {type(report).__name__}")
    _check_bool("apply_suggestions", "only_flagged", only_flagged)
    modules = dict(model.named_modules())
    if report.layers and not any(layer.name in modules for layer in report.layers):
        shown = ", ".join(repr(layer.name) for layer in report.layers[:3])
        raise ValueError(f"apply_suggestions(report=...): none of the report's layers ({shown}"
                         f"{', ...' if len(report.layers) > 3 else ''}) are in this model ({type(model).__name__}):"
                         " pass the report made from this model")
    applied: dict[str, float] = {}
    scaled: set[int] = set()  # weights already scaled (tied: one tensor, several layers)
    with torch.no_grad():
        for layer in report.layers:
            scale = layer.suggested_scale
            if scale is None or not (math.isfinite(scale) and scale > 0):
                continue
            if only_flagged and not layer.init_fixes:
                continue
            m = modules.get(layer.name)
            w = getattr(m, "weight", None) if m is not None else None
            if isinstance(w, torch.Tensor) and id(w) not in scaled:
                scaled.add(id(w))
                w.mul_(scale)
                applied[layer.name] = scale
    return applied


def _check_bool(function: str, arg: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{function}({arg}=...): expected a bool, got {type(value).__name__} ({value!r})")


# ----------------------------------------------------------------------------- fix_init (LSUV)
LSUV_TYPES = taxonomy.LSUV_TYPES  # Linear, Bilinear, Conv1d/2d/3d, ConvTranspose1d/2d/3d (why: taxonomy)


def fix_init(model: nn.Module, *inputs: object, target_std: float = 1.0, tol: float = 0.1, max_iter: int = 10,
             zero_bias: bool = False) -> Report:
    """Rescale weights in place, layer by layer, until each layer's output std on ``inputs`` is ``target_std``.

    Layer-sequential unit-variance init (LSUV, Mishkin & Matas 2016) on your own sample batch: for each
    ``Linear`` / ``Bilinear`` / ``Conv`` / ``ConvTranspose`` layer, in the order the forward runs them, run
    the model under ``torch.no_grad()`` up to that layer, measure the std of its output (over every
    element, every call of it merged), multiply its weight by ``target_std / std``, and repeat until
    ``|std - target_std| < tol * target_std`` or ``max_iter`` rescales. Earlier layers are fixed first,
    so each later layer is measured on the signal it will really get. Unlike ``apply_suggestions``, which
    applies the textbook gain for the activation that follows, this measures: it works for any
    activation, residual sums, pooling, attention and inputs that are not unit-variance.

    Left as they were (and said so in ``Report.notes``): layers with all-zero weights (zero-init on
    purpose), frozen weights (``requires_grad=False``), weights that are not a plain parameter of the
    layer (parametrizations, weight norm), a weight already rescaled through another layer that shares
    it, and layers whose output goes only into normalisation layers that normalise with the statistics
    of the batch they see (``LayerNorm``, ``GroupNorm``, ``RMSNorm``; ``BatchNorm``/``InstanceNorm`` in
    training mode or without running statistics): those undo any scale, so a rescale would only change
    the layer's effective learning rate. An eval-mode ``BatchNorm`` applies its running statistics, a
    fixed affine map, so the layer before it is rescaled.

    The model runs in the train/eval mode you left it in; buffers (BatchNorm running statistics), the
    train/eval mode of every module and the RNG state are as they were afterwards; no hook is left.
    Biases are kept, or zeroed first with ``zero_bias=True`` (on the layers it rescales).

    Args:
        model: any ``nn.Module``.
        *inputs: a sample batch, as ``model(*inputs)`` takes it (a few hundred samples is plenty).
        target_std: the output std to reach at every rescaled layer.
        tol: the relative tolerance of that std.
        max_iter: the most rescales per layer.
        zero_bias: zero the biases of the layers it rescales before measuring.

    Returns:
        ``torchdiag.check(model, *inputs)`` after the fix, with a summary of what was done in ``notes``.

    Raises:
        TorchDiagError: the model raised on ``inputs``; the message names the model and the input shapes.

    Example:
        >>> import torch, torchdiag
        >>> net = torch.nn.Sequential(*[m for _ in range(20) for m in (torch.nn.Linear(64, 64), torch.nn.Tanh())])
        >>> report = torchdiag.fix_init(net, torch.randn(256, 64))
        >>> round(report["18"].act_std, 1)
        1.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fix_init(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    if not inputs:
        raise TypeError("fix_init(model, *inputs): give a sample batch for the model's forward")
    for arg, value in (("target_std", target_std), ("tol", tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"fix_init({arg}=...): expected a finite number > 0, got {value!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"fix_init(max_iter=...): expected an integer >= 1, got {max_iter!r}")
    _check_bool("fix_init", "zero_bias", zero_bias)

    if capture.is_watched(model):
        raise TorchDiagError(f"fix_init(): {type(model).__name__} is being watched; call fix_init before entering"
                             " `with torchdiag.watch(...)` (or after leaving it)")

    with preserved_state(model), torch.no_grad():
        layers = _discover(model, inputs)
        notes = _lsuv(model, inputs, layers, float(target_std), float(tol), max_iter, zero_bias)
    report = check(model, *inputs)
    report.notes.extend(notes)
    return report


class _Stop(Exception):
    """Raised from the measuring hook once the layer's last call is seen: the rest of the forward is not needed."""


@dataclass
class _Layer:
    name: str
    module: nn.Module
    calls: int = 0
    consumers: set[str] = field(default_factory=set)  # 'norm' / 'other': what the forward did with its output


def _input_text(inputs: tuple) -> str:
    parts = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            parts.append(f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}")
        else:
            parts.append(type(x).__name__)
    return ", ".join(parts)


def _run(model: nn.Module, inputs: tuple, done: Callable[[], bool] = lambda: False) -> None:
    try:
        model(*inputs)
    except _Stop:
        pass
    except Exception as e:
        if done():  # the measurement is complete: what the rest of the forward does is not our business
            return
        raise TorchDiagError(
            f"fix_init(): the sample batch cannot run through {type(model).__name__}: it raised"
            f" {type(e).__name__}: {e} (inputs: {_input_text(inputs)})") from e


def _discover(model: nn.Module, inputs: tuple) -> list[_Layer]:
    """One traced forward: the weighted layers in execution order, their call counts and what uses their output."""
    names = {m: n for n, m in model.named_modules()}
    found: dict[nn.Module, _Layer] = {}
    tracer = taxonomy.ConsumerTracer()

    def post(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, LSUV_TYPES) and module in names:
            layer = found.setdefault(module, _Layer(names[module], module))
            layer.calls += 1
            tracer.mark(output, layer.consumers)

    handle = nn.modules.module.register_module_forward_hook(post)
    try:
        with tracer:
            _run(model, inputs)
    finally:
        handle.remove()
    return list(found.values())


class _Meter:
    """Output std of one layer over its calls in one forward (float64, Chan's merge of ``MomentAccumulator``), and
    the std of the part of it that its weight makes (the output less its bias): what a rescale of the weight moves."""

    def __init__(self, calls: int) -> None:
        self.calls, self.seen = calls, 0
        self.moments = MomentAccumulator()
        self.weighted = MomentAccumulator()
        self.nonfinite = False

    def done(self) -> bool:
        return self.seen >= self.calls

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        t = output if isinstance(output, torch.Tensor) else next(capture.iter_float_tensors(output), None)
        if t is not None and t.is_floating_point() and t.numel():
            x = t.detach().to(torch.float64)
            if not bool(torch.isfinite(x).all()):
                self.nonfinite = True
            var, mean = torch.var_mean(x, correction=0)
            self.moments.merge(x.numel(), float(mean), float(var) * x.numel())
            w = x - _bias_part(module, x) if t is output else x
            var, mean = torch.var_mean(w, correction=0)
            self.weighted.merge(w.numel(), float(mean), float(var) * w.numel())
        self.seen += 1
        if self.done():
            raise _Stop

    @property
    def std(self) -> float:
        return self.moments.std

    @property
    def weighted_std(self) -> float:
        return self.weighted.std


def _bias_part(module: nn.Module, out: torch.Tensor) -> torch.Tensor | float:
    """The layer's bias as it is added to its output (0 without one): its channel dimension is the last for
    ``Linear``/``Bilinear``, the first after the batch for convolutions (the first of an unbatched input)."""
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.numel() == 0:
        return 0.0
    b = bias.detach().to(torch.float64)
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return b if out.shape[-1:] == b.shape else 0.0
    weight = getattr(module, "weight", None)
    spatial = weight.dim() - 2 if isinstance(weight, torch.Tensor) else out.dim() - 2
    channel = out.dim() - spatial - 1
    if channel < 0 or out.shape[channel] != b.numel():
        return 0.0
    return b.view(-1, *([1] * spatial))


def _measure(model: nn.Module, inputs: tuple, layer: _Layer) -> _Meter:
    meter = _Meter(layer.calls)
    handle = layer.module.register_forward_hook(meter)
    try:
        _run(model, inputs, meter.done)
    finally:
        handle.remove()
    return meter


def _skip_reason(layer: _Layer, weight: object, done: dict[int, str]) -> str | None:
    """Why ``layer`` is left as it is (a phrase that fits 'left X unchanged: ...'), or None."""
    own = dict(layer.module.named_parameters(recurse=False))
    if not isinstance(weight, nn.Parameter) or own.get("weight") is not weight:
        return "the weight is not a plain parameter of the layer (parametrization or weight norm)"
    if not weight.requires_grad:
        return "frozen weights (requires_grad=False)"
    if id(weight) in done:
        return f"the weight is shared with '{done[id(weight)]}', already rescaled"
    if weight.numel() == 0 or not bool((weight != 0).any()):
        return "all-zero weights (zero init on purpose: nothing to rescale)"
    if layer.consumers == {"norm"}:
        return "the output goes only into a normalisation layer that uses batch statistics, which undoes any scale"
    return None


_NO_SIGNAL = 1e-6  # the weight's part of a layer's output std, relative to the target, below which it is ~0


def _lsuv(model: nn.Module, inputs: tuple, layers: list[_Layer], target: float, tol: float, max_iter: int,
          zero_bias: bool) -> list[str]:
    if not layers:
        return ["fix_init: no Linear, Conv or ConvTranspose layer ran on the sample batch: nothing was rescaled"]
    notes: list[str] = []
    done: dict[int, str] = {}
    skipped: dict[str, list[str]] = {}
    factors: list[float] = []
    degenerate: list[str] = []
    iterations = 0
    for layer in layers:
        weight = getattr(layer.module, "weight", None)
        reason = _skip_reason(layer, weight, done)
        if reason is not None:
            skipped.setdefault(reason, []).append(layer.name)
            continue
        assert isinstance(weight, nn.Parameter)  # _skip_reason gives a reason for any other weight
        done[id(weight)] = layer.name
        bias = getattr(layer.module, "bias", None)
        if zero_bias and isinstance(bias, torch.Tensor):
            bias.zero_()
        total, flat = 1.0, False
        for it in range(max_iter + 1):
            meter = _measure(model, inputs, layer)
            std = meter.std
            if it == 0 and not meter.nonfinite and math.isfinite(std) and not meter.weighted_std > _NO_SIGNAL * target:
                # the weight's part of the output is ~0 (an all-zero batch, a dead ReLU before it): what std the
                # output has is its bias's, which no scale of the weight moves
                degenerate.append(f"'{layer.name}' (std {meter.weighted_std:.3g} less its bias)")
                flat = True
                break
            if meter.nonfinite or not math.isfinite(std) or std == 0.0:
                what = "holds NaN/Inf" if meter.nonfinite or not math.isfinite(std) else "is constant (std 0)"
                done_so_far = "unchanged" if it == 0 else f"after {it} rescale(s)"
                notes.append(f"fix_init: stopped at '{layer.name}' {done_so_far}: its output {what} on the sample"
                             " batch")
                break
            if abs(std - target) < tol * target:
                break
            if it == max_iter:
                notes.append(f"fix_init: '{layer.name}' output std is {std:.3g} after {max_iter} rescales (target"
                             f" {target:g} ± {tol:.0%}): its bias or its input sets the scale more than its weight")
                break
            factor = target / std
            weight.mul_(factor)
            total *= factor
            iterations += 1
        if not flat:
            factors.append(total)
    if factors:
        notes.insert(0, f"fix_init: rescaled {len(factors)} layer(s) to output std {target:g} ± {tol:.0%} on the"
                        f" sample batch (LSUV, {iterations} rescale(s)); factors {min(factors):.3g} .."
                        f" {max(factors):.3g}")
    if degenerate:
        shown = ", ".join(degenerate[:8]) + (f" and {len(degenerate) - 8} more" if len(degenerate) > 8 else "")
        notes.append(f"fix_init: left {shown} unchanged: its output std on the sample batch is ~0 where the weight"
                     " acts (an all-zero batch, or a dead ReLU before it), which no scaling can fix; give a batch of"
                     " real inputs")
    for reason, names in skipped.items():
        shown = ", ".join(f"'{n}'" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        notes.append(f"fix_init: left {shown} unchanged: {reason}")
    return notes
