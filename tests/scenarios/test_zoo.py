"""Calibration: every healthy zoo model is silent, every broken one is flagged right (tests/helpers/zoo.py)."""

import math

import pytest

import torchdiag
from tests.helpers import zoo

HEALTHY = [c for c in zoo.CASES if c.healthy]
BROKEN = [c for c in zoo.CASES if not c.healthy]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("case", HEALTHY, ids=lambda c: c.name)
def test_healthy_models_raise_no_warning(case, optimizer):
    out = zoo.run(case, optimizer, steps=3)
    assert out["warnings"] == [], f"false alarm on {case.name} ({case.why})"
    assert out["fired"] == {}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.name)
def test_broken_models_are_flagged_on_the_first_bad_layer(case, optimizer):
    out = zoo.run(case, optimizer, steps=3)
    assert zoo.verdict(case, optimizer, out["fired"]) is None, f"{case.name} ({case.why}): {out['fired']}"
    assert out["warnings"], "a broken model must warn on the console"


def test_zero_init_residual_reports_why_no_gradient_reaches_the_branches():
    case = next(c for c in zoo.CASES if c.name == "resnet_bn_zero_init_residual")
    report = torchdiag.check(case.build(), *case.data(__import__("torch").Generator().manual_seed(0))[:1])
    conv = report["layers.0.0.conv1"]
    assert conv.grad_std == 0.0
    assert any("because 'layers.0.0.bn2' has all-zero weights" in n for n in conv.notes)
    assert "vanishing" not in conv.status


def test_classic_suggestions_survive_calibration():
    import torch

    g = torch.Generator().manual_seed(0)
    # layer '2' is a square hidden Linear in each of these nets
    expected = {"xavier_relu_mlp": math.sqrt(2), "randn_products": 1 / math.sqrt(512),
                "randn_products_x0.01": 1 / (0.01 * math.sqrt(512)), "sigmoid_stack": math.sqrt(3),
                "tanh_weights_x3": 1 / 3}
    for case in BROKEN:
        if case.name in expected:
            x, _ = case.data(g)
            layer = torchdiag.check(case.build(), x)["2"]
            assert layer.module_type == "Linear"
            assert layer.suggested_scale == pytest.approx(expected[case.name], rel=0.1), case.name
