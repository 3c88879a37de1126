"""The module taxonomy: which modules are watched, what role each plays, and its static layer facts.

One place for what the rest of the pipeline asks about a module: selection (``select_modules``), its role
(``Role``: a weighted layer is one with a >= 2-D parameter of its own), its main weight and fans
(``describe`` -> ``Slot``), and what ``fix_init`` rescales (``LSUV_TYPES``). The arithmetic on these
facts (gains, fans per module kind, the init table) is ``gains``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from . import gains
from .config import Config
from .vocab import Nonlinearity, Role

# What fix_init (LSUV) rescales: the textbook layers (Linear, Bilinear, Conv1d/2d/3d, ConvTranspose1d/2d/3d), a
# closed list and not watch's "has a >= 2-D parameter" rule on purpose: LSUV scales one weight until the
# layer's output std hits the target, which holds only where the output is that weight applied to the input.
# An Embedding's output is its weight (no input mixing: the suggestion already says so), RNN and attention
# weights act inside gates and softmax, and a custom layer's largest parameter need not set its output scale.
LSUV_TYPES = gains.WEIGHTED


def select_modules(model: nn.Module, config: Config) -> list[tuple[str, nn.Module]]:
    """Default: every leaf module and every module with parameters of its own; then globs and types."""
    chosen = []
    for name, m in model.named_modules():
        tname = type(m).__name__
        default = next(m.children(), None) is None or next(m.parameters(recurse=False), None) is not None
        if not (default or tname in config.include_types):
            continue
        if tname in config.exclude_types:
            continue
        if not any(fnmatch.fnmatchcase(name, g) for g in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in config.exclude):
            continue
        chosen.append((name, m))
    return chosen


@dataclass
class Slot:
    """One registered module (no reference to the module itself): its static facts from ``describe``, then what
    capture and the recorder learn as the watch runs (``feeds_norm``, ``count_zeros``, the shift policy,
    this step's ``calls``, ``disabled`` after a failure)."""

    name: str
    module_type: str
    role: str  # a ``Role`` value
    is_layer: bool  # reported as a layer (the root may be registered only for its input/output)
    is_root: bool = False
    saturation: tuple[float, float] | None = None  # (centre, half width) of the saturation test
    relu_family: bool = False
    nonlinearity: Nonlinearity | None = None
    weight_name: str | None = None
    weight_shape: tuple[int, ...] | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    fans_note: str | None = None  # why the fans are unknown
    textbook: bool = True  # a Linear/Conv-like layer the fan_in rule applies to
    feeds_norm: bool = False  # its output was seen going straight into a normalisation layer
    pure: bool = False  # a torch built-in whose output is exactly what its role says (no hidden activation)
    count_zeros: bool = False  # count zeros of its output (ReLU family, or a layer whose output feeds a probe)
    shift_act: bool = True  # take moments about a shift (first recorded step, or |mean| >> std last time)
    shift_grad: bool = True
    shift_weight: bool = True
    calls: int = 0
    disabled: bool = False

    @property
    def kind(self) -> str:
        """The role under its former name, for ``capture`` and ``stepbuffer`` until they read ``role``."""
        return self.role


def role(module: nn.Module) -> str:
    """The ``Role`` of a module: norm, activation, passthrough, weighted (a >= 2-D parameter of its own), other."""
    if gains.is_norm(module):
        return Role.NORM
    if gains.is_activation(module):
        return Role.ACTIVATION
    if isinstance(module, gains.PASS_THROUGH):
        return Role.PASSTHROUGH
    if main_weight(module) is not None:
        return Role.WEIGHTED
    return Role.OTHER


def describe(name: str, module: nn.Module, *, is_layer: bool, is_root: bool, saturation_level: float) -> Slot:
    """The static facts of one watched module: its role, weight, fans, nonlinearity, saturation test."""
    its_role = role(module)
    relu = isinstance(module, gains.RELU_FAMILY)
    builtin = type(module).__module__.startswith("torch.")
    slot = Slot(name=name, module_type=type(module).__name__, role=its_role, is_layer=is_layer, is_root=is_root,
                relu_family=relu, count_zeros=relu, nonlinearity=gains.nonlinearity_of(module),
                pure=builtin and its_role in (Role.WEIGHTED, Role.NORM, Role.ACTIVATION))
    rng = gains.saturation_range(module)
    if rng is not None:
        slot.saturation = (rng[0], rng[1] * saturation_level)
    lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False))
    w = None if lazy else main_weight(module) or norm_weight(module)
    if w is not None:
        slot.weight_name, p = w
        slot.weight_shape = tuple(p.shape)
    if its_role == Role.WEIGHTED:  # fans per module type, as torch.nn.init computes them; never guessed
        fans, slot.fans_note = gains.fans_or_reason(module)
        f = (fans or {}).get(slot.weight_name) if slot.weight_name else None
        if f is not None:
            slot.fan_in, slot.fan_out = f
        slot.textbook = not isinstance(module, gains.NO_TEXTBOOK)
    return slot


def main_weight(module: nn.Module) -> tuple[str, torch.Tensor] | None:
    """``(name, parameter)`` of a non-norm module's main weight: ``weight`` if it is >= 2-D, else its largest
    >= 2-D parameter of its own; None if it has none (then it is not a weighted layer)."""
    if gains.is_norm(module):
        return None
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and not isinstance(w, nn.parameter.UninitializedParameter) and w.dim() >= 2:
        return "weight", w
    own = [(n, p) for n, p in module.named_parameters(recurse=False)
           if not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() >= 2]
    return max(own, key=lambda t: t[1].numel()) if own else None


def norm_weight(module: nn.Module) -> tuple[str, torch.Tensor] | None:
    """A normalisation layer's affine ``weight``, if it has one."""
    w = getattr(module, "weight", None)
    return ("weight", w) if isinstance(w, torch.Tensor) and w.dim() >= 1 else None
