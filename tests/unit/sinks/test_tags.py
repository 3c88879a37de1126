"""The tag schema round trip: written by the TensorBoard sink into a real SummaryWriter, read with TensorBoard's own
EventAccumulator, mapped back through ``torchdiag._report.tags`` to the report that was written."""

from __future__ import annotations

import json
import math

import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from torch.utils.tensorboard import SummaryWriter

from torchdiag._report import tags
from torchdiag._report.report import Finding, LayerReport, Report
from torchdiag._sinks.tensorboard import TensorBoardSink
from torchdiag._vocab import Histogram
from torchdiag.cli._logreader import summarize_run
from torchdiag.config import Config


def _report() -> Report:
    """Every metric of ``tags.SCALARS`` on two layers (one of them the root, whose name is empty), flags, a
    suggestion and every step figure."""
    layers = []
    for i, name in enumerate(["", "enc.0|x"]):
        row = LayerReport(name=name, module_type="Linear", index=i, calls=1)
        for k, attr in enumerate(tags.SCALARS):
            setattr(row, attr, 0.5 + i + k / 8)
        row.attention_entropy = 0.999 - i / 10  # a fraction of the uniform entropy
        layers.append(row)
    bad = layers[1]
    bad.status = {"vanishing"}
    bad.suggested_scale, bad.nonlinearity = 1.41421, "relu"
    bad.findings = [Finding("vanishing", "forward", 0.01, 0.1, "vanishing_ratio", "'enc.0|x' vanishes", "enc.0|x")]
    return Report(layers=layers, step=3, grad_norm_preclip=2.5, grad_norm_postclip=1.0, clipped=True,
                  amp_scale=1024.0, amp_skipped_steps=2, record_interval=7)


def _write(tmp_path, report: Report) -> ea.EventAccumulator:
    hist = Histogram(layer="", quantity="act", min=-1.0, max=1.0, num=4, sum=0.0, sum_squares=2.0,
                     edges=[-1.0, 0.0, 1.0], counts=[2.0, 2.0])
    sink = TensorBoardSink(SummaryWriter(log_dir=str(tmp_path)), owned=True,
                           config=Config.from_dict({"layer_scalars": "all"}))
    sink.write(report, ["'enc.0|x' vanishes"], [hist])
    sink.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def test_every_scalar_tag_maps_back_to_the_report_it_was_written_from(tmp_path):
    report = _report()
    acc = _write(tmp_path, report)
    by_layer = {tags.layer_tag(layer.name): layer for layer in report.layers}
    mapped = set()
    for tag in acc.Tags()["scalars"]:
        (event,) = acc.Scalars(tag)
        assert event.step == report.step
        parsed = tags.parse_scalar_tag(tag)
        if parsed is not None:
            attr, layer = parsed
            assert event.value == pytest.approx(getattr(by_layer[layer], attr)), tag
            mapped.add((attr, layer))
        elif tag in tags.STEP_TAGS:
            assert event.value == pytest.approx(float(getattr(report, tags.STEP_TAGS[tag]))), tag
            mapped.add(tag)
        elif tag == tags.FLAGGED_TAG:
            assert event.value == len(report.flagged)
        elif tag.startswith(tags.PROBLEM_HEAD + "/"):  # how many layers have each problem seen
            assert tag == tags.problem_tag("vanishing") and event.value == 1
        elif tags.parse_deficit_tag(tag):  # the attention entropy's deficit: log10(1 - entropy)
            attr, layer = tags.parse_deficit_tag(tag)
            assert tag == tags.deficit_tag(attr, by_layer[layer].name)
            assert event.value == pytest.approx(math.log10(1 - getattr(by_layer[layer], attr)))
        else:  # the only other scalars: the log10 twins of the stds
            head, _, layer = tag.partition("/")
            attr = next(a for a, m in tags.SCALARS.items() if tags.LOG10.get(m) == head)
            assert tag == tags.log10_tag(attr, by_layer[layer].name)
            assert event.value == pytest.approx(math.log10(getattr(by_layer[layer], attr)))
    assert mapped == {(a, n) for a in tags.SCALARS for n in by_layer} | set(tags.STEP_TAGS)
    assert acc.Tags()["histograms"] == [tags.histogram_tag("act", "")] == ["act/(root)"]


def test_the_json_records_and_the_layer_table_map_back(tmp_path):
    report = _report()
    acc = _write(tmp_path, report)
    (state,) = acc.Tensors(tags.STATE_TAG)
    assert json.loads(state.tensor_proto.string_val[0]) == tags.state_record(
        3, {"enc.0|x": ["vanishing"]}, {"enc.0|x": [1.414, "relu"]}, None)
    (index,) = acc.Tensors(tags.LAYER_INDEX_TAG)
    rows = [(0, "(root)", "Linear"), (1, "enc.0|x", "Linear")]
    assert tags.parse_layer_index(json.loads(index.tensor_proto.string_val[0])) == rows
    (table,) = acc.Tensors(tags.LAYERS_TAG + tags.TEXT_SUFFIX)
    assert tags.parse_layers_markdown(table.tensor_proto.string_val[0].decode()) == rows  # '|' escaped and back
    assert tags.WARNINGS_TAG + tags.TEXT_SUFFIX in acc.Tags()["tensors"]


def test_summarize_reads_back_what_the_sink_wrote(tmp_path):
    report = _report()
    _write(tmp_path, report)
    back = summarize_run(str(tmp_path))
    assert back.steps == [3] and [r.name for r in back.report.layers] == ["(root)", "enc.0|x"]
    for written, read in zip(report.layers, back.report.layers):
        for attr in tags.SCALARS:
            assert getattr(read, attr) == pytest.approx(getattr(written, attr)), attr
        assert read.status == written.status
    assert back.report["enc.0|x"].suggested_scale == pytest.approx(1.414)
    assert back.warnings == [(3, "'enc.0|x' vanishes")]


def test_tags_outside_the_schema_map_to_nothing():
    assert tags.parse_scalar_tag("log10_act_std/0") is None
    assert tags.parse_scalar_tag("act_std") is None
    assert tags.parse_scalar_tag(tags.FLAGGED_TAG) is None
    assert tags.parse_scalar_tag("zero_frac/blocks.1.act") == ("zero_fraction", "blocks.1.act")
    assert tags.parse_flag_tag("flag/dead/blocks.1.act") == ("dead", "blocks.1.act")
    assert tags.parse_flag_tag("flag/dead") is None
    assert tags.parse_layers_markdown(tags.layers_markdown([(2, "a\\b", "My|Type")])) == [(2, "a\\b", "My|Type")]
