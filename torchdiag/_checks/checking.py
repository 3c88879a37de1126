"""``check``: one recorded forward and backward pass of a model, its diagnosis, the model left as it was
(without ``loss_fn``, ``losses.projection_loss``)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .._origin.losses import projection_loss
from .._origin.preserve import forked_rngs, preserved_state
from .._report.report import Report
from .._vocab import FORMATS, Format
from ..config import Config, ConfigLike, resolve_config
from ..errors import TorchDiagError
from ..watch import Watcher

#: check(precision=): the names it takes, and the format each means
PRECISIONS = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
              "float8_e4m3fn": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
              "e5m2": "float8_e5m2"}


def check(model: nn.Module, *inputs: object, loss_fn: Callable[[Any], torch.Tensor] | None = None,
          config: ConfigLike = None, precision: str | None = None) -> Report:
    """Run one recorded forward and backward pass and return its diagnosis.

    Parameters, ``.grad``, buffers (BatchNorm running statistics included), train/eval mode
    and the global RNG state are as they were afterwards. Without ``loss_fn`` the loss is a
    fixed random projection of every floating output, so gradients are not degenerate.

    Example:
        >>> import torch, torchdiag
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
        >>> report = torchdiag.check(net, torch.randn(8, 16))
        >>> report.flagged
        []

    ``precision``: the per-layer range of each output and gradient in that format (``LayerReport.precision``,
    ``act_headroom``, ``grad_headroom``, ``act_underflow``, ``grad_underflow``) and its ``overflow_risk`` and
    ``underflow`` flags. ``"float16"`` and ``"bfloat16"`` run the forward under ``torch.autocast`` in that dtype,
    so each layer is measured in the dtype it computes in (the layers autocast keeps in float32, which depend on
    the device, have no range figures). ``"float8_e4m3fn"`` and ``"float8_e5m2"`` ask whether the float32 tensors
    would fit the format as fp8 recipes store them, each scaled so that its absmax is the format's max: the share
    of the non-zero values that would fall under its precision floor (no headroom: the scaling sets it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    if not inputs:
        raise TypeError("check(model, *inputs): give at least one input for the model's forward")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("check(loss_fn=...): expected a callable that takes the model's output and returns a scalar"
                        f" loss tensor, got {type(loss_fn).__name__}")
    fmt = None
    if precision is not None:
        if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
            raise ValueError(f"check(precision=...): expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        fmt = FORMATS[PRECISIONS[precision.lower()]]
    cfg = resolve_config(config, every=1)
    if any(nn.parameter.is_lazy(t) for t in (*model.parameters(), *model.buffers())):
        return _check_lazy(model, inputs, loss_fn, cfg, fmt)
    return _check(model, inputs, loss_fn, cfg, fmt)


def _check_lazy(model: nn.Module, inputs: tuple, loss_fn: Callable[[Any], torch.Tensor] | None, cfg: Config,
                fmt: Format | None) -> Report:
    """``check`` of a model with lazy modules (``LazyLinear``...): the inputs would materialise them, so that
    later training would start from other weights. A copy is materialised and checked instead."""
    with forked_rngs(model):
        try:
            twin = copy.deepcopy(model)
        except Exception as e:
            modules: Iterator[tuple[str, nn.Module]] = model.named_modules()  # its return type unannotated in torch
            lazy = [n or type(m).__name__ for n, m in modules
                    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
            raise TorchDiagError(f"check(): the model has lazy modules with uninitialised parameters or buffers"
                                 f" ({', '.join(lazy[:5])}), which check() would initialise and which cannot be"
                                 " copied: run one forward pass of the model first to initialise them") from e
        try:
            with torch.no_grad():
                twin(*inputs)  # materialises the lazy parameters of the copy
        except Exception as e:
            raise TorchDiagError(f"check(): the model raised {type(e).__name__} on the given inputs: {e}") from e
        report = _check(twin, inputs, loss_fn, cfg, fmt)
    report.notes.append("the model has lazy modules: a copy was initialised by these inputs and checked; the model"
                        " itself is left uninitialised, as it was")
    return report


def _autocast(model: nn.Module, fmt: Format | None) -> contextlib.AbstractContextManager:
    """The forward's autocast for ``check(precision=)`` in float16 or bfloat16 (a no-op context otherwise)."""
    if fmt is None or fmt.name not in ("float16", "bfloat16"):
        return contextlib.nullcontext()
    device = next((t.device.type for t in (*model.parameters(), *model.buffers())), "cpu")
    dtype = getattr(torch, fmt.name)
    try:
        return torch.autocast(device, dtype=dtype)
    except Exception as e:  # an old torch without float16 autocast on the CPU, a device without it
        raise TorchDiagError(f"check(precision={fmt.name!r}): torch.autocast({device!r}, dtype=torch.{fmt.name})"
                             f" is not available here: {e}") from e


def _check(model: nn.Module, inputs: tuple, loss_fn: Callable[[Any], torch.Tensor] | None, cfg: Config,
           fmt: Format | None = None) -> Report:
    # float16 runs in its own dtype under autocast (its tensors are judged as in training); the others are measured
    # against the format asked about
    judged = fmt if fmt is not None and fmt.name != "float16" else None
    autocast = _autocast(model, fmt)
    with preserved_state(model), torch.enable_grad():
        w = Watcher(model, cfg, logdir=None, writer=None, rescale_grads=False, warn=False, record_eval=True,
                    precision=judged)
        with w:
            # inputs need a gradient only where no parameter gives the graph one: a model may set requires_grad
            # on views of its input itself (Hugging Face's Wav2Vec2 feature encoder), which a leaf input forbids
            trainable = any(p.requires_grad for p in model.parameters())
            xs = tuple(x.detach().clone().requires_grad_(not trainable) if isinstance(x, torch.Tensor)
                       and x.is_floating_point() else x for x in inputs)
            try:
                with autocast:
                    out = model(*xs)
            except Exception as e:
                raise TorchDiagError(
                    f"check(): the model raised {type(e).__name__} on the given inputs: {e}") from e
            loss = loss_fn(out) if loss_fn is not None else projection_loss(out)
            if isinstance(loss, torch.Tensor) and loss.numel() != 1:
                raise ValueError(f"check(loss_fn=...): expected the loss function to return a scalar (one element),"
                                 f" got a tensor of shape {tuple(loss.shape)}; reduce it, e.g. with .mean()")
            targets: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
            targets += [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
            if isinstance(loss, torch.Tensor) and loss.requires_grad and targets:
                torch.autograd.grad(loss, targets, allow_unused=True)
            report = w.step() or w.report()  # the step ends: its signals (attention, logits) are read with it
        if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
            report.notes.append("the loss does not require grad: no gradient was measured")
    return report
