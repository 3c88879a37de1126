"""Applying fixes to a model in place (the only module here that changes user weights)."""

from __future__ import annotations

import torch
from torch import nn

from .report import Report


def apply_suggestions(model: nn.Module, report: Report, *, only_flagged: bool = False) -> dict[str, float]:
    """Multiply each layer's weight by its ``suggested_scale`` from ``report``, in place.

    Args:
        model: the model the report was made from.
        report: a ``Report`` from ``check`` or ``Watcher.report``.
        only_flagged: rescale only layers the report flagged.

    Returns:
        ``{layer name: factor applied}``.
    """
    modules = dict(model.named_modules())
    applied = {}
    with torch.no_grad():
        for layer in report.layers:
            if layer.suggested_scale is None or (only_flagged and not layer.status):
                continue
            m = modules.get(layer.name)
            w = getattr(m, "weight", None) if m is not None else None
            if isinstance(w, torch.Tensor):
                w.mul_(layer.suggested_scale)
                applied[layer.name] = layer.suggested_scale
    return applied
