"""TensorBoard sink: what one recorded step looks like in TensorBoard.

Per recorded step, into the run's writer (one event holding all of it):

* scalars ``<metric>/<layer>``, ``log10_act_std/<layer>`` and ``log10_grad_std/<layer>`` (the stds on a
  log scale: TensorBoard's layouts cannot ask for a log axis), ``torchdiag/flagged_layers`` (how many
  layers are flagged) and the optimizer/AMP step figures when there are any;
* ``torchdiag/state``: the step's flags and suggested scales as JSON in a tensor of torchdiag's own plugin
  (no dashboard shows it; ``torchdiag summarize`` reads it). Per-layer flags are not scalars: a 0/1 line
  is what TensorBoard's smoothing turns into waves, and the overview heatmap shows them per cell;
* histograms ``act/<layer>`` and ``grad/<layer>`` on histogram steps (``vocab.histogram_window``: steps
  0, 1, 2, 4... up to ``histogram_every``, then every ``histogram_every``; binned on the device by
  ``buffer.Recorder``, written raw);
* text: the new warnings (``torchdiag/warnings``) and the report table (``torchdiag/report``)
  when warnings are new, every ``profile_every`` steps and at close;
* the overview images ``0_overview/...`` (first in TensorBoard's tag order, so the first cards of the
  default dashboard): layers x recorded steps heatmaps of act_std and grad_std (log colour scale against
  the median layer at the first recorded step, flagged cells dotted) and the depth profile (std against
  layer index, forward and backward, log y). Drawn here in pure Python (no imaging library) at steps
  0, 1, 2, 4... up to ``overview_every``, then every ``overview_every`` steps, and at close;
* when new: the layer list (``torchdiag/layers`` as a markdown table, ``torchdiag/layer_index`` as JSON)
  and a custom-scalars layout holding only charts whose tags exist (rewritten when new tags appear).
"""

from __future__ import annotations

import atexit
import json
import math
import re
import struct
import weakref
import zlib
from collections.abc import Iterable
from typing import Any

from ..config import Config
from ..report import Report
from ..vocab import Histogram, histogram_window

# report attribute -> TensorBoard metric name
SCALARS = {
    "act_mean": "act_mean",
    "act_std": "act_std",
    "grad_std": "grad_std",
    "grad_norm": "grad_norm",
    "weight_std": "weight_std",
    "zero_fraction": "zero_frac",
    "gain": "gain",
    "update_ratio": "update_ratio",
    "attention_logit_max": "attention_logit_max",
    "attention_entropy": "attention_entropy",
    "output_logz": "output_logz",
    "adam_grad_rms": "adam_grad_rms",
}
LOG10 = {"act_std": "log10_act_std", "grad_std": "log10_grad_std"}  # metric -> its log10 twin
FLUSH_SECS = 30  # an owned writer flushes at least this often: a hard crash loses at most this much
PROFILE_DIR = "depth_profile"  # torchdiag < 0.2 wrote depth-profile sub-runs there; summarize skips them
FLAGGED_TAG = "torchdiag/flagged_layers"
LAYERS_TAG = "torchdiag/layers"
LAYER_INDEX_TAG = "torchdiag/layer_index"
STATE_TAG = "torchdiag/state"
WARNINGS_TAG = "torchdiag/warnings"
REPORT_TAG = "torchdiag/report"
TEXT_SUFFIX = "/text_summary"  # torch's add_text appends this to the tag
PLUGIN = "torchdiag"  # plugin name of the JSON tensors (no TensorBoard dashboard shows them)
SCHEMA = 1
STEP_TAGS = ("optim/grad_norm_preclip", "optim/grad_norm_postclip", "optim/clipped", "amp/scale",
             "amp/skipped_steps")
OVERVIEW = "0_overview"  # digits sort before letters: these are the first cards of the default dashboard
HEATMAP_TAGS = {"act_std": f"{OVERVIEW}/1_act_std_layer_x_step", "grad_std": f"{OVERVIEW}/2_grad_std_layer_x_step"}
PROFILE_TAG = f"{OVERVIEW}/3_depth_profile"
MAX_COLUMNS = 128  # heatmap columns kept: beyond, neighbouring columns merge (flags of either, later value)
SPAN = 3.0  # the heatmap colour saturates at 10**SPAN times (or 1/10**SPAN of) the median layer's std

# writers that already hold torchdiag's one-time summaries: writer -> what its layout and layer list hold
_WRITTEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def open_writer(logdir: str) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    use_compiled_crc()
    return SummaryWriter(log_dir=logdir, flush_secs=FLUSH_SECS)


def use_compiled_crc() -> bool:
    """Give TensorBoard's event writer a compiled CRC32C when ``google-crc32c`` is installed.

    Without TensorFlow, TensorBoard checksums every event record in pure Python (~0.3 ms per KB,
    on the writer thread but holding the GIL). ``pip install torchdiag[fast]`` brings the
    compiled one; it is checked against TensorBoard's own on a test vector before it is used.
    Returns whether the compiled CRC is in use.
    """
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if getattr(record_writer.masked_crc32c, "_torchdiag", False):
        return True
    pure = record_writer.masked_crc32c

    def masked_crc32c(data: bytes) -> int:
        crc = google_crc32c.value(bytes(data))
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    probe = bytes(range(256)) * 3
    if masked_crc32c(probe) != pure(probe):  # pragma: no cover - a broken build: keep the pure one
        return False
    masked_crc32c._torchdiag = True  # type: ignore[attr-defined]
    record_writer.masked_crc32c = masked_crc32c
    return True


def layer_tag(name: str) -> str:
    """The tag suffix of a layer (the root module has the empty name)."""
    return name or "(root)"


def writer_logdir(writer: Any) -> str | None:
    """The directory a ``SummaryWriter`` (or look-alike) writes into, if it says."""
    get = getattr(writer, "get_logdir", None)
    d = get() if callable(get) else getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
    return str(d) if d else None


def block_of(name: str) -> str | None:
    """The repeated block a layer belongs to: its name up to the first block index (``encoder.layers.3``),
    else its top-level module (``stem`` of ``stem.conv``); None for a top-level layer (``0``, ``head``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else None


def custom_layout(layer_names: Iterable[str], metrics: Iterable[str], step_tags: Iterable[str] = (),
                  ) -> dict[str, dict[str, list]]:
    """The custom-scalars layout, with a chart only for tags that exist: one chart per metric written (all
    layers, one line each; the stds as their log10 tags), one per repeated block of two layers or more (its
    layers' log10 act_std and grad_std together), and the step totals (flagged layers, optimizer, AMP)."""
    metrics = set(metrics)
    per_metric = {}
    for m in SCALARS.values():
        if m in metrics:
            title, tag = (f"{m} (log10)", LOG10[m]) if m in LOG10 else (m, m)
            per_metric[title] = ["Multiline", [f"^{re.escape(tag)}/"]]
    groups: dict[str, int] = {}
    for name in layer_names:
        b = block_of(layer_tag(name))
        if b is not None:
            groups[b] = groups.get(b, 0) + 1
    blocks = {}
    if "act_std" in metrics or "grad_std" in metrics:
        wanted = [b for b, n in groups.items() if n >= 2]
        for b in wanted if len(wanted) <= 64 else []:
            esc = re.escape(b)
            blocks[f"{b}: log10 act_std (forward) and log10 grad_std (backward)"] = [
                "Multiline", [rf"^log10_act_std/{esc}(\.|$)", rf"^log10_grad_std/{esc}(\.|$)"]]
    totals = {"flagged layers (count)": ["Multiline", [f"^{re.escape(FLAGGED_TAG)}$"]]}
    for tag in STEP_TAGS:
        if tag in set(step_tags):
            totals[tag] = ["Multiline", [f"^{re.escape(tag)}$"]]
    layout = {"torchdiag: one chart per metric, one line per layer": per_metric}
    if blocks:
        layout["torchdiag: repeated blocks, forward and backward (log10 std)"] = blocks
    layout["torchdiag: per step"] = totals
    return layout


def layers_markdown(report: Report) -> str:
    """The layer list as a markdown table (for people: the Text dashboard)."""
    rows = ["| # | layer | type |", "|---|---|---|"]
    for layer in report.layers:
        rows.append(f"| {layer.index} | {_md_cell(layer_tag(layer.name))} | {_md_cell(layer.module_type)} |")
    return "\n".join(rows)


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|")


def report_markdown(report: Report) -> str:
    return "```\n" + str(report) + "\n```"


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _short(v: float) -> float:
    return float(f"{v:.4g}") if math.isfinite(v) else v


# ------------------------------------------------------------------ pictures (pure Python PNG)
def png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (rows top to bottom, 3 bytes a pixel)."""
    stride = 3 * width
    raw = b"".join(b"\x00" + bytes(rgb[y * stride:(y + 1) * stride]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# a 5x7 font: each glyph is 7 rows of 5 bits (the high bit left); letters upper case only
_FONT = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16), "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31), "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17), "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17), "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8), ":": (0, 12, 12, 0, 12, 12, 0),
    "-": (0, 0, 0, 31, 0, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0), "/": (0, 1, 2, 4, 8, 16, 0),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), "=": (0, 0, 31, 0, 31, 0, 0),
    "%": (24, 25, 2, 4, 8, 19, 3), "<": (2, 4, 8, 16, 8, 4, 2), ">": (8, 4, 2, 1, 2, 4, 8),
    "_": (0, 0, 0, 0, 0, 0, 31), "×": (0, 17, 10, 4, 10, 17, 0), "#": (10, 10, 31, 10, 31, 10, 10),
    "?": (14, 17, 1, 2, 4, 0, 4), "!": (4, 4, 4, 4, 4, 0, 4), "*": (0, 4, 21, 14, 21, 4, 0),
    "[": (14, 8, 8, 8, 8, 8, 14), "]": (14, 2, 2, 2, 2, 2, 14), "'": (4, 4, 8, 0, 0, 0, 0),
    "…": (0, 0, 0, 0, 0, 0, 21), "^": (4, 10, 17, 0, 0, 0, 0),
}
# each glyph's pixels as (column, row)
_GLYPHS = {ch: [(c, r) for r, bits in enumerate(rows) for c in range(5) if bits & (16 >> c)]
           for ch, rows in _FONT.items()}
CHAR_W, CHAR_H = 6, 8  # a glyph and its spacing
WHITE, BLACK, GREY, MISSING = (255, 255, 255), (0, 0, 0), (120, 120, 120), (200, 200, 200)
NONFINITE = (150, 0, 200)  # NaN/Inf: a colour that the blue-white-red scale never takes
FORWARD, BACKWARD = (202, 64, 42), (33, 102, 172)
# ColorBrewer RdBu (reversed): low = blue, the reference = near white, high = red
_DIVERGING = ((5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240), (247, 247, 247),
              (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31))


def diverging(t: float) -> tuple[int, int, int]:
    """The colour of ``t`` in [-1, 1] (clamped): -1 dark blue, 0 near white, +1 dark red."""
    t = min(max(t, -1.0), 1.0)
    x = (t + 1) / 2 * (len(_DIVERGING) - 1)
    i = min(int(x), len(_DIVERGING) - 2)
    f = x - i
    a, b = _DIVERGING[i], _DIVERGING[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))  # type: ignore[return-value]


_SCALE = [bytes(diverging((i - 128) / 128)) for i in range(257)]  # the scale in 257 steps, as pixel bytes


def _mix(c: tuple[int, int, int], w: float) -> tuple[int, int, int]:
    """``c`` faded towards white by ``w`` (0: as is, 1: white)."""
    return tuple(round(v + (255 - v) * w) for v in c)  # type: ignore[return-value]


class Canvas:
    """An RGB pixel buffer with rectangles, lines and 5x7 text, encoded as PNG."""

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = WHITE) -> None:
        self.width, self.height = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            o = 3 * (yy * self.width + x0)
            self.px[o:o + len(row)] = row

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            o = 3 * (y * self.width + x)
            self.px[o:o + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], thick: int = 1,
             dash: int = 0) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:
            if not dash or (n // dash) % 2 == 0:
                self.rect(x0 - thick // 2, y0 - thick // 2, thick, thick, color)
            n += 1
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int] = BLACK, scale: int = 1) -> int:
        """Draw ``s`` with its top left at (x, y), each font pixel ``scale`` x ``scale``; returns the x after it."""
        for ch in s.upper():
            for c, r in _GLYPHS.get(ch, _GLYPHS["?"]):
                if scale == 1:
                    self.dot(x + c, y + r, color)
                else:
                    self.rect(x + c * scale, y + r * scale, scale, scale, color)
            x += CHAR_W * scale
        return x

    def png(self) -> bytes:
        return png(self.width, self.height, self.px)


def text_width(s: str, scale: int = 1) -> int:
    return CHAR_W * scale * len(s)


def _elide(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n // 3] + "…" + s[len(s) - (n - 1 - n // 3):]


def _fmt(v: float) -> str:
    return f"{v:.2g}".upper().replace("E-0", "E-").replace("E+0", "E")


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
        return bool(problems) and any((name, p) in self.found for p in problems)

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
        return [_elide(f"{i} {t}" if n == str(i) else f"{i} {n}", 22) for n, i, t in rows]
    return [str(i) for _, i, _ in rows]


def render_heatmap(history: History, metric: str) -> Canvas:
    """Layers (rows, execution order) x recorded steps (columns). Colour: log10 of the layer's std over the
    median layer's std at the same step (blue below, red above, saturating at ``SPAN`` decades), so that a
    column shows how the signal drifts with depth at that step. A black dot marks a flagged cell whose flag is a
    finding of the run (``torchdiag.verdict``: not a one-step wobble), violet a NaN/Inf value, grey a layer that did
    not run."""
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
                cells[r].append(_SCALE[q + 128] * cw)
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
            series.append((pts, _mix(color, 0.5) if faint else color, faint))
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


def _image_value(tag: str, canvas: Canvas) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary.Value(tag=tag, image=Summary.Image(height=canvas.height, width=canvas.width, colorspace=3,
                                                      encoded_image_string=canvas.png()))


def _json_value(tag: str, obj: Any) -> Any:
    """A ``Summary.Value`` holding ``obj`` as JSON in a string tensor of torchdiag's own plugin."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.types_pb2 import DT_STRING

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN, content=_PLUGIN_CONTENT))
    data = json.dumps(obj, separators=(",", ":")).encode()
    return Summary.Value(tag=tag, metadata=meta, tensor=TensorProto(dtype=DT_STRING, string_val=[data]))


_PLUGIN_CONTENT = json.dumps({"schema": SCHEMA}).encode()


class TensorBoardSink:
    """Writes each report into a ``SummaryWriter``; closes it only if it opened it.

    An owned writer is also flushed and closed at interpreter exit (``atexit``, unregistered by
    ``close``); a user's writer is flushed there and never closed.
    """

    def __init__(self, writer: Any, owned: bool, config: Config | None = None) -> None:
        config = Config.defaults() if config is None else config
        self.writer = writer
        self.owned = owned
        self.profile_every = config.profile_every
        self.overview_every = config.overview_every
        self.history = History()
        self._last: Report | None = None
        self._profile_window = -1
        self._overview_window = -1
        self._overview_step: int | None = None
        self._report_text_step: int | None = None
        self._closed = False
        fw = getattr(writer, "_get_file_writer", None)
        self._fw = fw if callable(fw) else None  # a SummaryWriter: events of our own (images, JSON, layout)
        self._can_hist = callable(getattr(writer, "add_histogram_raw", None)) or self._fw is not None
        self._can_text = callable(getattr(writer, "add_text", None))
        atexit.register(self._at_exit)

    # ------------------------------------------------------------ per step
    def write(self, report: Report, warnings: list[str], histograms: list[Histogram] | None = None) -> None:
        step = report.step
        self._last = report
        self.history.add(report)
        metrics, steps = self._write_scalars(report)
        self._write_once(report, metrics, steps)
        if histograms and self._can_hist:
            add_histograms(self.writer, histograms, step)
            # Let the writer's thread checksum them now (pure-Python CRC, ~1 KB per histogram) while this thread
            # waits, rather than fight the next step's forward for the GIL (measured: about twice as long).
            flush = getattr(self.writer, "flush", None)
            if callable(flush):
                flush()
        if warnings and self._can_text:
            self.writer.add_text(WARNINGS_TAG, "\n\n".join(f"- {m}" for m in warnings), step)
        window = histogram_window(step, self.overview_every) if self.overview_every else -1
        if window > self._overview_window:
            self._overview_window = window
            self._write_overview()
        if self.profile_every and step // self.profile_every > self._profile_window:
            self._profile_window = step // self.profile_every
            self._write_report_text(report)
        elif warnings:
            self._write_report_text(report)

    def _write_once(self, report: Report, metrics: set[str], steps: set[str]) -> None:
        """The layer list and the custom-scalars layout, when this writer does not hold them yet (a second watch
        on the same writer adds nothing unless it has new layers or tags)."""
        w = self.writer
        try:
            known = _WRITTEN.setdefault(w, {"layers": {}, "metrics": set(), "steps": set()})
        except TypeError:  # a writer that cannot be weakly referenced: remember on the sink
            known = self.__dict__.setdefault("_known", {"layers": {}, "metrics": set(), "steps": set()})
        new_layers = [x for x in report.layers if layer_tag(x.name) not in known["layers"]]
        if not new_layers and metrics <= known["metrics"] and steps <= known["steps"]:
            return
        for x in new_layers:
            known["layers"][layer_tag(x.name)] = (x.index, x.module_type)
        known["metrics"] |= metrics
        known["steps"] |= steps
        if new_layers:
            if self._can_text:
                w.add_text(LAYERS_TAG, layers_markdown(report), report.step)
            if self._fw is not None:
                rows = [{"index": i, "name": n, "type": t} for n, (i, t) in known["layers"].items()]
                self._fw().add_summary(_summary([_json_value(LAYER_INDEX_TAG, rows)]), report.step)
        layout = custom_layout(list(known["layers"]), known["metrics"], known["steps"])
        if self._fw is not None:  # at the report's step, not 0: an earlier step makes TensorBoard purge later events
            from torch.utils.tensorboard.summary import custom_scalars

            self._fw().add_summary(custom_scalars(layout), report.step)
        elif callable(getattr(w, "add_custom_scalars", None)):
            w.add_custom_scalars(layout)

    @staticmethod
    def _step_values(report: Report) -> list[tuple[str, float | None]]:
        return list(zip(STEP_TAGS, (report.grad_norm_preclip, report.grad_norm_postclip,
                                    None if report.clipped is None else float(report.clipped), report.amp_scale,
                                    report.amp_skipped_steps)))

    def _write_scalars(self, report: Report) -> tuple[set[str], set[str]]:
        """The step's scalars and state record, in one event; returns the metrics and step tags written."""
        values: list[tuple[str, float]] = []
        status: dict[str, list[str]] = {}
        suggest: dict[str, list] = {}
        metrics: set[str] = set()
        for layer in report.layers:
            name = layer_tag(layer.name)
            for attr, metric in SCALARS.items():
                v = getattr(layer, attr, None)
                if v is not None:
                    metrics.add(metric)
                    values.append((f"{metric}/{name}", float(v)))
                    if metric in LOG10 and v != 0:  # a zero std (a dead layer) has no log: the line breaks
                        values.append((f"{LOG10[metric]}/{name}", math.log10(v) if v > 0 else math.nan))
            if layer.status:
                status[name] = sorted(layer.status)
            if layer.init_fixes:  # the suggestions the live report shows
                suggest[name] = [_short(layer.suggested_scale), layer.nonlinearity]
        values.append((FLAGGED_TAG, float(len(report.flagged))))
        steps = [(t, float(v)) for t, v in self._step_values(report) if v is not None]
        values.extend(steps)
        state = {"step": report.step, "status": status, "suggest": suggest,
                 "first_nonfinite": report.first_nonfinite}
        add_scalars(self.writer, values, report.step, extra=[_json_value(STATE_TAG, state)] if self._fw else None)
        return metrics, {t for t, _ in steps}

    def _write_report_text(self, report: Report) -> None:
        if self._can_text and self._report_text_step != report.step:
            self.writer.add_text(REPORT_TAG, report_markdown(report), report.step)
            self._report_text_step = report.step

    def _write_overview(self) -> None:
        """The overview images of the steps so far, at the latest recorded step (once per step)."""
        last = self.history.last
        if self._fw is None or last is None or self._overview_step == last.step:
            return
        self._overview_step = last.step
        images = [_image_value(tag, render_heatmap(self.history, m)) for m, tag in HEATMAP_TAGS.items()]
        images.append(_image_value(PROFILE_TAG, render_profile(self.history)))
        self._fw().add_summary(_summary(images), last.step)

    # ------------------------------------------------------------ end
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        try:
            last = self._last
            if last is not None:  # the last recorded step always gets the overview and the report table
                if self.overview_every:
                    self._write_overview()
                self._write_report_text(last)
        finally:
            if self.owned:
                self.writer.close()
            else:
                self.writer.flush()

    def _at_exit(self) -> None:
        """Interpreter exit inside a watch: the last overview, and the queued events onto disk."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.overview_every:
                self._write_overview()
        except Exception:  # noqa: BLE001, S110 - nothing useful to do at interpreter exit
            pass
        try:
            if self.owned:
                self.writer.close()
            else:
                self.writer.flush()
        except Exception:  # noqa: BLE001, S110 - nothing useful to do at interpreter exit
            pass


def _summary(values: list) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=values)


def add_scalars(writer: Any, values: list[tuple[str, float]], step: int, extra: list | None = None) -> None:
    """Write many scalars at one step: one event holding them all with a ``SummaryWriter``
    (about 10x cheaper than one ``add_scalar`` each), else one ``add_scalar`` each. ``extra``: more
    ``Summary.Value``\\ s for the same event (a ``SummaryWriter`` only)."""
    fw = getattr(writer, "_get_file_writer", None)
    if not callable(fw):
        for tag, v in values:
            writer.add_scalar(tag, v, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    fw().add_summary(Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values] + list(extra or ())),
                     step)


def add_histograms(writer: Any, histograms: list[Histogram], step: int) -> None:
    """Write a step's histograms as ``act/<layer>`` / ``grad/<layer>``: one event holding them all with a
    ``SummaryWriter`` (one ``add_histogram_raw`` each would block on its writer's 10-event queue).

    Bucket limits are the right edges, led by an empty bucket whose limit is the left edge of the
    first bin (TensorBoard's convention, as ``add_histogram`` writes it)."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    fw = getattr(writer, "_get_file_writer", None)
    values = []
    for h in histograms:
        tag, limits, counts = f"{h.quantity}/{layer_tag(h.layer)}", list(h.edges), [0.0, *h.counts]
        if callable(fw):
            values.append(Summary.Value(tag=tag, histo=HistogramProto(
                min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares, bucket_limit=limits,
                bucket=counts)))
        else:
            writer.add_histogram_raw(tag, min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
                                     bucket_limits=limits, bucket_counts=counts, global_step=step)
    if values:
        fw().add_summary(Summary(value=values), step)
