"""The TensorBoard tag schema: every tag torchdiag writes, and the way back from a tag to what it holds.

A leaf (it imports nothing else of torchdiag): the sink (``_sinks/tensorboard.py``) names its tags here and
``summarize`` maps them back here, so that neither reads the other. Per recorded step:

* ``<metric>/<layer>``: a ``LayerReport`` attribute (``SCALARS``: attribute -> metric), and
  ``log10_act_std/<layer>``, ``log10_grad_std/<layer>`` (``LOG10``; TensorBoard's layouts have no log axis),
  ``log10_attention_entropy_deficit/<layer>`` (``DEFICIT``: log10(1 - entropy), readable on TensorBoard's axis);
* ``0_overview/0_flagged_layers`` (``torchdiag/flagged_layers`` in logs written before), the per-problem counts
  ``0_overview/0_flagged/<problem>`` and the step figures ``STEP_TAGS`` (tag -> ``Report`` attribute);
* ``torchdiag/state``: the step's flags and suggestions as JSON (``state_record``) in a tensor of the
  ``PLUGIN``, and ``torchdiag/layer_index``: the layer list as JSON (``layer_index_record``);
* histograms ``act/<layer>``, ``grad/<layer>``; texts ``torchdiag/warnings``, ``torchdiag/report`` and the
  layer list as a markdown table ``torchdiag/layers`` (``layers_markdown``, read back by ``parse_layers_markdown``
  for logs of torchdiag < 0.2, which wrote no ``layer_index``); the overview images ``0_overview/...``.

Logs of torchdiag < 0.2 also hold per-layer ``flag/<problem>/<layer>`` scalars (``parse_flag_tag``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# LayerReport attribute -> TensorBoard metric name
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
    "act_headroom": "act_headroom",
    "grad_headroom": "grad_headroom",
    "act_underflow": "act_underflow",
    "grad_underflow": "grad_underflow",
}
METRIC_ATTRS = {metric: attr for attr, metric in SCALARS.items()}  # the way back
LOG10 = {"act_std": "log10_act_std", "grad_std": "log10_grad_std"}  # metric -> its log10 twin
LOG10_ATTRS = {twin: METRIC_ATTRS[metric] for metric, twin in LOG10.items()}  # log10 twin -> LayerReport attribute
# metric -> its deficit twin, log10(1 - value): the attention entropy of an untrained transformer is 0.9999 of the
# uniform one, and TensorBoard's axis, which shows 3 or 4 digits, labels every tick of that chart "1"
DEFICIT = {"attention_entropy": "log10_attention_entropy_deficit"}
DEFICIT_ATTRS = {twin: METRIC_ATTRS[metric] for metric, twin in DEFICIT.items()}
# written at every recorded step (config layer_scalars: core), with the log10 and deficit twins; the rest only with
# layer_scalars: all
CORE_METRICS = frozenset({"act_mean", "gain", "update_ratio", "attention_logit_max", "output_logz",
                          "adam_grad_rms", "act_headroom", "grad_headroom", "act_underflow", "grad_underflow"})
OVERVIEW = "0_overview"  # digits sort before letters: the first group of the Scalars and Time Series pages
FLAGGED_TAG = f"{OVERVIEW}/0_flagged_layers"  # how many layers are flagged
PROBLEM_HEAD = f"{OVERVIEW}/0_flagged"  # ``0_overview/0_flagged/<problem>``: how many layers have that problem
OLD_SCALAR_TAGS = {FLAGGED_TAG: "torchdiag/flagged_layers"}  # their names in logs written before (read back too)
# the Text tab lists a run's tags in name order: the warnings first, then the report, then the layer list
WARNINGS_TAG = "torchdiag/1_warnings"
REPORT_TAG = "torchdiag/2_report"
LAYERS_TAG = "torchdiag/3_layers"
OLD_TEXT_TAGS = {WARNINGS_TAG: "torchdiag/warnings", REPORT_TAG: "torchdiag/report",
                 LAYERS_TAG: "torchdiag/layers"}  # their names in logs written before (read back too)
LAYER_INDEX_TAG = "torchdiag/layer_index"
STATE_TAG = "torchdiag/state"
TEXT_SUFFIX = "/text_summary"  # torch's add_text appends this to the tag
PLUGIN = "torchdiag"  # plugin name of the JSON tensors (no TensorBoard dashboard shows them)
SCHEMA = 1
# step-level tag -> Report attribute (``clipped`` as 0/1)
STEP_TAGS = {
    "optim/grad_norm_preclip": "grad_norm_preclip",
    "optim/grad_norm_postclip": "grad_norm_postclip",
    "optim/clipped": "clipped",
    "amp/scale": "amp_scale",
    "amp/skipped_steps": "amp_skipped_steps",
    "torchdiag/record_interval": "record_interval",
}
HISTOGRAMS = ("act", "grad")  # ``Histogram.quantity``: the tag's head
HEATMAP_TAGS = {"act_std": f"{OVERVIEW}/1_act_std_layer_x_step", "grad_std": f"{OVERVIEW}/2_grad_std_layer_x_step"}
PROFILE_TAG = f"{OVERVIEW}/3_depth_profile"
HEADROOM_TAG = f"{OVERVIEW}/4_float16_headroom_layer_x_step"  # written only where a layer computes in float16
PROFILE_DIR = "depth_profile"  # torchdiag < 0.2 wrote depth-profile sub-runs there; summarize skips them
FLAG_HEAD = "flag"  # torchdiag < 0.2: ``flag/<problem>/<layer>`` 0/1 scalars
ROOT = "(root)"


def layer_tag(name: str) -> str:
    """The tag suffix of a layer (the root module has the empty name)."""
    return name or ROOT


def scalar_tag(attr: str, layer: str) -> str:
    """``<metric>/<layer>`` of a ``LayerReport`` attribute in ``SCALARS``."""
    return f"{SCALARS[attr]}/{layer_tag(layer)}"


def log10_tag(attr: str, layer: str) -> str:
    """``log10_<metric>/<layer>`` of a ``LayerReport`` attribute whose metric has a log10 twin (``LOG10``)."""
    return f"{LOG10[SCALARS[attr]]}/{layer_tag(layer)}"


def deficit_tag(attr: str, layer: str) -> str:
    """``log10_<metric>_deficit/<layer>`` of a ``LayerReport`` attribute whose metric has a deficit twin
    (``DEFICIT``: the value is log10(1 - the attribute))."""
    return f"{DEFICIT[SCALARS[attr]]}/{layer_tag(layer)}"


def problem_tag(problem: str) -> str:
    """``0_overview/0_flagged/<problem>``: how many layers have ``problem`` at a step (written from the first step
    it is seen on)."""
    return f"{PROBLEM_HEAD}/{problem}"


def histogram_tag(quantity: str, layer: str) -> str:
    """``act/<layer>`` or ``grad/<layer>``."""
    return f"{quantity}/{layer_tag(layer)}"


def parse_scalar_tag(tag: str) -> tuple[str, str] | None:
    """``(LayerReport attribute, layer tag)`` of a per-layer metric tag; None for any other tag (log10 twins,
    step figures, torchdiag's own)."""
    head, _, rest = tag.partition("/")
    if head in METRIC_ATTRS and rest:
        return METRIC_ATTRS[head], rest
    return None


def parse_log10_tag(tag: str) -> tuple[str, str] | None:
    """``(LayerReport attribute, layer tag)`` of a log10 twin (``log10_act_std/<layer>``: the attribute is
    ``10 ** value``); None for any other tag."""
    head, _, rest = tag.partition("/")
    if head in LOG10_ATTRS and rest:
        return LOG10_ATTRS[head], rest
    return None


def parse_deficit_tag(tag: str) -> tuple[str, str] | None:
    """``(LayerReport attribute, layer tag)`` of a deficit twin (``log10_attention_entropy_deficit/<layer>``: the
    attribute is ``1 - 10 ** value``); None for any other tag."""
    head, _, rest = tag.partition("/")
    if head in DEFICIT_ATTRS and rest:
        return DEFICIT_ATTRS[head], rest
    return None


def parse_flag_tag(tag: str) -> tuple[str, str] | None:
    """``(problem, layer tag)`` of a ``flag/<problem>/<layer>`` scalar (torchdiag < 0.2); None otherwise."""
    head, _, rest = tag.partition("/")
    if head == FLAG_HEAD and "/" in rest:
        problem, _, layer = rest.partition("/")
        return problem, layer
    return None


def state_record(step: int, status: dict[str, list[str]], suggest: dict[str, list],
                 first_nonfinite: str | None, reasons: dict[str, dict[str, str]] | None = None) -> dict[str, object]:
    """The JSON of ``STATE_TAG``: per layer tag its problems (``status``), ``[suggested scale, nonlinearity]``
    (``suggest``) and what each problem is blamed on (``reasons``: problem -> reason) at this step."""
    record = {"step": step, "status": status, "suggest": suggest, "first_nonfinite": first_nonfinite}
    if reasons:
        record["reasons"] = reasons
    return record


def layer_index_record(layers: Iterable[tuple[int, str, str]]) -> list[dict[str, int | str]]:
    """The JSON of ``LAYER_INDEX_TAG`` from ``(index, layer tag, module type)`` rows."""
    return [{"index": i, "name": n, "type": t} for i, n, t in layers]


def parse_layer_index(record: Any) -> list[tuple[int, str, str]]:
    """``(index, layer tag, module type)`` rows of a ``LAYER_INDEX_TAG`` record."""
    return [(int(r["index"]), str(r["name"]), str(r["type"])) for r in record or [] if isinstance(r, dict)]


def layers_markdown(layers: Iterable[tuple[int, str, str]]) -> str:
    """The layer list as a markdown table (for people: the Text dashboard), from ``(index, name, type)`` rows."""
    rows = ["| # | layer | type |", "|---|---|---|"]
    for index, name, module_type in layers:
        rows.append(f"| {index} | {_md_cell(layer_tag(name))} | {_md_cell(module_type)} |")
    return "\n".join(rows)


def parse_layers_markdown(text: str) -> list[tuple[int, str, str]]:
    """``(index, layer tag, module type)`` rows of a ``layers_markdown`` table."""
    rows = []
    for line in text.splitlines():
        cells = _md_cells(line)
        if len(cells) == 3 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], cells[2]))
    return rows


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|")


def _md_cells(line: str) -> list[str]:
    """Cells of one markdown table row, honouring ``\\|`` and ``\\\\`` escapes."""
    cells, cur, i = [], [], 0
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            cur.append(line[i + 1])
            i += 2
            continue
        if c == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        cells.append("".join(cur).strip())
    return cells
