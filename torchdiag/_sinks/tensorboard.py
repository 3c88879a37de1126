"""TensorBoard sink: what one recorded step looks like in TensorBoard.

Per recorded step, into the run's writer (one event holding all of it):

* scalars: first (``0_overview/``, the first group of the Scalars and Time Series pages)
  ``0_overview/0_flagged_layers`` (how many layers are flagged) and, from the first step a problem is seen on,
  ``0_overview/0_flagged/<problem>`` (how many layers have it); then, grouped by metric, ``<metric>/<layer>``
  (``CORE_METRICS``; every metric with ``layer_scalars: all``), ``log10_act_std/<layer>``,
  ``log10_grad_std/<layer>`` (the stds on a log scale: TensorBoard's layouts cannot ask for a log axis) and
  ``log10_attention_entropy_deficit/<layer>``; the optimizer/AMP step figures when there are any;
* ``torchdiag/state``: the step's flags and suggested scales as JSON in a tensor of torchdiag's own plugin
  (no dashboard shows it; ``torchdiag summarize`` reads it). Per-layer flags are not scalars: a 0/1 line
  is what TensorBoard's smoothing turns into waves, and the overview heatmap shows them per cell;
* histograms ``act/<layer>`` and ``grad/<layer>`` on histogram steps (``vocab.histogram_window``: the first
  recorded step of each ``histogram_every`` steps, 0, N, 2N...; binned on the device by ``buffer.Recorder``,
  written raw);
* text: the new warnings (``torchdiag/1_warnings``) and the report table (``torchdiag/2_report``)
  when warnings are new, every ``profile_every`` steps and at close;
* the overview images ``0_overview/...`` (first in TensorBoard's tag order, so the first cards of the
  default dashboard): layers x recorded steps heatmaps of act_std and grad_std (log colour scale against
  what each layer is expected to be, ``overview.History.expected``; the layer causing a finding dotted) and
  the depth profile (std against layer index, forward and backward, log y). Drawn here in pure Python (no
  imaging library) at the first recorded step of each ``overview_every`` steps after the first window (N,
  2N...; the time budget may lengthen the windows), and at close: each image holds every step so far, so
  earlier ones would only repeat part of the last;
* when new: the layer list (``torchdiag/3_layers`` as a markdown table, ``torchdiag/layer_index`` as JSON)
  and a custom-scalars layout holding only charts whose tags exist (rewritten when new tags appear).

Every tag is named in ``tags`` (the schema ``summarize`` reads back with); the images are drawn by
``overview`` (on ``png``'s canvas), the layout by ``layout``. This module routes a report into a writer.
"""

from __future__ import annotations

import atexit
import json
import math
import weakref
from typing import TYPE_CHECKING, Any

from .._report.report import Report
from .._report.tags import (
    CORE_METRICS,
    DEFICIT,
    FLAGGED_TAG,
    HEADROOM_TAG,
    HEATMAP_TAGS,
    LAYER_INDEX_TAG,
    LAYERS_TAG,
    LOG10,
    PLUGIN,
    PROFILE_TAG,
    REPORT_TAG,
    SCALARS,
    SCHEMA,
    STATE_TAG,
    STEP_TAGS,
    WARNINGS_TAG,
    deficit_tag,
    histogram_tag,
    layer_index_record,
    layer_tag,
    layers_markdown,
    log10_tag,
    problem_tag,
    scalar_tag,
    state_record,
)
from .._vocab import Histogram
from ..config import Config
from .eventfiles import release_compiled_crc, use_compiled_crc
from .layout import custom_layout
from .overview import History, render_headroom, render_heatmap, render_profile
from .png import Canvas

if TYPE_CHECKING:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["FLUSH_SECS", "TensorBoardSink", "add_histograms", "add_scalars", "open_writer", "report_markdown",
           "use_compiled_crc", "writer_logdir"]

FLUSH_SECS = 30  # an owned writer flushes at least this often: a hard crash loses at most this much

# writers that already hold torchdiag's one-time summaries: writer -> what its layout and layer list hold
_WRITTEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def open_writer(logdir: str) -> SummaryWriter:
    from torch.utils.tensorboard import SummaryWriter

    crc = use_compiled_crc()  # released by the sink when it closes this writer
    try:
        return SummaryWriter(log_dir=logdir, flush_secs=FLUSH_SECS)
    except BaseException:
        if crc:
            release_compiled_crc()
        raise


def writer_logdir(writer: object) -> str | None:
    """The directory a ``SummaryWriter`` (or look-alike) writes into, if it says."""
    get = getattr(writer, "get_logdir", None)
    d = get() if callable(get) else getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
    return str(d) if d else None


def report_markdown(report: Report) -> str:
    return "```\n" + str(report) + "\n```"


def _short(v: float) -> float:
    return float(f"{v:.4g}") if math.isfinite(v) else v


def _image_value(tag: str, canvas: Canvas) -> Summary.Value:
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary.Value(tag=tag, image=Summary.Image(height=canvas.height, width=canvas.width, colorspace=3,
                                                      encoded_image_string=canvas.png()))


def _json_value(tag: str, obj: object) -> Summary.Value:
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
        self.writer = writer  # Any: a SummaryWriter, or a look-alike whose other methods are looked up first
        self.owned = owned
        self.profile_every = config.profile_every
        self.overview_every = config.overview_every
        self.overflow_margin = config.overflow_margin
        # every per-layer scalar at every recorded step, or the core ones (CORE_METRICS, the log10 and deficit twins)
        self.all_scalars = config.layer_scalars == "all"
        self._problems: set[str] = set()  # the problems seen so far: their counts are written from then on
        self.history = History()
        self._last: Report | None = None
        self._profile_window = -1
        self._overview_at = 0  # the last step whose window drew the images of the steps so far (N, 2N... and close)
        self._overview_step: int | None = None
        self._report_text_step: int | None = None
        self._closed = False
        fw = getattr(writer, "_get_file_writer", None)
        self._fw = fw if callable(fw) else None  # a SummaryWriter: events of our own (images, JSON, layout)
        self._can_hist = callable(getattr(writer, "add_histogram_raw", None)) or self._fw is not None
        self._can_text = callable(getattr(writer, "add_text", None))
        atexit.register(self._at_exit)

    # ------------------------------------------------------------ per step
    def write(self, report: Report, warnings: list[str], histograms: list[Histogram] | None = None,
              stretch: int = 1) -> None:
        """``stretch``: the time budget's lengthening of the overview windows (``_record.cadence.Cadence``)."""
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
        every = self.overview_every * stretch
        if every and step // every > self._overview_at // every:
            self._overview_at = step
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
                w.add_text(LAYERS_TAG, layers_markdown((x.index, x.name, x.module_type) for x in report.layers),
                           report.step)
            if self._fw is not None:
                rows = layer_index_record((i, n, t) for n, (i, t) in known["layers"].items())
                self._fw().add_summary(_summary([_json_value(LAYER_INDEX_TAG, rows)]), report.step)
        layout = custom_layout(list(known["layers"]), known["metrics"], known["steps"])
        if self._fw is not None:  # at the report's step, not 0: an earlier step makes TensorBoard purge later events
            from torch.utils.tensorboard.summary import custom_scalars

            self._fw().add_summary(custom_scalars(layout), report.step)
        elif callable(getattr(w, "add_custom_scalars", None)):
            w.add_custom_scalars(layout)

    @staticmethod
    def _step_values(report: Report) -> list[tuple[str, float | None]]:
        values = ((tag, getattr(report, attr)) for tag, attr in STEP_TAGS.items())
        return [(tag, None if v is None else float(v)) for tag, v in values]

    def _write_scalars(self, report: Report) -> tuple[set[str], set[str]]:
        """The step's scalars and state record, in one event; returns the metrics and step tags written."""
        values: list[tuple[str, float]] = []
        full = self.all_scalars
        status: dict[str, list[str]] = {}
        suggest: dict[str, list] = {}
        reasons: dict[str, dict[str, str]] = {}  # layer -> problem -> what it is blamed on
        metrics: set[str] = set()
        for layer in report.layers:
            name = layer_tag(layer.name)
            for attr, metric in SCALARS.items():
                v = getattr(layer, attr, None)
                if v is not None:
                    if full or metric in CORE_METRICS:
                        values.append((scalar_tag(attr, layer.name), float(v)))
                        metrics.add(metric)
                    if metric in LOG10 or metric in DEFICIT:
                        metrics.add(metric)  # the layout's chart of the metric plots its twin
                    if metric in LOG10 and v != 0:  # a zero std (a dead layer) has no log: the line breaks
                        values.append((log10_tag(attr, layer.name), math.log10(v) if v > 0 else math.nan))
                    if metric in DEFICIT and v < 1:  # 1 - entropy on a log axis (TensorBoard's shows 0.9999 as 1)
                        values.append((deficit_tag(attr, layer.name), math.log10(1 - v)))
            if layer.status:
                status[name] = sorted(layer.status)
                blamed = {f.problem: f.reason for f in layer.findings if f.reason}
                if blamed:
                    reasons[name] = blamed
            scale = layer.suggested_scale
            if layer.init_fixes and scale is not None:  # the suggestions the live report shows (init_fixes: a scale)
                suggest[name] = [_short(scale), layer.nonlinearity]
        values.append((FLAGGED_TAG, float(len(report.flagged))))
        counts: dict[str, int] = {}
        for layer in report.layers:
            for problem in layer.status:
                counts[problem] = counts.get(problem, 0) + 1
        self._problems |= set(counts)
        steps = [(t, float(v)) for t, v in self._step_values(report) if v is not None]
        steps += [(problem_tag(p), float(counts.get(p, 0))) for p in sorted(self._problems)]
        values.extend(steps)
        state = state_record(report.step, status, suggest, report.first_nonfinite, reasons)
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
        if self.history.has_headroom():
            images.append(_image_value(HEADROOM_TAG, render_headroom(self.history, math.log2(self.overflow_margin))))
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
                try:
                    self.writer.close()
                finally:
                    release_compiled_crc()  # (``open_writer`` took it for this writer)
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


def _summary(values: list[Summary.Value]) -> Summary:
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
        tag, limits, counts = histogram_tag(h.quantity, h.layer), list(h.edges), [0.0, *h.counts]
        if callable(fw):
            values.append(Summary.Value(tag=tag, histo=HistogramProto(
                min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares, bucket_limit=limits,
                bucket=counts)))
        else:
            writer.add_histogram_raw(tag, min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
                                     bucket_limits=limits, bucket_counts=counts, global_step=step)
    if values and callable(fw):  # values: only where the file writer is there
        fw().add_summary(Summary(value=values), step)
