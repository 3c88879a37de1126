"""Pure init arithmetic: fans, the gain table, and the suggested fix for a layer.

Textbook target (He et al. 2015, fan_in mode): ``std(W) = gain / sqrt(fan_in)``, with
``gain`` from ``torch.nn.init.calculate_gain`` where it has an entry, and measured
(``1 / rms(f(z))`` for ``z ~ N(0, 1)``) for activations it does not know (GELU, SiLU, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import cache

import torch
from torch import nn

from .._vocab import Nonlinearity

# Activation classes -> the name calculate_gain knows (None: gain is measured instead).
_TABLE_NAMES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SELU: "selu",
}
_MEASURED: dict[type[nn.Module], str] = {
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.Softplus: "softplus",
    nn.Mish: "mish",
    nn.Hardtanh: "hardtanh",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.PReLU: "prelu",
}
RELU_FAMILY = (nn.ReLU, nn.ReLU6)
# (centre, half range) of bounded activations, for the saturation count.
BOUNDED: dict[type[nn.Module], tuple[float, float]] = {
    nn.Tanh: (0.0, 1.0),
    nn.Sigmoid: (0.5, 0.5),
    nn.Hardtanh: (0.0, 1.0),
    nn.Softsign: (0.0, 1.0),
}
NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten)
WEIGHTED = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
            nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# normalisation classes libraries write themselves (Hugging Face's LlamaRMSNorm, T5LayerNorm, Qwen2RMSNorm...,
# timm's LayerNorm2d): plain nn.Modules named for what they do, with at most a per-feature weight and bias
_NORM_NAME = re.compile(r"(RMS|Layer|Group|Instance|Batch|Scale)_?Norm(\d*d)?$", re.IGNORECASE)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: one of torch's, or a class named like one whose own parameters are at most 1-D
    (a per-feature scale and shift), as the ones libraries write are."""
    if isinstance(module, NORM_TYPES):
        return True
    if not _NORM_NAME.search(type(module).__name__):
        return False
    return all(p.dim() <= 1 for p in module.parameters(recurse=False)) and not any(True for _ in module.children())


def normalises(module: nn.Module) -> bool:
    """Whether a norm layer divides by statistics of its input now (an eval-mode BatchNorm is affine)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
        return uses_input_statistics(module.training, module.track_running_stats)
    return is_norm(module)


def uses_input_statistics(training: bool, running_stats: bool) -> bool:
    """A batch or instance normalisation divides by the statistics of the tensor it gets (and so undoes any scale)
    in training mode or without running statistics; else it applies its running ones, a fixed affine map."""
    return training or not running_stats


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, tuple(_TABLE_NAMES) + tuple(_MEASURED) + tuple(BOUNDED))


def saturation_range(module: nn.Module) -> tuple[float, float] | None:
    for cls, rng in BOUNDED.items():
        if isinstance(module, cls):
            return rng
    return None


LINEAR = Nonlinearity("linear")


def nonlinearity_of(module: nn.Module) -> Nonlinearity | None:
    """The ``Nonlinearity`` an activation module applies, or None if it is not one."""
    if isinstance(module, nn.LeakyReLU):
        return Nonlinearity("leaky_relu", float(module.negative_slope))
    for table in (_TABLE_NAMES, _MEASURED):
        for cls, name in table.items():
            if isinstance(module, cls):
                return Nonlinearity(name)
    if isinstance(module, tuple(BOUNDED)):
        return Nonlinearity(type(module).__name__.lower())
    return None


def gain(nl: Nonlinearity) -> float:
    """The std gain for ``nl``: ``calculate_gain``'s table, or measured on N(0, 1)."""
    if nl.name in ("linear", "relu", "tanh", "sigmoid", "selu"):
        return float(nn.init.calculate_gain(nl.name))  # type: ignore[arg-type]  # one of the names just above
    if nl.name == "leaky_relu":
        return float(nn.init.calculate_gain("leaky_relu", nl.param))
    return _measured_gain(nl.name)


_FUNCS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "elu": torch.nn.functional.elu,
    "celu": torch.nn.functional.celu,
    "softplus": torch.nn.functional.softplus,
    "mish": torch.nn.functional.mish,
    "hardtanh": torch.nn.functional.hardtanh,
    "hardswish": torch.nn.functional.hardswish,
    "hardsigmoid": torch.nn.functional.hardsigmoid,
    "prelu": lambda z: torch.nn.functional.leaky_relu(z, 0.25),
    "softsign": torch.nn.functional.softsign,
}


@cache
def _measured_gain(name: str) -> float:
    # E[f(z)^2] for z ~ N(0, 1) by quadrature on a fine grid (deterministic, exact to ~1e-6).
    z = torch.linspace(-12.0, 12.0, 200_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    second = torch.trapezoid(_FUNCS[name](z) ** 2 * pdf, z).item()
    return 1.0 / math.sqrt(second)


def fans(weight: torch.Tensor) -> tuple[int, int] | None:
    """(fan_in, fan_out) exactly as ``torch.nn.init`` computes them, or None for < 2-D weights."""
    if weight.dim() < 2:
        return None
    fi, fo = nn.init._calculate_fan_in_and_fan_out(weight)
    return int(fi), int(fo)


def target_std(fan_in: int, nl: Nonlinearity) -> float:
    """He et al. (2015) fan_in target: gain / sqrt(fan_in)."""
    return gain(nl) / math.sqrt(fan_in)


def suggested_init(nl: Nonlinearity, fan_in: int) -> str:
    """A call a user can paste that gives the textbook std for ``nl``."""
    if nl.name in ("linear", "relu", "tanh", "sigmoid", "selu"):
        return f"torch.nn.init.kaiming_normal_(m.weight, nonlinearity='{nl.name}')"
    if nl.name == "leaky_relu":
        return f"torch.nn.init.kaiming_normal_(m.weight, a={nl.param:g}, nonlinearity='leaky_relu')"
    std = target_std(fan_in, nl)
    return f"torch.nn.init.normal_(m.weight, std={std:.4g})  # measured {nl.name} gain {gain(nl):.3f}"


def rescale_factor(fan_in: int, fan_out: int) -> float:
    """Gradient multiplier that undoes the fan_out/fan_in backward variance drift of a fan_in init."""
    return math.sqrt(fan_in / fan_out)


# ----------------------------------------------------------------------------- fans per module kind
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
EMBEDDING = (nn.Embedding, nn.EmbeddingBag)
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_CELL_GATES: dict[type[nn.Module], int] = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}
# Weighted modules the "gain / sqrt(fan_in)" rule does not describe: a lookup sums nothing, recurrent
# and attention weights are not followed by one pointwise nonlinearity. No suggested scale for them.
NO_TEXTBOOK = (nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)
FAN_TYPES = ("Linear, Bilinear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding(Bag), MultiheadAttention,"
             " RNN/LSTM/GRU(Cell)")


def layer_fans(module: nn.Module) -> dict[str, tuple[int, int]] | None:
    """``{parameter name: (fan_in, fan_out)}`` of a module's weights, or None where they are not known.

    Every figure is what ``torch.nn.init._calculate_fan_in_and_fan_out`` returns for the
    tensor (or the block of it) that plays one layer's role; torchdiag never guesses fans
    from the shape of a parameter of a module it does not know (``fans_reason`` says why
    it returned None).

    * ``Linear`` ``weight (out, in)``: ``(in, out)``.
    * ``Conv{1,2,3}d`` ``weight (out, in/groups, *k)``: ``(in/groups·∏k, out·∏k)``.
    * ``ConvTranspose{1,2,3}d`` ``weight (in, out/groups, *k)``: torch reads it like a conv weight,
      so ``fan_in = out/groups·∏k`` and ``fan_out = in·∏k`` (what ``kaiming_normal_`` and the
      module's own ``reset_parameters`` use).
    * ``Embedding`` / ``EmbeddingBag`` ``weight (num, dim)``: ``(dim, num)``. The module's own init is
      ``normal_(0, 1)``, which does not use fans: a lookup sums nothing.
    * ``MultiheadAttention``: ``in_proj_weight (3E, E)`` is three stacked ``(E, E)`` projections
      q, k, v, so its fans are those of one block, ``(E, E)`` (torch on the whole tensor would
      say ``(E, 3E)``, which is what the module's own ``xavier_uniform_`` uses); with
      ``kdim``/``vdim`` the separate ``q/k/v_proj_weight`` ``(E, E)``, ``(E, kdim)``, ``(E, vdim)``;
      ``out_proj.weight`` is a ``Linear`` weight ``(E, E)`` (the module calls it functionally).
    * ``RNN`` / ``LSTM`` / ``GRU`` (and their cells): ``weight_ih_l{k}`` is ``G`` stacked gate blocks
      ``(hidden, input)`` (G = 4, 3, 1), ``weight_hh_l{k}`` ``G`` blocks ``(hidden, hidden)`` (or
      ``(hidden, proj_size)``): the fans are those of one block, ``(input, hidden)`` and
      ``(hidden, hidden)``; ``weight_hr_l{k}`` ``(proj_size, hidden)`` is not gated: ``(hidden, proj_size)``.
      The modules' own init is ``U(-1/√hidden, 1/√hidden)`` for every weight.
    * ``Bilinear`` ``weight (out, in1, in2)``: torch treats a 3-D weight as ``(out, in, receptive
      field)``, so ``fan_in = in1·in2`` and ``fan_out = out·in2``. ``fan_in`` is the number of
      products ``x1_i·x2_j`` each output sums, so it is the right forward fan; the module's own
      ``reset_parameters`` uses ``U(-1/√in1, 1/√in1)`` instead.

    Example:
        >>> layer_fans(torch.nn.Conv2d(3, 8, 5))
        {'weight': (75, 200)}
        >>> layer_fans(torch.nn.LSTM(10, 20))
        {'weight_ih_l0': (10, 20), 'weight_hh_l0': (20, 20)}
    """
    return fans_or_reason(module)[0]


def fans_reason(module: nn.Module) -> str | None:
    """Why ``layer_fans(module)`` is None (None when the fans are known)."""
    return fans_or_reason(module)[1]


def fans_or_reason(module: nn.Module) -> tuple[dict[str, tuple[int, int]] | None, str | None]:
    """``(layer_fans(module), None)``, or ``(None, reason)``."""
    kind = type(module).__name__
    own = dict(module.named_parameters(recurse=False))
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in own.values()):
        return None, f"{kind} is a lazy module whose weights are not initialised yet: run one forward first"
    if is_norm(module):
        return None, f"{kind} is a normalisation layer: its weight is a per-feature scale, not a fan-in sum"
    if isinstance(module, (nn.Linear, nn.Bilinear) + CONV + CONV_TRANSPOSE + EMBEDDING):
        return _torch_fans(module, ["weight"], kind)
    if isinstance(module, nn.MultiheadAttention):
        names = (["in_proj_weight"] if module.in_proj_weight is not None
                 else ["q_proj_weight", "k_proj_weight", "v_proj_weight"])
        out, reason = _torch_fans(module, names, kind, blocks=3 if names == ["in_proj_weight"] else 1)
        if out is not None and isinstance(getattr(module.out_proj, "weight", None), torch.Tensor):
            out["out_proj.weight"] = _fan_pair(module.out_proj.weight)
        return out, reason
    if isinstance(module, nn.RNNBase):
        gates = _GATES.get(module.mode)
        if gates is None:
            return None, f"{kind} has the unknown RNN mode {module.mode!r}: its gate blocks are not known"
        found: dict[str, tuple[int, int]] = {}
        for name in module._flat_weights_names:
            if name.startswith(("weight_ih", "weight_hh")):
                part, _ = _torch_fans(module, [name], kind, blocks=gates)
            elif name.startswith("weight_hr"):
                part, _ = _torch_fans(module, [name], kind)
            else:
                continue
            if part is None:
                return None, f"{kind}.{name} is not a tensor with {gates} gate blocks of rows"
            found.update(part)
        return found, None
    for cls, gates in _CELL_GATES.items():
        if isinstance(module, cls):
            return _torch_fans(module, ["weight_ih", "weight_hh"], kind, blocks=gates)
    if not any(p.dim() >= 2 for p in own.values()):
        return None, f"{kind} has no weight of 2 or more dimensions of its own"
    return None, (f"{kind} is not a module kind whose weight layout torchdiag knows ({FAN_TYPES}), and fans are"
                  " never guessed from a parameter's shape")


def _fan_pair(t: torch.Tensor) -> tuple[int, int]:
    fi, fo = nn.init._calculate_fan_in_and_fan_out(t)
    return int(fi), int(fo)


def _torch_fans(module: nn.Module, names: list[str], kind: str,
                blocks: int = 1) -> tuple[dict[str, tuple[int, int]] | None, str | None]:
    out = {}
    for name in names:
        w = getattr(module, name, None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2:
            return None, f"{kind}.{name} is not a weight tensor of 2 or more dimensions"
        if blocks > 1:
            if w.shape[0] % blocks:
                return None, f"{kind}.{name} {tuple(w.shape)} does not split into {blocks} blocks of rows"
            w = w[: w.shape[0] // blocks]  # one block: a view, nothing is copied
        out[name] = _fan_pair(w)
        if 0 in out[name]:  # e.g. Linear(0, n): no textbook gain (gain / sqrt(0)), a note instead
            return None, (f"{kind}.{name} {tuple(w.shape)} has a zero fan (fan_in {out[name][0]}, fan_out"
                          f" {out[name][1]}): no textbook gain or scale")
    return out, None
