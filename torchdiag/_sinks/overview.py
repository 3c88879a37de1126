"""The overview images of a run: the layers x recorded steps heatmaps of act_std and grad_std, the depth
profile (std against layer index) and, where layers compute in float16, the heatmap of their outputs' headroom to
float16's max, drawn from the ``History`` of the reports written so far.

A heatmap cell's colour is the layer's std over what it is expected to be (``expected``): the median of its
peers at that step (the layers of the same role: qualified name without block indices, type, fan-in and
fan-out; the same layer of every repeated block), or, for a layer without peers, its own value at the first
recorded step times how much the median layer has changed since. A healthy net is pale; a chain that drifts
with depth runs from red to blue along its peers. Findings are marked on the layer that causes them
(``Finding.cause``), not on every layer of their chain."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from .._report.render import common_prefix, shorten_names
from .._report.report import Report
from .._report.tags import HEATMAP_TAGS, layer_tag
from .png import (
    BACKWARD,
    BLACK,
    CHAR_H,
    FORWARD,
    GREY,
    MISSING,
    NONFINITE,
    SCALE,
    WHITE,
    Canvas,
    diverging,
    mix,
    text_width,
)

MAX_COLUMNS = 128  # heatmap columns kept: beyond, neighbouring columns merge (flags of either, later value)
SPAN = 2.0  # the heatmap colour saturates at 10**SPAN times (or 1/10**SPAN of) what the layer is expected to be
HEADROOM = "act_headroom"  # the headroom heatmap's figure (bits of growth left before float16's max)
HEADROOM_SPAN = 10.0  # its colour: white from this many bits of headroom (outputs up to 64), dark red at none
LABEL_CHARS = 18  # the row labels: the layers' names shortened together towards this many characters


class History:
    """Per recorded step (one heatmap column), the act_std and grad_std of every layer and the flagged
    layers; at most ``MAX_COLUMNS`` columns (neighbours merge beyond)."""

    def __init__(self) -> None:
        self.layers: dict[str, tuple[int, str]] = {}  # layer tag -> (index, type), the latest seen
        self.roles: dict[str, tuple] = {}  # layer tag -> its role (``peer_role``): the layers it is compared with
        self.start: dict[str, dict[str, float]] = {m: {} for m in HEATMAP_TAGS}  # the first finite std of a layer
        # first, last, values, flagged ({layer: problems})
        self.columns: list[tuple[int, int, dict[str, dict[str, float]], dict[str, frozenset]]] = []
        self.first: Report | None = None
        self.last: Report | None = None
        self.found: set[tuple[str, str]] = set()  # (layer tag, problem) of the run's findings so far

    def marked(self, name: str, problems: frozenset | None) -> bool:
        """A cell is marked where the layer's flag at that step is a finding of the run (not a one-step wobble)."""
        if not problems:
            return False
        return any((name, p) in self.found for p in problems)

    def add(self, report: Report) -> None:
        values: dict[str, dict[str, float]] = {m: {} for m in (*HEATMAP_TAGS, HEADROOM)}
        self.found |= {(layer_tag(f.cause or f.layer), f.problem) for f in report.run_findings}
        for layer in report.layers:
            name = layer_tag(layer.name)
            self.layers[name] = (layer.index, layer.module_type)
            self.roles[name] = peer_role(layer.name, layer.module_type, layer.fan_in, layer.fan_out)
            for m in HEATMAP_TAGS:
                v = getattr(layer, m)
                if v is None and "nonfinite" in layer.status:
                    v = math.nan  # its statistics are not measured: the cell says NaN/Inf, not "did not run"
                if v is not None:
                    values[m][name] = float(v)
                    if math.isfinite(v) and v > 0:
                        self.start[m].setdefault(name, float(v))
            if layer.precision is not None:  # (headroom None there: overflowed, none left; or all zeros, all of it)
                values[HEADROOM][name] = (layer.act_headroom if layer.act_headroom is not None else
                                          0.0 if "nonfinite" in layer.status else HEADROOM_SPAN)
        flagged = {name: frozenset(problems) for name, problems in causes(report).items()}
        if self.first is None:
            self.first = report
        self.last = report
        self.columns.append((report.step, report.step, values, flagged))
        if len(self.columns) > MAX_COLUMNS:
            merged = []
            for i in range(0, len(self.columns) - 1, 2):
                (a0, _, av, af), (_, b1, bv, bf) = self.columns[i], self.columns[i + 1]
                merged.append((a0, b1, {m: {**av[m], **bv[m]} for m in av}, af | bf))
            if len(self.columns) % 2:
                merged.append(self.columns[-1])
            self.columns = merged

    def has_headroom(self) -> bool:
        """Whether any layer computed in float16 (the headroom heatmap has something to show)."""
        return any(values.get(HEADROOM) for _, _, values, _ in self.columns)

    def rows(self) -> list[tuple[str, int, str]]:
        """(layer tag, index, type) in execution order."""
        return sorted(((n, i, t) for n, (i, t) in self.layers.items()), key=lambda r: (r[1], r[0]))

    def expected(self, metric: str, values: dict[str, float]) -> dict[str, float]:
        """What each layer's std is expected to be in one column (``values``: layer tag -> std): the median (of the
        logs) of its peers' stds there, the layer's own among them, when it has peers with a value; else its own
        std at the first recorded step, moved as the whole net moved since (times the median layer's change since
        its first recorded step: gradients that shrink as the loss falls shrink everywhere); else its value (a
        neutral cell)."""
        logs: dict[tuple, list[float]] = {}
        moved = []
        start = self.start[metric]
        for name, v in values.items():
            if math.isfinite(v) and v > 0:
                logs.setdefault(self.roles.get(name, (name,)), []).append(math.log10(v))
                if name in start:
                    moved.append(math.log10(v / start[name]))
        growth = 10.0 ** statistics.median(moved) if moved else 1.0
        out = {}
        for name, v in values.items():
            peers = logs.get(self.roles.get(name, (name,)), [])
            if len(peers) >= 2:
                out[name] = 10.0 ** statistics.median(peers)
            else:
                out[name] = start[name] * growth if name in start else v
        return out


def peer_role(name: str, module_type: str, fan_in: int | None, fan_out: int | None) -> tuple:
    """The layers a layer is compared with in the heatmap: its qualified name without block indices
    (``h.3.attn.c_attn`` and ``h.7.attn.c_attn`` alike; every layer of an ``nn.Sequential``), its type, fan-in and
    fan-out: the same layer of each repeated block."""
    return (".".join(c for c in name.split(".") if not c.isdigit()), module_type, fan_in, fan_out)


def causes(report: Report) -> dict[str, set[str]]:
    """Layer tag -> the problems it causes at this step: each finding on the layer it names as its cause
    (``Finding.cause``: the weighted layer whose weights to change; the chain of layers it makes drift is not
    marked), a finding without a cause on its own layer, a status without a finding (a report read back from
    the logs) on its own layer."""
    names = {layer.name for layer in report.layers}
    out: dict[str, set[str]] = {}
    for layer in report.layers:
        rest = set(layer.status)
        for f in layer.findings:
            where = f.cause if f.cause is not None and f.cause in names else layer.name
            out.setdefault(layer_tag(where), set()).add(f.problem)
            rest.discard(f.problem)
        for p in rest:
            out.setdefault(layer_tag(layer.name), set()).add(p)
    return out


LINE = CHAR_H  # a line of text
BIG = 2  # the title and the legend: the font at twice its size
BIG_LINE = CHAR_H * BIG
# The size the overview images aim at: about what TensorBoard's image card shows (it fits an image to the card,
# upscaling it with crisp pixels; scaling it down would drop the font's one-pixel strokes).
IMAGE_W, IMAGE_H = 380, 210  # shown 1:1 in a card 210 pixels high (its height at any window width)


def heatmap_geometry(n_rows: int, n_cols: int, label_chars: int) -> tuple[int, int, int, int]:
    """(x0, y0, cell width, cell height) of the heatmap grid: row r, column c is the cell whose top left is
    (x0 + c * cell width, y0 + r * cell height)."""
    x0 = 4 + text_width("#" * label_chars) + 4
    y0 = _HEATMAP_TOP
    cw = max(2, min(24, (IMAGE_W - x0 - 8) // max(n_cols, 1)))
    ch = max(2, min(2 * LINE, (IMAGE_H - y0 - _HEATMAP_BOTTOM) // max(n_rows, 1)))
    return x0, y0, cw, ch


_HEATMAP_TOP = 3 + BIG_LINE + 4  # the title (big) and, beside it, what the colour is
_HEATMAP_BOTTOM = 3 + LINE + 5 + BIG_LINE + 2  # step ticks and their labels, the legend (big)


def row_labels(rows: list[tuple[str, int, str]]) -> list[str]:
    """A label per heatmap row (``History.rows``): the layers' names without the prefix they all share, shortened
    together as the report's table shortens them (``render.shorten_names``: rows that differ keep what tells them
    apart, block indices are never left out); the type beside a bare index (an ``nn.Sequential``'s layers)."""
    names = [n for n, _, _ in rows]
    prefix = common_prefix(names)
    short = shorten_names([n[len(prefix):] if prefix and n.startswith(prefix) else n for n in names], LABEL_CHARS)
    return [f"{s} {t}" if n.isdigit() else s for s, (n, _, t) in zip(short, rows)]


def render_heatmap(history: History, metric: str) -> Canvas:
    """Layers (rows, execution order) x recorded steps (columns). Colour: log10 of the layer's std over what it is
    expected to be at the same step (``History.expected``: the median of its peers, or its own first value; blue
    below, red above, saturating at ``SPAN`` decades), so that a healthy net is pale and a chain that drifts with
    depth runs from red to blue. A black dot marks the layer that causes a finding of the run (``causes``; not a
    one-step wobble: ``torchdiag._diagnose.verdict``), violet a NaN/Inf value, grey a layer that did not run."""
    rows, cols = history.rows(), history.columns
    labels = row_labels(rows)
    chars = max([len(s) for s in labels] + [3])
    x0, y0, cw, ch = heatmap_geometry(len(rows), len(cols), chars)
    grid_w, grid_h = cw * len(cols), ch * len(rows)
    title = "ACT STD" if metric == "act_std" else "GRAD STD"
    caption = ("BY LAYER (ROW) AND STEP (COLUMN)", "COLOUR: STD / EXPECTED (PEERS' MEDIAN)")
    lo, hi = f"÷{10 ** int(SPAN)}", f"×{10 ** int(SPAN)}"
    nan = any(not math.isfinite(v) for _, _, values, _ in cols for v in values[metric].values())
    missing_cells = any(name not in values[metric] for _, _, values, _ in cols for name, _, _ in rows)
    # the violet and grey swatches only where the image has such cells
    legend = [(BLACK, "FINDING")] + [(NONFINITE, "NAN")] * nan + [(MISSING, "NOT RUN")] * missing_cells
    c = _frame(title, caption, (lo, hi), legend, x0 + grid_w + 8, y0 + grid_h + _HEATMAP_BOTTOM)
    width = c.width
    dot = max(2, min(cw, ch) * 3 // 5) if min(cw, ch) >= 3 else 1
    cells: list[list[bytes]] = [[] for _ in rows]  # per row, per column: the cell's pixels of one line
    marks = []
    missing, nonfinite = bytes(MISSING) * cw, bytes(NONFINITE) * cw
    for k, (_, _, values, flagged) in enumerate(cols):
        vals = values[metric]
        expected = history.expected(metric, vals)
        for r, (name, _, _) in enumerate(rows):
            v = vals.get(name)
            if v is None:
                cells[r].append(missing)
            elif not math.isfinite(v):
                cells[r].append(nonfinite)
            else:
                cells[r].append(SCALE[round(shade(v, expected[name]) * 128) + 128] * cw)
            if history.marked(name, flagged.get(name)):
                marks.append((x0 + k * cw, y0 + r * ch))
    for r, line in enumerate(cells):  # each row of cells is one line of pixels, repeated ch times
        c.strip(x0, y0 + r * ch, b"".join(line), ch)
    for x, y in marks:
        if dot >= 3:
            c.rect(x + (cw - dot) // 2 - 1, y + (ch - dot) // 2 - 1, dot + 2, dot + 2, WHITE)
        c.rect(x + (cw - dot) // 2, y + (ch - dot) // 2, dot, dot, BLACK)
    # row labels, as many as fit without overlapping: those of layers causing a finding at the latest step first
    # (in red), then every k-th row
    every = max(1, math.ceil((LINE + 1) / ch))
    last = cols[-1][3] if cols else {}
    red = {r for r, (name, _, _) in enumerate(rows) if history.marked(name, last.get(name))}
    taken: list[int] = []
    for r in sorted(range(len(rows)), key=lambda r: (r not in red, r % every != 0, r)):
        ty = max(y0 + r * ch + ch // 2 - 3, y0 - 2)
        if all(abs(ty - t) >= LINE for t in taken) and (r in red or r % every == 0 or r == len(rows) - 1):
            taken.append(ty)
            c.text(x0 - 4 - text_width(labels[r]), ty, labels[r], FORWARD if r in red else BLACK)
    # step ticks under the grid: the first, the last and a few between
    ty = y0 + grid_h + 3
    ticks = sorted({0, len(cols) - 1} | {round(i * (len(cols) - 1) / max(1, grid_w // 50)) for i in
                                         range(grid_w // 50 + 1)} if cols else set())
    placed: list[tuple[int, int]] = []
    for k in sorted(ticks, key=lambda k: (k not in (0, len(cols) - 1), k)):
        label = str(cols[k][1])
        lw = text_width(label)
        tx = min(max(x0 + k * cw + cw // 2 - lw // 2, x0 - lw // 2), width - lw - 2)
        if all(tx + lw + 8 <= a or tx >= b + 8 for a, b in placed):
            c.rect(x0 + k * cw + cw // 2, ty - 3, 1, 3, BLACK)
            c.text(tx, ty + 1, label)
            placed.append((tx, tx + lw))
    if cols:
        c.text(x0 - 4 - text_width("STEP"), ty + 1, "STEP", GREY)
    _legend(c, ty + LINE + 5, (lo, hi), legend, lambda t: 2 * t - 1, 0.5)
    return c


_BAR_W = 72  # the legend's colour bar


def _frame(title: str, caption: tuple[str, str], ends: tuple[str, str], legend: list[tuple[tuple, str]],
           grid_right: int, height: int) -> Canvas:
    """A heatmap's canvas, as wide as its grid (which ends at ``grid_right``), its title and its legend need, with
    the title (big) and its two caption lines drawn."""
    legend_w = (4 + text_width(ends[0], BIG) + 3 + _BAR_W + 3 + text_width(ends[1], BIG) + 10
                + sum(BIG_LINE + text_width(t, BIG) + 10 for _, t in legend))
    title_w = 4 + text_width(title, BIG) + 8 + max(text_width(t) for t in caption) + 4
    c = Canvas(max(grid_right, title_w, legend_w), height)
    cx = c.text(4, 3, title, scale=BIG) + 8
    c.text(cx, 3, caption[0], GREY)
    c.text(cx, 3 + LINE + 1, caption[1], GREY)
    return c


def _legend(c: Canvas, by: int, ends: tuple[str, str], legend: list[tuple[tuple, str]],
            colour: Callable[[float], float], mark: float) -> None:
    """The colour bar between its two end labels (``colour``: a position in [0, 1] -> ``diverging``'s argument),
    a tick at ``mark`` of its width, then the swatches, in the big font, from ``by`` down."""
    bx = c.text(4, by, ends[0], scale=BIG) + 3
    c.strip(bx, by, b"".join(bytes(diverging(colour(i / (_BAR_W - 1)))) for i in range(_BAR_W)), BIG_LINE - 2)
    c.rect(bx + round(mark * (_BAR_W - 1)), by - 2, 1, BIG_LINE + 2, BLACK)
    lx = c.text(bx + _BAR_W + 3, by, ends[1], scale=BIG) + 10
    for color, label in legend:
        c.rect(lx, by, BIG_LINE - 4, BIG_LINE - 2, color)
        lx = c.text(lx + BIG_LINE - 2, by, label, scale=BIG) + 10


def render_headroom(history: History, margin_bits: float = 3.0) -> Canvas:
    """Layers (rows, execution order) x recorded steps (columns) of a float16 run: the bits of growth each layer's
    outputs have left before float16's max (``LayerReport.act_headroom``), white from ``HEADROOM_SPAN`` bits, dark
    red at none, a black dot where ``overflow_risk`` (under ``margin_bits``) is a finding of the run; grey where the
    layer computed in float32 (autocast keeps norms and softmax there) or did not run."""
    rows, cols = history.rows(), history.columns
    labels = row_labels(rows)
    chars = max([len(s) for s in labels] + [3])
    x0, y0, cw, ch = heatmap_geometry(len(rows), len(cols), chars)
    grid_w, grid_h = cw * len(cols), ch * len(rows)
    title = "FLOAT16 HEADROOM"
    caption = ("OUTPUT: BITS LEFT BEFORE 65504", f"OVERFLOW RISK UNDER {margin_bits:g} BITS")
    legend = [(BLACK, "FINDING"), (MISSING, "FLOAT32")]
    ends = (f"{HEADROOM_SPAN:g}", "0 BITS")
    c = _frame(title, caption, ends, legend, x0 + grid_w + 8, y0 + grid_h + _HEATMAP_BOTTOM)
    width = c.width
    dot = max(2, min(cw, ch) * 3 // 5) if min(cw, ch) >= 3 else 1
    for k, (_, _, values, flagged) in enumerate(cols):
        bits = values.get(HEADROOM, {})
        for r, (name, _, _) in enumerate(rows):
            h = bits.get(name)
            color = MISSING if h is None else diverging(min(max(1.0 - h / HEADROOM_SPAN, 0.0), 1.0))
            c.rect(x0 + k * cw, y0 + r * ch, cw, ch, color)
            if h is not None and h < margin_bits and "overflow_risk" in (flagged.get(name) or ()) \
                    and history.marked(name, frozenset({"overflow_risk"})):
                x, y = x0 + k * cw, y0 + r * ch
                c.rect(x + (cw - dot) // 2, y + (ch - dot) // 2, dot, dot, BLACK)
    every = max(1, math.ceil((LINE + 1) / ch))
    taken: list[int] = []
    for r in range(len(rows)):
        ty = max(y0 + r * ch + ch // 2 - 3, y0 - 2)
        if (r % every == 0 or r == len(rows) - 1) and all(abs(ty - t) >= LINE for t in taken):
            taken.append(ty)
            c.text(x0 - 4 - text_width(labels[r]), ty, labels[r])
    ty = y0 + grid_h + 3
    if cols:
        for k in sorted({0, len(cols) - 1}):
            label = str(cols[k][1])
            lw = text_width(label)
            tx = min(max(x0 + k * cw + cw // 2 - lw // 2, x0 - lw // 2), width - lw - 2)
            c.rect(x0 + k * cw + cw // 2, ty - 3, 1, 3, BLACK)
            c.text(tx, ty + 1, label)
        c.text(x0 - 4 - text_width("STEP"), ty + 1, "STEP", GREY)
    _legend(c, ty + LINE + 5, ends, legend, lambda t: t, 1.0 - margin_bits / HEADROOM_SPAN)  # the tick: the margin
    return c


def shade(value: float, expected: float) -> float:
    """The heatmap colour of a std against what it is expected to be, in [-1, 1]: log10 of their ratio over
    ``SPAN`` decades (0 white, -1 dark blue, +1 dark red)."""
    return min(max(math.log10(max(value, 1e-30) / max(expected, 1e-30)) / SPAN, -1.0), 1.0)


def render_profile(history: History) -> Canvas:
    """The depth profile of the latest recorded step: act std (forward) and grad std (backward) against the
    layer index, log y; the first recorded step in faint dashes; layers that cause a finding marked under it."""
    last, first = history.last, history.first
    assert last is not None and first is not None
    series = []
    for rep, faint in ((first, True), (last, False)) if first is not last else ((last, False),):
        for key, color in (("act_std", FORWARD), ("grad_std", BACKWARD)):
            pts = [(layer.index, getattr(layer, key)) for layer in rep.layers if getattr(layer, key) is not None]
            series.append((pts, mix(color, 0.5) if faint else color, faint))
    vals = [v for pts, _, _ in series for _, v in pts if math.isfinite(v) and v > 0]
    lo = math.floor(math.log10(min(vals))) if vals else -1
    hi = math.ceil(math.log10(max(vals))) if vals else 1
    if hi - lo < 2:
        lo, hi = lo - 1, hi + 1
    indices = [layer.index for layer in last.layers] or [0]
    xmin, xmax = min(indices), max(max(indices), min(indices) + 1)
    W, H = IMAGE_W, IMAGE_H
    left, right, top, bottom = 4 + text_width("1E-10") + 6, 10, 2 * LINE + 10, 2 * LINE + 12
    pw, ph = W - left - right, H - top - bottom
    c = Canvas(W, H)
    c.text(4, 3, f"STD AGAINST LAYER INDEX AT STEP {last.step}, LOG SCALE")
    x = c.text(4, LINE + 5, "- ACT STD", FORWARD) + 10
    x = c.text(x, LINE + 5, "- GRAD STD", BACKWARD) + 10
    if first is not last:
        c.text(x, LINE + 5, f"FAINT: STEP {first.step}", GREY)

    def px(i: float) -> int:
        return left + round((i - xmin) / (xmax - xmin) * (pw - 1))

    def py(v: float) -> int | None:
        if not math.isfinite(v):
            return None
        lv = math.log10(v) if v > 0 else lo
        return top + round((hi - min(max(lv, lo), hi)) / (hi - lo) * (ph - 1))

    every = max(1, math.ceil((hi - lo) / max(1, ph // (LINE + 8))))
    for d in range(lo, hi + 1):  # decade grid lines and labels
        y = py(10.0 ** d)
        assert y is not None
        c.rect(left, y, pw, 1, (225, 225, 225))
        if (d - lo) % every == 0:
            label = "1" if d == 0 else f"1E{d}"
            c.text(left - 4 - text_width(label), y - 3, label)
    step_x = max(1, math.ceil((xmax - xmin) / max(pw // 30, 1)))
    for i in range(xmin, xmax + 1):
        if (i - xmin) % step_x == 0 or i == xmax:
            X = px(i)
            c.rect(X, top + ph, 1, 3, BLACK)
            if i == xmax or xmax - i >= step_x * 0.7:
                c.text(X - text_width(str(i)) // 2, top + ph + 4, str(i))
    c.rect(left, top, 1, ph, BLACK)
    c.rect(left, top + ph, pw, 1, BLACK)
    for pts, color, faint in series:
        prev = None
        for i, v in pts:
            y = py(v)
            if y is None:
                c.rect(px(i) - 2, top + 1, 5, 5, NONFINITE)
                prev = None
                continue
            cur = (px(i), y)
            if prev is not None:
                c.line(prev[0], prev[1], cur[0], cur[1], color, thick=1 if faint else 2, dash=3 if faint else 0)
            if not faint:
                c.rect(cur[0] - 1, cur[1] - 1, 3, 3, color)
            prev = cur
    caused = causes(last)
    flagged = [layer.index for layer in last.layers
               if history.marked(layer_tag(layer.name), frozenset(caused.get(layer_tag(layer.name), ())))]
    ty = top + ph + LINE + 3
    for i in flagged:
        X = px(i)
        for k in range(4):
            c.rect(X - k, ty + k, 2 * k + 1, 1, BLACK)
    note = "^ FLAGGED AT THIS STEP" if flagged else "NOTHING FLAGGED AT THIS STEP"
    c.text(left, H - LINE, f"LAYER INDEX   {note}", GREY)
    return c
