"""Bad arguments to check, fix_init and apply_suggestions: a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiag
from torchdiag._checks.check_table import ShapeRecorder, render_check


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_check_with_a_loss_fn_that_is_not_callable_names_loss_fn():
    with pytest.raises(TypeError, match=r"check\(loss_fn=\.\.\.\): expected a callable .* got int"):
        torchdiag.check(_net(), torch.randn(4, 8), loss_fn=3)


def test_check_with_a_non_scalar_loss_names_loss_fn_and_leaves_the_model_as_it_was():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"check\(loss_fn=\.\.\.\): expected .* scalar .* shape \(4, 2\)"):
        torchdiag.check(net, torch.randn(4, 8), loss_fn=lambda out: out * 2)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())
    torchdiag.check(net, torch.randn(4, 8), loss_fn=lambda out: out.pow(2).mean())  # a scalar loss works


@pytest.mark.parametrize("value", [2, "yes", None])
def test_apply_suggestions_only_flagged_must_be_a_bool(value):
    net = _net()
    report = torchdiag.check(net, torch.randn(4, 8))
    with pytest.raises(TypeError, match=rf"apply_suggestions\(only_flagged=\.\.\.\): expected a bool, got"
                                        rf" {type(value).__name__}"):
        torchdiag.apply_suggestions(net, report, only_flagged=value)


@pytest.mark.parametrize("value", ["yes", 1])
def test_fix_init_zero_bias_must_be_a_bool(value):
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(TypeError, match=rf"fix_init\(zero_bias=\.\.\.\): expected a bool, got {type(value).__name__}"):
        torchdiag.fix_init(net, torch.randn(16, 8), zero_bias=value)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_apply_suggestions_with_another_models_report_says_none_of_its_layers_are_in_this_model():
    torch.manual_seed(0)
    other = nn.Sequential()
    other.add_module("encoder", nn.Linear(8, 8))
    other.add_module("head", nn.Linear(8, 2))
    report = torchdiag.check(other, torch.randn(4, 8))
    with pytest.raises(ValueError, match="none of the report's layers .*'encoder'.* are in this model"):
        torchdiag.apply_suggestions(_net(), report)
    assert torchdiag.apply_suggestions(other, report) == {}  # its own model: a healthy one, nothing to do


def test_a_newline_in_a_layer_name_is_escaped_in_the_check_table():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("first\nlayer", nn.Linear(8, 8))
    net.add_module("act", nn.ReLU())
    net.add_module("head", nn.Linear(8, 2))
    x = torch.randn(4, 8)
    report = torchdiag.check(net, x)
    with ShapeRecorder(net) as shapes:
        net(x)
    text = render_check(report, net, shapes.shapes, width=120)
    lines = text.splitlines()
    row = next(line for line in lines if "first" in line)
    assert "first\\nlayer" in row and "layer" in row.split("first", 1)[1]
    assert not any(line.lstrip().startswith("layer") for line in lines)  # no row broken onto a line of its own
    assert "4,8" in row and "72" in row  # its output shape and parameter count are on its own row
    assert sum("first" in line for line in lines) == 1  # one table: render's layout was recognised
