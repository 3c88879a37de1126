"""The overview images of a run: the layers x recorded steps heatmaps of act_std and grad_std and the depth
profile (std against layer index), drawn from the ``History`` of the reports written so far."""

from __future__ import annotations

import math

from ..report.report import Report
from ..report.tags import HEATMAP_TAGS, layer_tag
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
    elide,
    mix,
    text_width,
)

MAX_COLUMNS = 128  # heatmap columns kept: beyond, neighbouring columns merge (flags of either, later value)
SPAN = 3.0  # the heatmap colour saturates at 10**SPAN times (or 1/10**SPAN of) the median layer's std


class History:
    """Per recorded step (one heatmap column), the act_std and grad_std of every layer and the flagged
    layers; at most ``MAX_COLUMNS`` columns (neighbours merge beyond)."""

    def __init__(self) -> None:
        self.layers: dict[str, tuple[int, str]] = {}  # layer tag -> (index, type), the latest seen
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
        values: dict[str, dict[str, float]] = {m: {} for m in HEATMAP_TAGS}
        flagged: dict[str, frozenset] = {}
        self.found |= {(layer_tag(f.layer), f.problem) for f in report.run_findings}
        for layer in report.layers:
            name = layer_tag(layer.name)
            self.layers[name] = (layer.index, layer.module_type)
            for m in HEATMAP_TAGS:
                v = getattr(layer, m)
                if v is None and "nonfinite" in layer.status:
                    v = math.nan  # its statistics are not measured: the cell says NaN/Inf, not "did not run"
                if v is not None:
                    values[m][name] = float(v)
            if layer.status:
                flagged[name] = frozenset(layer.status)
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

    def rows(self) -> list[tuple[str, int, str]]:
        """(layer tag, index, type) in execution order."""
        return sorted(((n, i, t) for n, (i, t) in self.layers.items()), key=lambda r: (r[1], r[0]))


LINE = CHAR_H  # a line of text
# The size the overview images aim at: about what TensorBoard's image card shows (it fits an image to the card,
# upscaling it with crisp pixels; scaling it down would drop the font's one-pixel strokes).
IMAGE_W, IMAGE_H = 380, 210  # shown 1:1 in a card 210 pixels high (its height at any window width)


def heatmap_geometry(n_rows: int, n_cols: int, label_chars: int) -> tuple[int, int, int, int]:
    """(x0, y0, cell width, cell height) of the heatmap grid: row r, column c is the cell whose top left is
    (x0 + c * cell width, y0 + r * cell height)."""
    x0 = 4 + text_width("#" * label_chars) + 4
    y0 = LINE + 7
    cw = max(2, min(24, (IMAGE_W - x0 - 8) // max(n_cols, 1)))
    ch = max(2, min(2 * LINE, (IMAGE_H - y0 - _HEATMAP_BOTTOM) // max(n_rows, 1)))
    return x0, y0, cw, ch


_HEATMAP_BOTTOM = 3 + LINE + 3 + LINE + 2  # step ticks and their labels, the legend


def _row_labels(rows: list[tuple[str, int, str]], ch: int) -> list[str]:
    """A label per row: index and name (index and type for an ``nn.Sequential``) when the rows are tall enough,
    else the index alone."""
    if ch >= LINE + 1:
        return [elide(f"{i} {t}" if n == str(i) else f"{i} {n}", 22) for n, i, t in rows]
    return [str(i) for _, i, _ in rows]


def render_heatmap(history: History, metric: str) -> Canvas:
    """Layers (rows, execution order) x recorded steps (columns). Colour: log10 of the layer's std over the
    median layer's std at the same step (blue below, red above, saturating at ``SPAN`` decades), so that a
    column shows how the signal drifts with depth at that step. A black dot marks a flagged cell whose flag is a
    finding of the run (``torchdiag.diagnose.verdict``: not a one-step wobble), violet a NaN/Inf value, grey a layer
    that did not run."""
    rows, cols = history.rows(), history.columns
    _, _, _, ch0 = heatmap_geometry(len(rows), len(cols), 4)
    labels = _row_labels(rows, ch0)
    chars = max([len(s) for s in labels] + [3])
    x0, y0, cw, ch = heatmap_geometry(len(rows), len(cols), chars)
    grid_w, grid_h = cw * len(cols), ch * len(rows)
    what = "ACT STD" if metric == "act_std" else "GRAD STD"
    title = f"{what} / MEDIAN LAYER, BY LAYER (ROW) AND STEP (COLUMN)"
    lo, hi = f"1/{10 ** int(SPAN)}", f"×{10 ** int(SPAN)}"
    bar_w = 90
    legend = [(BLACK, "FLAGGED"), (NONFINITE, "NAN/INF"), (MISSING, "NOT RUN")]
    legend_w = 4 + text_width(lo) + 3 + bar_w + 3 + text_width(hi) + 12 + sum(18 + text_width(t) for _, t in legend)
    width = max(x0 + grid_w + 8, text_width(title) + 8, legend_w)
    height = y0 + grid_h + _HEATMAP_BOTTOM
    c = Canvas(width, height)
    c.text(4, 4, title)
    dot = max(2, min(cw, ch) * 3 // 5) if min(cw, ch) >= 3 else 1
    cells: list[list[bytes]] = [[] for _ in rows]  # per row, per column: the cell's pixels of one line
    marks = []
    missing, nonfinite = bytes(MISSING) * cw, bytes(NONFINITE) * cw
    for k, (_, _, values, flagged) in enumerate(cols):
        vals = values[metric]
        pos = sorted(v for v in vals.values() if math.isfinite(v) and v > 0)
        ref = pos[len(pos) // 2] if pos else 1.0
        for r, (name, _, _) in enumerate(rows):
            v = vals.get(name)
            if v is None:
                cells[r].append(missing)
            elif not math.isfinite(v):
                cells[r].append(nonfinite)
            else:
                q = round(min(max(math.log10(max(v, 1e-30) / ref) / SPAN, -1.0), 1.0) * 128)
                cells[r].append(SCALE[q + 128] * cw)
            if history.marked(name, flagged.get(name)):
                marks.append((x0 + k * cw, y0 + r * ch))
    for r, line in enumerate(cells):  # each row of cells is one line of pixels, repeated ch times
        pixels = b"".join(line)
        for y in range(y0 + r * ch, y0 + (r + 1) * ch):
            o = 3 * (y * width + x0)
            c.px[o:o + len(pixels)] = pixels
    for x, y in marks:
        if dot >= 3:
            c.rect(x + (cw - dot) // 2 - 1, y + (ch - dot) // 2 - 1, dot + 2, dot + 2, WHITE)
        c.rect(x + (cw - dot) // 2, y + (ch - dot) // 2, dot, dot, BLACK)
    # row labels, as many as fit; red for a layer flagged at the latest step
    every = max(1, math.ceil((LINE + 1) / ch))
    last = cols[-1][3] if cols else {}
    for r, (name, _, _) in enumerate(rows):
        if r % every == 0 or (r == len(rows) - 1 and r % every >= every // 2 + 1):
            label = labels[r]
            ty = y0 + r * ch + ch // 2 - 3
            red = history.marked(name, last.get(name))
            c.text(x0 - 4 - text_width(label), max(ty, y0 - 2), label, FORWARD if red else BLACK)
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
    # colour bar and the legend
    by = ty + LINE + 3
    bx = c.text(4, by, lo) + 3
    for i in range(bar_w):
        c.rect(bx + i, by, 1, 7, diverging(2 * i / (bar_w - 1) - 1))
    c.rect(bx + bar_w // 2, by - 1, 1, 9, BLACK)
    lx = c.text(bx + bar_w + 3, by, hi) + 12
    for color, label in legend:
        c.rect(lx, by, 7, 7, color)
        lx = c.text(lx + 9, by, label) + 9
    return c


def render_profile(history: History) -> Canvas:
    """The depth profile of the latest recorded step: act std (forward) and grad std (backward) against the
    layer index, log y; the first recorded step in faint dashes; layers whose flag is a finding marked under it."""
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
    flagged = [layer.index for layer in last.layers if history.marked(layer_tag(layer.name), frozenset(layer.status))]
    ty = top + ph + LINE + 3
    for i in flagged:
        X = px(i)
        for k in range(4):
            c.rect(X - k, ty + k, 2 * k + 1, 1, BLACK)
    note = "^ FLAGGED AT THIS STEP" if flagged else "NOTHING FLAGGED AT THIS STEP"
    c.text(left, H - LINE, f"LAYER INDEX   {note}", GREY)
    return c
