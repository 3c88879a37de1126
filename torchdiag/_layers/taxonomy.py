"""The module taxonomy: which modules are watched, what role each plays, and its static layer facts.

One place for what the rest of the pipeline asks about a module: selection (``select_modules``), its role
(``Role``: a weighted layer is one with a >= 2-D parameter of its own), its main weight and fans
(``describe`` -> ``Slot``), and what ``fix_init`` rescales (``LSUV_TYPES``). The arithmetic on these
facts (gains, fans per module type, the init table) is ``gains``.

The same questions of torch functions (``NORM_FUNCTIONS``, ``SAME_SIGNAL_FUNCTIONS``, ``ConsumerTracer``) serve
``fix_init``, which traces what consumes a layer's output through every torch call of a no-grad forward;
a watch traces it between watched modules (``capture``), and both ask ``gains.uses_input_statistics``
whether a normalisation undoes the scale it gets.
"""

from __future__ import annotations

import fnmatch
import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .._vocab import Nonlinearity, Role
from ..config import Config
from ..errors import TorchDiagError
from . import gains

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


def select_watched(model: nn.Module, config: Config) -> list[tuple[str, nn.Module]]:
    """``select_modules``, which must select something: else a ``TorchDiagError`` naming the config keys."""
    chosen = select_modules(model, config)
    if not chosen:
        raise TorchDiagError(
            f"no module of {type(model).__name__} was selected for watching: check the config keys "
            f"'include' {list(config.include)}, 'exclude' {list(config.exclude)}, 'exclude_types' "
            f"{list(config.exclude_types)}"
        )
    return chosen


def hookable(model: nn.Module, selected: list[tuple[str, nn.Module]]
             ) -> tuple[list[tuple[str, nn.Module]], str | None]:
    """The selected modules whose forward can be hooked, and why the others cannot be recorded (None: all can).

    Left out: TorchScript modules (``torch.jit.script`` / ``trace``) and everything inside them, which run where no
    module hook runs; in a ``torch.export`` program's module (``ExportedProgram.module()``, a ``GraphModule``),
    torch.export's own non-layer submodules (``_guards_fn``) and the submodules its graph never calls: it inlined
    them, and their weights feed its operators directly."""
    script = [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    script = [n for n in script if not any(_under(n, o) for o in script if o != n)]  # the outermost ones
    if "" in script:
        what = getattr(model, "original_name", None) or type(model).__name__
        return [], (f"the model ({what}) is a TorchScript module ({type(model).__name__}, from torch.jit.script or"
                    " torch.jit.trace): its layers run inside TorchScript, where no module hook runs, so nothing of"
                    " it can be recorded. Watch the eager module and script it after the watch, or use"
                    " torch.compile(model), which torchdiag records")
    kept = [(n, m) for n, m in selected if not any(_under(n, o) for o in script)]
    notes = []
    if script:
        names = ", ".join(f"'{n}'" for n in script[:3]) + (f" and {len(script) - 3} more" if len(script) > 3 else "")
        many = len(script) > 1
        notes.append(f"the TorchScript submodule{'s' if many else ''} {names} of {type(model).__name__}"
                     f" run{'' if many else 's'} inside TorchScript, where no module hook runs:"
                     f" {'their' if many else 'its'} layers are not recorded. Watch the eager modules and script"
                     " them after the watch, or use torch.compile(model)")
    if isinstance(model, torch.fx.GraphModule):
        called = {str(n.target) for n in model.graph.nodes if n.op == "call_module"}
        internal = {n for n, m in model.named_modules() if type(m).__module__.startswith("torch.export")}
        inlined = [n for n, _ in kept if n and n not in internal and not any(_under(n, c) for c in called)]
        kept = [(n, m) for n, m in kept if not n or not (n in internal or n in inlined)]
        if inlined:
            names = ", ".join(f"'{n}'" for n in inlined[:3]) + (f" and {len(inlined) - 3} more"
                                                                 if len(inlined) > 3 else "")
            many = len(inlined) > 1
            notes.append(f"the layer{'s' if many else ''} {names} of this GraphModule (from torch.export or torch.fx)"
                         f" {'are' if many else 'is'} never called as modules: its graph's operators read their"
                         " weights directly, so no hook sees them and they are not recorded. Watch the eager model"
                         " before torch.export, or torch.export.unflatten(ep), whose submodules are called")
    return kept, "; ".join(notes) or None


def _under(name: str, outer: str) -> bool:
    """Whether the module named ``name`` is ``outer`` or inside it."""
    return outer == "" or name == outer or name.startswith(outer + ".")


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


def describe_watched(model: nn.Module, selected: list[tuple[str, nn.Module]], saturation_level: float
                     ) -> tuple[list[nn.Module], list[Slot]]:
    """The modules a watch registers and their slots: the selected ones (``select_modules``), then the model itself
    if no slot is its own (registered for its input and output alone)."""
    modules = [m for _, m in selected]
    slots = [describe(n, m, is_layer=True, is_root=m is model, saturation_level=saturation_level)
             for n, m in selected]
    if not any(m is model for m in modules):
        modules.append(model)
        slots.append(describe("", model, is_layer=False, is_root=True, saturation_level=saturation_level))
    return modules, slots


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


# ----------------------------------------------------------------------------- what consumes a tensor (functional)
NORM_FUNCTIONS = {F.layer_norm: "layer_norm", F.group_norm: "group_norm", F.batch_norm: "batch_norm",
                  F.instance_norm: "instance_norm"}
if hasattr(F, "rms_norm"):
    NORM_FUNCTIONS[F.rms_norm] = "rms_norm"
# ops whose output is the same signal at the same scale (reshaped, or dropout's unbiased mask)
SAME_SIGNAL_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.reshape, torch.reshape,
    torch.Tensor.contiguous, torch.Tensor.permute, torch.permute, torch.Tensor.transpose,
    torch.transpose, torch.Tensor.unsqueeze, torch.Tensor.squeeze}


def function_normalises(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a normalisation call uses the statistics of the tensor it gets (so it undoes any scale): the rule
    of ``gains.normalises`` for a module, asked of the call (``F.batch_norm``...) it makes."""
    name = NORM_FUNCTIONS[func]
    if name not in ("batch_norm", "instance_norm"):
        return True
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except TypeError:
        return False
    bound.apply_defaults()
    a = bound.arguments
    if name == "batch_norm":
        return gains.uses_input_statistics(bool(a["training"]), a["running_mean"] is not None)
    return bool(a["use_input_stats"])  # what InstanceNorm passes: uses_input_statistics(training, tracked)


class ConsumerTracer(TorchFunctionMode):
    """Sees every torch call of a forward: what consumes each marked tensor. A normalisation that undoes scale
    (``function_normalises``) adds ``"norm"`` to the tensor's set, any other use ``"other"``; a same-signal op
    (dropout, reshapes) marks its output with the same set. Metadata calls (size, dtype, item) are no use."""

    def __init__(self) -> None:
        super().__init__()
        self._marked: dict[int, tuple[weakref.ref, set[str]]] = {}

    def mark(self, t: object, consumers: set[str]) -> None:
        if isinstance(t, torch.Tensor):
            self._marked[id(t)] = (weakref.ref(t), consumers)

    def __torch_function__(self, func: Callable, types: Sequence[type], args: tuple = (),
                           kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensorish = isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and any(
            isinstance(o, torch.Tensor) for o in out))
        if out is not None and not tensorish:
            return out  # metadata (size, dim, dtype, item...): not a use of the signal
        for pos, a in enumerate(list(args) + list(kwargs.values())):
            entry = self._marked.get(id(a)) if isinstance(a, torch.Tensor) else None
            if entry is None or entry[0]() is not a:
                continue
            consumers = entry[1]
            if func in SAME_SIGNAL_FUNCTIONS:
                self.mark(out, consumers)
            elif func in NORM_FUNCTIONS and pos == 0 and function_normalises(func, args, kwargs):
                consumers.add("norm")
            else:
                consumers.add("other")
        return out
