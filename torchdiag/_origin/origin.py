"""Where a NaN/Inf was produced: the operator, the module it ran in, the user's line.

The step's sums say *that* a module's output or gradient held a non-finite value, at no extra cost;
they cannot say which operator made it. This module replays one batch with an operator-level check:

* forward: a ``TorchDispatchMode`` sees every ATen call; the origin is the first call whose floating
  inputs were all finite and whose output is not (``aten.log`` of a negative, an fp16 ``aten.mm`` that
  overflowed). The module is the innermost one whose forward was running (a stack kept by forward
  pre/post hooks), the line the first frame outside torch and torchdiag;
* backward: each autograd node gets a hook; the origin is the first node whose incoming gradients were
  finite and whose outgoing ones are not (``SqrtBackward0`` at exact zeros is ``aten.sqrt``). Nodes are
  owned by the innermost module during whose forward they were created; their line is the one anomaly
  mode recorded when they were (``torch.autograd.detect_anomaly(check_nan=False)``, only in the replay).

The replay leaves training as it was: parameters are only read (gradients come from
``torch.autograd.grad``, ``.grad`` is untouched), and buffers, train/eval modes and the RNG are restored
(``preserved_state``, as ``check()`` does). It costs one check per operator, so it runs once, after a trip.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import TorchDiagError
from ._opcheck import (
    BackwardCheck,
    ForwardCheck,
    ModuleStack,
    anomaly_traces,
    finite,
    float_leaves,
    module_hooks,
    value_kind,
)
from ._originrecord import PHASES, NonfiniteOrigin
from .losses import projection_loss
from .preserve import forked_rngs, preserved_state


def replay(model: nn.Module, args: tuple, kwargs: dict | None = None, *,
           loss_fn: Callable[[Any], torch.Tensor] | None = None,
           names: Mapping[nn.Module, str] | None = None,
           parameters: Mapping[str, torch.Tensor] | None = None, disposable: bool = False) -> NonfiniteOrigin | None:
    """Run ``model(*args, **kwargs)`` and a backward of its loss with the operator-level checks.

    ``names`` maps the modules to attribute to their names (default: every submodule). ``parameters``
    replaces some of the model's parameters for the replay (``torch.func.functional_call``: the weights
    from before an optimizer step). ``disposable``: ``model`` is a copy thrown away after (the watch's replay), so
    its buffers and modes are not saved and restored (a second copy of every buffer), only the random generators.
    Returns ``None`` when everything stayed finite.
    """
    kwargs = kwargs or {}
    if names is None:
        names = {m: n for n, m in model.named_modules() if n}
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    if parameters:
        params.update(parameters)
    owners = {id(p): n for n, p in params.items()}
    for name, p in params.items():
        if p.is_floating_point() and not finite(p.detach()):
            module = name.rpartition(".")[0] or None
            return NonfiniteOrigin("forward", module=module, parameter=owners.get(id(p), name),
                                   value=value_kind(p.detach()),
                                   note="a parameter was non-finite before the forward read it")
    for t in float_leaves((args, kwargs)):
        if not finite(t):
            return NonfiniteOrigin("forward", value=value_kind(t), note="the input batch already held NaN/Inf")

    modules = ModuleStack(names)
    fwd, bwd = ForwardCheck(modules), BackwardCheck(modules)
    with (forked_rngs(model) if disposable else preserved_state(model)), torch.enable_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's "this mode will increase the runtime"
        with anomaly_traces():
            with module_hooks(names, modules):
                with fwd:
                    # detached aliases of every parameter (the given ones where given): the backward never reaches
                    # the user's own Parameters, so their hooks (p.register_hook: per-parameter clipping, a logger's
                    # gradient hooks) fire only for the backward passes that really happened
                    given = parameters or {}
                    aliases = {n: given.get(n, p).detach().requires_grad_(p.requires_grad)
                               for n, p in model.named_parameters()}
                    aliases.update({n: p.detach().requires_grad_(True) for n, p in given.items() if n not in aliases})
                    out = torch.func.functional_call(model, aliases, args, kwargs)
                    loss = loss_fn(out) if loss_fn is not None else projection_loss(out)
            if fwd.found is not None:
                return fwd.found
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                return None
            targets = [p for p in aliases.values() if p.requires_grad]
            if not targets:
                return None
            bwd.install([loss.grad_fn])
            try:
                torch.autograd.grad(loss, targets, allow_unused=True)
            finally:
                bwd.remove()
    return bwd.found


def locate_nonfinite(model: nn.Module, *inputs: object, loss_fn: Callable[[Any], torch.Tensor] | None = None,
                     **kwargs: Any) -> NonfiniteOrigin | None:
    """Replay one batch and say where its first NaN/Inf is produced, or ``None`` if all stays finite.

    The forward ``model(*inputs, **kwargs)`` runs under an operator-level check, then the backward of
    ``loss_fn(output)`` (default: the fixed random projection ``check()`` uses). Parameters, ``.grad``,
    buffers, train/eval modes and the RNG state are as they were afterwards.

    Example:
        >>> import torch, torchdiag
        >>> class Log(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.log(x)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), Log())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(-1.0), net[0].bias.zero_()
        >>> origin = torchdiag.locate_nonfinite(net, torch.ones(2, 4))
        >>> origin.phase, origin.module, origin.op
        ('forward', '1', 'aten.log')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"locate_nonfinite(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    if not inputs and not kwargs:
        raise TypeError("locate_nonfinite(model, *inputs): give the batch the model's forward takes")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"locate_nonfinite(loss_fn=...): expected a callable of the model's output, got"
                        f" {type(loss_fn).__name__}")
    target = getattr(model, "_orig_mod", model)  # a torch.compile'd model: replayed eagerly
    try:
        return replay(target, inputs, kwargs, loss_fn=loss_fn)
    except TorchDiagError:
        raise
    except Exception as e:
        raise TorchDiagError(f"locate_nonfinite(): the model raised {type(e).__name__} on the given inputs: {e}") from e


__all__ = ["NonfiniteOrigin", "locate_nonfinite", "replay", "PHASES"]
