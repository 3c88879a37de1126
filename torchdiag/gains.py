"""Pure init arithmetic: fans, the gain table, and the suggested fix for a layer.

Textbook target (He et al. 2015, fan_in mode): ``std(W) = gain / sqrt(fan_in)``, with
``gain`` from ``torch.nn.init.calculate_gain`` where it has an entry, and measured
(``1 / rms(f(z))`` for ``z ~ N(0, 1)``) for activations it does not know (GELU, SiLU, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

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


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, tuple(_TABLE_NAMES) + tuple(_MEASURED) + tuple(BOUNDED))


def saturation_range(module: nn.Module) -> tuple[float, float] | None:
    for cls, rng in BOUNDED.items():
        if isinstance(module, cls):
            return rng
    return None


@dataclass(frozen=True)
class Nonlinearity:
    """The activation that follows a layer: a ``calculate_gain`` name and its parameter."""

    name: str  # 'linear', 'relu', 'leaky_relu', 'tanh', 'gelu', ...
    param: float | None = None  # negative slope of leaky_relu

    def __str__(self) -> str:
        return self.name if self.param is None else f"{self.name}({self.param:g})"


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
        return float(nn.init.calculate_gain(nl.name))
    if nl.name == "leaky_relu":
        return float(nn.init.calculate_gain("leaky_relu", nl.param))
    return _measured_gain(nl.name)


_FUNCS = {
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


@lru_cache(maxsize=None)
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
    return f"torch.nn.init.normal_(m.weight, std={target_std(fan_in, nl):.4g})  # measured {nl.name} gain {gain(nl):.3f}"


def rescale_factor(fan_in: int, fan_out: int) -> float:
    """Gradient multiplier that undoes the fan_out/fan_in backward variance drift of a fan_in init."""
    return math.sqrt(fan_in / fan_out)
