"""TensorBoard sink: what one recorded step looks like in TensorBoard.

Per recorded step, into the run's writer:

* scalars ``<metric>/<layer>`` (one event per step holding them all), ``torchdiag/flagged_layers``
  and, for each (problem, layer) pair that has ever been flagged, ``flag/<problem>/<layer>``:
  1 while flagged, 0 once it recovers (healthy layers add no tags);
* histograms ``act/<layer>`` and ``grad/<layer>`` on histogram steps (binned on the device by
  ``buffer.Recorder``, written raw);
* text: the new warnings (``torchdiag/warnings``) and the report table (``torchdiag/report``)
  when warnings are new, at each depth-profile snapshot and at close;
* once per writer: the layer list (``torchdiag/layers``: index, name, type) and a custom-scalars
  layout (one chart per metric, one per top-level block with forward and backward std).

The depth profile (act std and grad std against layer index) goes to a sub-run
``<log_dir>/depth_profile/step_<step>`` whose step axis is the layer index, one per snapshot.
"""

from __future__ import annotations

import atexit
import os
import re
import weakref
from typing import Any

from ..buffer import Histogram
from ..config import Config
from ..report import STATUSES, Report

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
}
FLUSH_SECS = 30  # an owned writer flushes at least this often: a hard crash loses at most this much
PROFILE_DIR = "depth_profile"
FLAGGED_TAG = "torchdiag/flagged_layers"
LAYERS_TAG = "torchdiag/layers"
WARNINGS_TAG = "torchdiag/warnings"
REPORT_TAG = "torchdiag/report"
TEXT_SUFFIX = "/text_summary"  # torch's add_text appends this to the tag

# writers that already hold torchdiag's one-time summaries (layout, layer list)
_INITIALISED: weakref.WeakSet = weakref.WeakSet()


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


def profile_run_dir(logdir: str, step: int) -> str:
    return os.path.join(logdir, PROFILE_DIR, f"step_{step:08d}")


def writer_logdir(writer: Any) -> str | None:
    """The directory a ``SummaryWriter`` (or look-alike) writes into, if it says."""
    get = getattr(writer, "get_logdir", None)
    d = get() if callable(get) else getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
    return str(d) if d else None


def custom_layout(layer_names: list[str]) -> dict[str, dict[str, list]]:
    """The custom-scalars layout: one chart per metric (all layers), one per top-level block
    (its layers' act_std and grad_std together), the depth profile and the flags."""
    metrics = {m: ["Multiline", [f"^{m}/"]] for m in SCALARS.values()}
    blocks: dict[str, list] = {}
    for name in layer_names:
        top = layer_tag(name).split(".", 1)[0]
        if top not in blocks:
            esc = re.escape(top)
            blocks[f"block {top}: act_std (forward) and grad_std (backward)"] = [
                "Multiline", [rf"^act_std/{esc}(\.|$)", rf"^grad_std/{esc}(\.|$)"]]
    return {
        "torchdiag: one chart per metric, all layers": metrics,
        "torchdiag: blocks, forward and backward": blocks,
        "torchdiag: depth profile (x axis = layer index, one line per snapshot)": {
            "act std against layer index": ["Multiline", [f"^{PROFILE_DIR}/act_std$"]],
            "grad std against layer index": ["Multiline", [f"^{PROFILE_DIR}/grad_std$"]],
        },
        "torchdiag: flags (1 = flagged)": {
            "flagged layers": ["Multiline", [f"^{re.escape(FLAGGED_TAG)}$"]],
            **{p: ["Multiline", [f"^flag/{p}/"]] for p in STATUSES},
        },
    }


def layers_markdown(report: Report) -> str:
    """The layer list as a markdown table (read back by ``torchdiag summarize``)."""
    rows = ["| # | layer | type |", "|---|---|---|"]
    for layer in report.layers:
        rows.append(f"| {layer.index} | {_md_cell(layer_tag(layer.name))} | {_md_cell(layer.module_type)} |")
    return "\n".join(rows)


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|")


def report_markdown(report: Report) -> str:
    return "```\n" + str(report) + "\n```"


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
        self._ever_flagged: dict[tuple[str, str], None] = {}  # ordered set of (problem, layer tag)
        self._last: Report | None = None
        self._profile_window = -1
        self._profiled_step: int | None = None
        self._report_text_step: int | None = None
        self._closed = False
        self._can_hist = callable(getattr(writer, "add_histogram_raw", None)) or callable(
            getattr(writer, "_get_file_writer", None))
        self._can_text = callable(getattr(writer, "add_text", None))
        atexit.register(self._at_exit)

    # ------------------------------------------------------------ per step
    def write(self, report: Report, warnings: list[str], histograms: list[Histogram] | None = None) -> None:
        step = report.step
        if self._last is None:
            self._first_write(report)
        self._last = report
        self._write_scalars(report)
        if histograms and self._can_hist:
            add_histograms(self.writer, histograms, step)
            # Let the writer's thread checksum them now (pure-Python CRC, ~1 KB per histogram) while this thread
            # waits, rather than fight the next step's forward for the GIL (measured: about twice as long).
            flush = getattr(self.writer, "flush", None)
            if callable(flush):
                flush()
        if warnings and self._can_text:
            self.writer.add_text(WARNINGS_TAG, "\n\n".join(f"- {m}" for m in warnings), step)
        if self.profile_every and step // self.profile_every > self._profile_window:
            self._profile_window = step // self.profile_every
            self._write_profile(report)
            self._write_report_text(report)
        elif warnings:
            self._write_report_text(report)

    def _first_write(self, report: Report) -> None:
        w = self.writer
        try:
            seen = w in _INITIALISED
        except TypeError:  # a writer that cannot be weakly referenced: treat as new
            seen = False
        if seen:
            return
        if self._can_text:
            w.add_text(LAYERS_TAG, layers_markdown(report), report.step)
        fw = getattr(w, "_get_file_writer", None)
        if callable(fw):  # at the report's step, not 0: an earlier step would make TensorBoard purge later events
            from torch.utils.tensorboard.summary import custom_scalars

            fw().add_summary(custom_scalars(custom_layout([x.name for x in report.layers])), report.step)
        elif callable(getattr(w, "add_custom_scalars", None)):
            w.add_custom_scalars(custom_layout([x.name for x in report.layers]))
        try:
            _INITIALISED.add(w)
        except TypeError:
            pass

    def _write_scalars(self, report: Report) -> None:
        values: list[tuple[str, float]] = []
        flagged_now = set()
        present = set()
        for layer in report.layers:
            name = layer_tag(layer.name)
            present.add(name)
            for attr, metric in SCALARS.items():
                v = getattr(layer, attr, None)
                if v is not None:
                    values.append((f"{metric}/{name}", float(v)))
            for problem in layer.status:
                flagged_now.add((problem, name))
                self._ever_flagged.setdefault((problem, name), None)
        for key in self._ever_flagged:
            if key[1] in present:
                values.append((f"flag/{key[0]}/{key[1]}", 1.0 if key in flagged_now else 0.0))
        values.append((FLAGGED_TAG, float(len(report.flagged))))
        for tag, v in (("optim/grad_norm_preclip", report.grad_norm_preclip),
                       ("optim/grad_norm_postclip", report.grad_norm_postclip),
                       ("optim/clipped", None if report.clipped is None else float(report.clipped)),
                       ("amp/scale", report.amp_scale),
                       ("amp/skipped_steps", report.amp_skipped_steps)):
            if v is not None:
                values.append((tag, float(v)))
        add_scalars(self.writer, values, report.step)

    def _write_report_text(self, report: Report) -> None:
        if self._can_text and self._report_text_step != report.step:
            self.writer.add_text(REPORT_TAG, report_markdown(report), report.step)
            self._report_text_step = report.step

    def _write_profile(self, report: Report) -> None:
        base = writer_logdir(self.writer)
        if base is None or self._profiled_step == report.step:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._profiled_step = report.step
        sub = SummaryWriter(log_dir=profile_run_dir(base, report.step))
        try:
            for layer in report.layers:
                values = [(f"{PROFILE_DIR}/{key}", float(v)) for key, v in
                          (("act_std", layer.act_std), ("grad_std", layer.grad_std)) if v is not None]
                if values:
                    add_scalars(sub, values, layer.index)
        finally:
            sub.close()

    # ------------------------------------------------------------ end
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        try:
            last = self._last
            if last is not None:  # the last recorded step always gets a profile and the report table
                if self.profile_every:
                    self._write_profile(last)
                self._write_report_text(last)
        finally:
            if self.owned:
                self.writer.close()
            else:
                self.writer.flush()

    def _at_exit(self) -> None:
        """Interpreter exit inside a watch: get the queued events onto disk (no new writers now)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.owned:
                self.writer.close()
            else:
                self.writer.flush()
        except Exception:  # noqa: BLE001, S110 - nothing useful to do at interpreter exit
            pass


def add_scalars(writer: Any, values: list[tuple[str, float]], step: int) -> None:
    """Write many scalars at one step: one event holding them all with a ``SummaryWriter``
    (about 10x cheaper than one ``add_scalar`` each), else one ``add_scalar`` each."""
    fw = getattr(writer, "_get_file_writer", None)
    if not callable(fw):
        for tag, v in values:
            writer.add_scalar(tag, v, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    fw().add_summary(Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values]), step)


def add_histograms(writer: Any, histograms: list[Histogram], step: int) -> None:
    """Write a step's histograms as ``act/<layer>`` / ``grad/<layer>``: one event holding them all with a
    ``SummaryWriter`` (one ``add_histogram_raw`` each would block on its writer's 10-event queue).

    Bucket limits are the right edges, led by an empty bucket whose limit is the left edge of the
    first bin (TensorBoard's convention, as ``add_histogram`` writes it)."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    fw = getattr(writer, "_get_file_writer", None)
    values = []
    for h in histograms:
        tag, limits, counts = f"{h.kind}/{layer_tag(h.layer)}", list(h.edges), [0.0, *h.counts]
        if callable(fw):
            values.append(Summary.Value(tag=tag, histo=HistogramProto(
                min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares, bucket_limit=limits,
                bucket=counts)))
        else:
            writer.add_histogram_raw(tag, min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
                                     bucket_limits=limits, bucket_counts=counts, global_step=step)
    if values:
        fw().add_summary(Summary(value=values), step)
