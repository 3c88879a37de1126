"""The figures from the references: He et al. (2015), the randn(512, 512) products."""

import math

import pytest
import torch
from torch import nn

import torchdiag


def relu_mlp(init, depth=30, width=256):
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        init(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers)


def products(scale, depth=100, width=512):
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(torch.randn(width, width) * scale)
    return model


def test_kaiming_relu_post_activation_std_is_0_825():
    # reference/000: unit-variance input, Kaiming: pre-ReLU std sqrt(2), post-ReLU std sqrt(1 - 1/pi) = 0.825
    model = relu_mlp(lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"), depth=1, width=1024)
    report = torchdiag.check(model, torch.randn(1024, 1024))
    assert report["0"].act_std == pytest.approx(math.sqrt(2), rel=0.03)
    assert report["1"].act_std == pytest.approx(math.sqrt(1 - 1 / math.pi), rel=0.03)


def test_xavier_relu_30_layers_is_vanishing_with_scale_sqrt2():
    report = torchdiag.check(relu_mlp(nn.init.xavier_normal_), torch.randn(128, 256))
    vanishing = [layer for layer in report.layers if "vanishing" in layer.status]
    assert vanishing, str(report)
    # forward: the output rms decays by 1/sqrt(2) per layer pair
    deep = report.layers[-2]
    assert any(f.direction == "forward" for f in deep.findings)
    for layer in report.layers:
        if layer.module_type == "Linear":
            assert layer.nonlinearity == "relu"
            assert layer.suggested_scale == pytest.approx(math.sqrt(2), rel=0.05)
            assert "kaiming_normal_" in layer.suggested_init and "relu" in layer.suggested_init


def test_kaiming_relu_30_layers_is_clean_with_scale_1():
    report = torchdiag.check(relu_mlp(lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")),
                             torch.randn(128, 256))
    assert report.flagged == [], str(report)
    for layer in report.layers:
        if layer.module_type == "Linear":
            assert layer.suggested_scale == pytest.approx(1.0, rel=0.05)


def test_randn_products_first_nonfinite_near_28():
    # reference/002: 100 products of randn(512, 512) overflow float32 after ~28 layers
    report = torchdiag.check(products(1.0), torch.randn(16, 512))
    first = int(report.first_nonfinite)
    assert 25 <= first <= 30, first  # 0-based index of the layer
    assert "exploding" in report["1"].status
    assert report["0"].suggested_scale == pytest.approx(1 / math.sqrt(512), rel=0.05)


def test_randn_products_times_001_vanish_and_suggest_4_42():
    report = torchdiag.check(products(0.01), torch.randn(16, 512))
    assert report.first_nonfinite is None
    assert "vanishing" in report.layers[-1].status
    # textbook identity target 1/sqrt(512) = 0.0442 against std 0.01
    assert report["5"].suggested_scale == pytest.approx(1 / (0.01 * math.sqrt(512)), rel=0.05)


def test_randn_products_over_sqrt_n_hold():
    report = torchdiag.check(products(1 / math.sqrt(512)), torch.randn(16, 512))
    assert report.flagged == [], str(report)
    assert report.layers[-1].act_std == pytest.approx(1.0, rel=0.5)


def test_sigmoid_stack_vanishes_backward_while_forward_bounded():
    layers = []
    for _ in range(10):
        layers += [nn.Linear(256, 256), nn.Sigmoid()]
    report = torchdiag.check(nn.Sequential(*layers), torch.randn(128, 256))
    first = report["0"]
    assert "vanishing" in first.status
    assert all(f.direction == "backward" for f in first.findings)
    assert not any(f.direction == "forward" for layer in report.layers for f in layer.findings)
    # default init std 1/sqrt(3 fan_in) against the sigmoid target 1/sqrt(fan_in): sqrt(3)
    assert first.suggested_scale == pytest.approx(math.sqrt(3), rel=0.05)


def test_tanh_default_init_suggests_five_thirds_sqrt3():
    layers = []
    for _ in range(5):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    report = torchdiag.check(nn.Sequential(*layers), torch.randn(64, 256))
    assert report["0"].nonlinearity == "tanh"
    assert report["0"].suggested_scale == pytest.approx(5 / 3 * math.sqrt(3), rel=0.05)


@pytest.mark.parametrize("act, name, gain", [
    (torch.relu, "relu", math.sqrt(2)),
    (torch.tanh, "tanh", 5 / 3),
    (torch.nn.functional.gelu, "gelu", None),
])
def test_functional_activation_is_inferred_and_measured_scale_agrees(act, name, gain):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lins = nn.ModuleList(nn.Linear(128, 128) for _ in range(4))
            for lin in self.lins:
                nn.init.xavier_normal_(lin.weight)

        def forward(self, x):
            for lin in self.lins:
                x = act(lin(x))  # no activation module: torchdiag must read it off the next layer's input
            return x

    report = torchdiag.check(Functional(), torch.randn(256, 128))
    row = report["lins.0"]
    assert row.nonlinearity == name and any("inferred" in n for n in row.notes)
    if gain is None:  # GELU: a measured gain, 1/sqrt(E[gelu(z)^2]) for z ~ N(0, 1), not a table entry
        z = torch.randn(2_000_000, dtype=torch.float64)
        gain = 1 / torch.nn.functional.gelu(z).pow(2).mean().sqrt().item()
    assert row.suggested_scale == pytest.approx(gain, rel=0.02)  # Xavier std on a square layer is 1/sqrt(n)
    assert row.measured_scale == pytest.approx(row.suggested_scale, rel=0.1)  # i.i.d. init: they agree
