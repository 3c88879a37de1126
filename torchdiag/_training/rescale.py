"""``rescale_grads``: multiply each weighted layer's output gradient by a factor (the only hook that changes
training). The factors are computed when ``watch()`` is called (``factors``), so that a bad one is an error
of that call; one process-wide forward hook (``RescaleHook``) applies them."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Union

import torch
from torch import nn

from .._capture.runtime import iter_float_tensors
from .._layers import gains
from .._vocab import Role
from ..errors import TorchDiagError

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .._layers.taxonomy import Slot

RescaleSpec = Union[bool, float, Callable[[str, nn.Module], float]]


def check_spec(rescale_grads: object) -> None:
    """``watch(rescale_grads=...)``: False, True, a finite factor > 0 or a callable ``(name, module) -> float``."""
    if not (isinstance(rescale_grads, (bool, int, float)) or callable(rescale_grads)):
        raise TypeError("watch(rescale_grads=...): expected False, True, a float or a callable (name, module) -> float,"
                        f" got {type(rescale_grads).__name__}")
    if isinstance(rescale_grads, (int, float)) and not isinstance(rescale_grads, bool):
        if not (math.isfinite(rescale_grads) and rescale_grads > 0):
            raise ValueError(f"watch(rescale_grads=...): a factor must be a finite number > 0, got {rescale_grads!r}")


def factors(spec: RescaleSpec, selected: list[tuple[str, nn.Module]], slots: list[Slot]
            ) -> weakref.WeakKeyDictionary[nn.Module, float]:
    """The gradient factor of each weighted layer (``slots[i]`` describes ``selected[i]``); layers whose factor
    is 1 are left out. A callable that raises, or a factor that is not a finite number, is a ``TorchDiagError``."""
    out: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()
    if spec is False:
        return out
    for (name, m), info in zip(selected, slots):
        if info.role != Role.WEIGHTED:
            continue
        if spec is True:
            if info.fan_in is None or not info.fan_out:
                continue
            factor = gains.rescale_factor(info.fan_in, info.fan_out)
        elif callable(spec):
            try:
                factor = spec(name, m)
            except Exception as e:
                raise TorchDiagError(f"watch(rescale_grads=...): the callable raised {type(e).__name__} for layer"
                                     f" '{name}' ({type(m).__name__}): {e}") from e
        else:
            factor = float(spec)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise TorchDiagError(f"rescale_grads: the factor for layer '{name}' must be a finite number,"
                                 f" got {factor!r}")
        if factor != 1.0:
            out[m] = float(factor)
    return out


class RescaleHook:
    """Process-wide forward hook: ``grad * factor`` on the output gradients of the modules in a weak map.

    One global hook rather than one per module: a per-module hook would be copied by
    ``copy.deepcopy(model)`` (EMA models) into a module that no watcher ever unhooks. The forward
    is unchanged.

    A tensor hook on a tensor of this step's graph dies with the graph. A module that returns a tensor
    that outlives the step (a parameter through ``Identity`` or ``Dropout(0.0)``: a leaf) would get one
    more hook per step, compounding the factor and outliving the watch: such tensors get one hook per
    step, removed when the step ends (``end_step``) and when the watch ends.
    """

    def __init__(self, factors: weakref.WeakKeyDictionary) -> None:
        self.factors = factors
        self.leaf_hooks: dict[int, tuple[weakref.ref, RemovableHandle]] = {}  # id(leaf) -> (its weak ref, hook handle)

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        factor = self.factors.get(module)
        if factor is not None and torch.is_grad_enabled():
            for t in iter_float_tensors(output):
                if not t.requires_grad:
                    continue
                if t.grad_fn is not None:
                    t.register_hook(GradScale(factor))
                    continue
                held = self.leaf_hooks.get(id(t))
                if held is not None and held[0]() is t:
                    continue  # already scaled once in this step
                self.leaf_hooks[id(t)] = (weakref.ref(t), t.register_hook(GradScale(factor)))

    def end_step(self) -> None:
        hooks, self.leaf_hooks = self.leaf_hooks, {}
        for _, handle in hooks.values():
            handle.remove()

    def install(self) -> RemovableHandle:
        """Register the hook process-wide; returns its handle."""
        return nn.modules.module.register_module_forward_hook(self)


class GradScale:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.factor
