"""What the framework callbacks share: checking watch() arguments, rank zero, the scaler, step control."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from torch import nn

from ..config import resolve_config
from ..watch import Watcher, watch

if TYPE_CHECKING:
    import torch

# the watch() argument a callback always fills in itself
_RESERVED = {"model"}


def check_watch_kwargs(kwargs: dict[str, Any], owner: str) -> dict[str, Any]:
    """Reject unknown ``watch()`` keywords and a bad ``config``/``every`` when the callback is built, not at fit."""
    params = inspect.signature(watch).parameters
    unknown = sorted(k for k in kwargs if k not in params or k in _RESERVED)
    if unknown:
        allowed = ", ".join(k for k in params if k not in _RESERVED)
        raise TypeError(f"{owner}: unknown keyword argument(s) {', '.join(unknown)}; the keywords of"
                        f" torchdiag.watch() are allowed: {allowed}")
    if kwargs.get("logdir") is not None and kwargs.get("writer") is not None:
        raise TypeError(f"{owner}: pass either logdir= or writer=, not both")
    resolve_config(kwargs.get("config"), every=kwargs.get("every"))  # raises ConfigError now
    return dict(kwargs)


def for_rank(kwargs: dict[str, Any], is_zero: bool) -> dict[str, Any]:
    """Every rank captures; only global rank 0 writes TensorBoard events and raises console warnings."""
    kwargs = dict(kwargs)
    if not is_zero:
        kwargs.pop("logdir", None)
        kwargs.pop("writer", None)
        kwargs["config"] = resolve_config(kwargs.get("config"), every=kwargs.pop("every", None)).replace(
            warnings=False)
    return kwargs


def start_watch(model: nn.Module, kwargs: dict[str, Any], scaler: torch.amp.GradScaler | None = None) -> Watcher:
    """``watch(model, **kwargs)`` entered, with the framework's AMP ``GradScaler`` when there is one.

    A step is then ended by the callback only (``Watcher.step()`` at each optimizer step), never by a
    forward of the model: with gradient accumulation, the micro-batches of one optimizer step are one step.
    """
    kwargs = dict(kwargs)
    kwargs.setdefault("auto_step", False)  # micro-batches of one optimizer step are one step
    if scaler is not None and kwargs.get("scaler") is None:
        kwargs["scaler"] = scaler
    watcher = watch(model, **kwargs)
    watcher.__enter__()
    return watcher


def stop_watch(watcher: Watcher | None, exc: BaseException | None = None) -> None:
    """Leave the watch (removes every hook, flushes the writer; closes it only if torchdiag opened it)."""
    if watcher is None:
        return
    if exc is None:
        watcher.__exit__(None, None, None)
    else:
        watcher.__exit__(type(exc), exc, exc.__traceback__)
