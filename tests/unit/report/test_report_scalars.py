"""Report.scalars(): the step's numbers as a flat dict, checked against the LayerReport and Report fields."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import torchdiag
from torchdiag._report.report import SCALAR_FIELDS, LayerReport, Report


def test_the_scalar_fields_are_every_float_field_of_a_layer_report():
    floats = [f.name for f in dataclasses.fields(LayerReport) if f.type == "float | None"]
    assert list(SCALAR_FIELDS) == floats
    assert {"act_std", "grad_std", "grad_norm", "weight_std", "zero_fraction", "gain", "update_ratio",
            "suggested_scale", "measured_scale"} <= set(SCALAR_FIELDS)
    assert not {"fan_in", "fan_out", "index", "calls", "nonlinearity", "suggested_init"} & set(SCALAR_FIELDS)


def test_every_measured_field_of_every_layer_and_nothing_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torchdiag.watch(model, optimizer=opt) as diag:
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
    report = diag.report()
    scalars = report.scalars()
    expected = {f"{layer.name}/{attr}": float(getattr(layer, attr)) for layer in report.layers
                for attr in SCALAR_FIELDS if getattr(layer, attr) is not None}
    expected["flagged_layers"] = float(len(report.flagged))
    for attr in ("grad_norm_preclip", "grad_norm_postclip", "clipped"):
        assert getattr(report, attr) is not None
        expected[attr] = float(getattr(report, attr))
    assert report.record_interval == 1  # the first steps are recorded in full, whatever the time budget
    expected["record_interval"] = 1.0
    assert scalars == expected
    assert scalars["0/act_std"] == report["0"].act_std and scalars["2/update_ratio"] == report["2"].update_ratio
    assert "1/weight_std" not in scalars  # a ReLU has no weight: not measured, not a key
    assert all(isinstance(v, float) for v in scalars.values())


def test_the_root_module_and_the_amp_figures():
    root = LayerReport(name="", module_type="MyNet", index=0, calls=1, act_std=2.0)
    report = Report(layers=[root], amp_scale=1024.0, amp_skipped_steps=3)
    assert report.scalars() == {"(root)/act_std": 2.0, "flagged_layers": 0.0, "amp_scale": 1024.0,
                                "amp_skipped_steps": 3.0}
    assert Report(layers=[]).scalars() == {"flagged_layers": 0.0}


@pytest.mark.parametrize("attr", SCALAR_FIELDS)
def test_each_field_has_its_key(attr):
    row = LayerReport(name="blocks.0.fc", module_type="Linear", index=0, calls=1)
    setattr(row, attr, 0.25)
    assert Report(layers=[row]).scalars()[f"blocks.0.fc/{attr}"] == 0.25
