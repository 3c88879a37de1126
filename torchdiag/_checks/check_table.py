"""The table of ``torchdiag check``: per layer its parameters and output shape (as Lightning's ``ModelSummary``)
beside the statistics of the report, within a width; and the output shapes of one pass (``ShapeRecorder``)."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._report.render import common_prefix, name_column, render, suggestion_text
from .._report.report import Report

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


def _count(n: int) -> str:
    """A parameter count in 5 characters or fewer: 832, 65.8K, 1.2M, 7.0B."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return str(n)


def _shape(out: object) -> str:
    """The shape of a module's output: of the tensor, or of the first tensor in a tuple/list/dict (then '…')."""
    if isinstance(out, torch.Tensor):
        return ",".join(map(str, out.shape)) or "scalar"
    items = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else []
    for item in items:
        if isinstance(item, torch.Tensor):
            return _shape(item) + ("…" if len(items) > 1 else "")
    return "-"


class ShapeRecorder:
    """Output shapes of every module in one pass (its first call), by qualified name; hooks removed on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.shapes: dict[str, str] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ShapeRecorder:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if name not in self.shapes:
                self.shapes[name] = _shape(out)
        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


_COLUMNS = ("#", "layer", "type", "params", "output", "act std", "grad std", "gain", "status", "suggestion")
_RIGHT = {0, 3, 5, 6, 7}
# (column, narrowest width) in the order the columns give way when the table is wider than asked
_SHRINK = ((1, 28), (9, 16), (4, 12), (1, 16), (9, 10), (8, 8), (1, 8), (4, 8), (2, 14), (2, 10))  # type last


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escaped(text: str) -> str:
    """Control characters (a newline in a layer's name) written as their escapes, so that a row stays one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _printable(report: Report) -> Report:
    """The report itself, or a copy whose layer names hold no control characters (for ``render``'s table)."""
    if not any(_CONTROL.search(layer.name) for layer in report.layers):
        return report
    return dataclasses.replace(report, layers=[dataclasses.replace(layer, name=_escaped(layer.name))
                                               for layer in report.layers])


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def summary_table(report: Report, model: nn.Module, shapes: dict[str, str], width: int = 100) -> list[str]:
    """The per-layer table of ``torchdiag check``: a ``ModelSummary``-style table (parameters, output shape)
    beside the statistics, every line at most ``width`` columns."""
    # each parameter counts for the deepest module above it that is a row (an attention's out_proj, which its
    # forward uses functionally and so is never a row of its own, counts for the attention)
    rows_by_name = {layer.name for layer in report.layers}
    counts: dict[str, int] = {}
    for pname, p in model.named_parameters():
        parts = pname.split(".")[:-1]
        for k in range(len(parts), -1, -1):
            owner = ".".join(parts[:k])
            if owner in rows_by_name:
                counts[owner] = counts.get(owner, 0) + p.numel()
                break
    prefix = common_prefix([layer.name for layer in report.layers])  # render's title names it
    rows = []
    for layer in report.layers:
        params = counts.get(layer.name, 0)
        rows.append([str(layer.index), _escaped(layer.name[len(prefix):]) or "(root)", _escaped(layer.module_type),
                     _count(params) if params else "-", shapes.get(layer.name, "-"), _g(layer.act_std),
                     _g(layer.grad_std), _g(layer.gain), ",".join(sorted(layer.status)) or "ok",
                     suggestion_text(layer)])
    return _lines(_COLUMNS, _RIGHT, _SHRINK, rows, width)


def _lines(columns: tuple[str, ...], right: set[int], shrink: tuple[tuple[int, int], ...], rows: list[list[str]],
           width: int) -> list[str]:
    """A table's header and rows within ``width``: column 1 holds the layer names, shortened together
    (``name_column``); the other cells cut with '…' where their column gave way; the columns in ``right`` aligned
    right."""
    names, widths = name_column([r[1] for r in rows], columns, rows, width, shrink)
    for r, n in zip(rows, names):
        r[1] = n

    def line(cells: list[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            c = c if i == 1 or len(c) <= w else c[: max(w - 1, 0)] + "…"
            out.append(c.rjust(w) if i in right else c.ljust(w))
        return "  ".join(out).rstrip()[:width]

    return [line(list(columns))] + [line(r) for r in rows]


def render_check(report: Report, model: nn.Module, shapes: dict[str, str], color: bool = False,
                 width: int = 100) -> str:
    """The report of ``render``, with its table replaced by ``summary_table`` (the findings and notes below it
    as ``render`` writes them). If ``render``'s layout is not the one expected, both are printed."""
    shown = _printable(report)  # render's own table, one line per layer
    text = render(shown, color=False, width=width)
    lines = text.splitlines()
    n = len(report.layers)
    table = summary_table(report, model, shapes, width)
    fits = len(lines) >= 2 + n and lines[1].split()[:1] == ["#"] and all(
        lines[2 + i].split()[:1] == [str(layer.index)] for i, layer in enumerate(report.layers))
    if not fits:
        return "\n".join(table) + "\n" + render(shown, color=color, width=width)
    red, reset = "\033[1;31m", "\033[0m"
    body = [table[0]] + [red + t + reset if color and layer.status else t for t, layer in zip(table[1:], report.layers)]
    rest = render(shown, color=color, width=width).splitlines()[2 + n:]
    return "\n".join([lines[0], *body, *rest])


_RANGE_COLUMNS = ("#", "layer", "type", "format", "out headroom", "out underflow", "grad headroom", "grad underflow",
                  "status")
_RANGE_RIGHT = {0, 4, 5, 6, 7}
_RANGE_SHRINK = ((1, 28), (3, 8), (1, 16), (8, 8), (1, 8), (2, 10))


def _bits(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} bits"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def range_table(report: Report, width: int = 100) -> list[str]:
    """Per layer, its outputs and gradients against the format of ``check(precision=)``: the headroom to overflow
    (bits of growth left, log2(max / absmax)) and the share of the non-zero values under the format's precision
    floor (eight of its smallest subnormal steps); '-' where the layer computes in float32 (where autocast keeps
    it) or, in float8, where the scaling sets the
    headroom. The problems shown are the precision ones (``overflow_risk``, ``underflow``)."""
    prefix = common_prefix([layer.name for layer in report.layers])
    rows = []
    for layer in report.layers:
        problems = sorted(p for p in layer.status if p in ("overflow_risk", "underflow"))
        rows.append([str(layer.index), _escaped(layer.name[len(prefix):]) or "(root)", _escaped(layer.module_type),
                     layer.precision or "float32", _bits(layer.act_headroom), _share(layer.act_underflow),
                     _bits(layer.grad_headroom), _share(layer.grad_underflow), ",".join(problems) or "ok"])
    return _lines(_RANGE_COLUMNS, _RANGE_RIGHT, _RANGE_SHRINK, rows, width)
