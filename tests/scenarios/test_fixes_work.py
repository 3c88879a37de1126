"""A suggestion is shown only where applying it helps: the tests apply it (issue #13, 'fixes that work').

After ``apply_suggestions`` (flagged layers only, the default) or ``fix_init`` a broken model is silent and
trains; where init cannot fix the problem the report says so and nothing is rescaled; a healthy model is left
alone; no suggestion is ever nan or inf; tied weights are scaled once.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import torchdiag
from tests.helpers import real_zoo, zoo

DRIFT = {"vanishing", "exploding", "saturated"}


def _case(name: str):
    return next(c for c in [*zoo.CASES, *real_zoo.CASES] if c.name == name)


def _check(case, model, seed: int = 0) -> torchdiag.Report:
    if case in real_zoo.CASES:
        inputs, labels = case.data(torch.Generator().manual_seed(seed + 1))
        return torchdiag.check(model, *inputs, loss_fn=lambda out: case.loss(out, labels))
    x, y = case.data(torch.Generator().manual_seed(seed + 1))
    return torchdiag.check(model, x, loss_fn=lambda out: zoo._ce(out, y))


def _train_losses(case, model, steps: int = 30) -> list[float]:
    """Plain AdamW steps on the case's data, no watch: what the fix does to training itself."""
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        if case in real_zoo.CASES:
            inputs, labels = case.data(g)
            loss = case.loss(model(*inputs), labels)
        else:
            x, y = case.data(g)
            loss = zoo._ce(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# the broken cases whose problem is the init's scale: the suggestions must fix them
FIXABLE = ["xavier_relu_mlp", "tanh_weights_x3", "vgg_plain_std0.01", "tanh_mlp_default_init"]


@pytest.mark.parametrize("name", FIXABLE)
def test_applying_the_suggestions_makes_a_broken_init_silent_and_it_trains(name):
    case = _case(name)
    torch.manual_seed(0)
    model = case.build()
    before = _check(case, model)
    assert {p for layer in before.flagged for p in layer.status} & DRIFT, "the broken case must be flagged first"
    applied = torchdiag.apply_suggestions(model, before)
    assert applied and all(math.isfinite(v) and v > 0 for v in applied.values())
    assert set(applied) <= {layer.name for layer in before.flagged}  # flagged layers only
    after = _check(case, model)
    assert not {p for layer in after.flagged for p in layer.status} & DRIFT, [
        (layer.name, layer.status) for layer in after.flagged]
    # and it trains under a watch without a finding
    fixed = dataclasses.replace(case, build=lambda: model)
    run = zoo.run(fixed, "adamw", steps=3) if case in zoo.CASES else real_zoo.run(fixed, "adamw", steps=3)
    assert not set(run["fired"]) & DRIFT, run["fired"]
    losses = _train_losses(case, model)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["randn_products", "randn_products_x0.01"])
def test_applying_the_suggestions_makes_the_randn_products_silent(name):
    # (100 linear layers: AdamW at 1e-3 then moves every layer the same way and the product grows again, which
    # is the learning rate's doing for that depth, so only the init is checked here)
    case = _case(name)
    torch.manual_seed(0)
    model = case.build()
    before = _check(case, model)
    applied = torchdiag.apply_suggestions(model, before)
    assert len(applied) == 100
    assert all(v == pytest.approx(1 / (math.sqrt(512) * (1.0 if name == "randn_products" else 0.01)), rel=0.1)
               for v in applied.values())
    assert not _check(case, model).flagged


def test_fix_init_makes_the_vgg_stack_silent():
    case = _case("vgg_plain_std0.01")
    torch.manual_seed(0)
    model = case.build()
    inputs, _ = case.data(torch.Generator().manual_seed(3))
    torchdiag.fix_init(model, *inputs)
    assert not {p for layer in _check(case, model).flagged for p in layer.status} & DRIFT


def test_a_sigmoid_stack_gets_an_honest_no_and_nothing_is_rescaled():
    case = _case("sigmoid_stack")
    torch.manual_seed(0)
    model = case.build()
    report = _check(case, model)
    lead = next(f for layer in report.flagged for f in layer.findings if f.problem == "vanishing")
    assert lead.fixable is False and "whatever the weight scale" in lead.message
    assert "multiply" not in lead.message
    before = [p.clone() for p in model.parameters()]
    assert torchdiag.apply_suggestions(model, report) == {}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_depth_that_compounds_through_residual_sums_names_residual_scaling():
    case = _case("resnet_without_norm")
    torch.manual_seed(0)
    report = _check(case, case.build())
    leads = [f for layer in report.flagged for f in layer.findings
             if f.problem == "exploding" and f.cause == layer.name]
    assert leads and all(f.fixable is False and "residual branch" in f.message for f in leads)


@pytest.mark.parametrize("name", ["resnet_bn", "gpt_decoder", "kaiming_relu_mlp"])
def test_a_healthy_model_is_left_alone(name):
    case = _case(name)
    torch.manual_seed(0)
    model = case.build()
    report = _check(case, model)
    assert torchdiag.apply_suggestions(model, report) == {}
    assert "×" not in str(report).split("suggestion", 1)[1].split("\n", 1)[1]  # no suggestion column on healthy rows


def test_tied_weights_are_scaled_once():
    case = _case("gpt_decoder")  # lm_head.weight is wte.weight
    torch.manual_seed(0)
    model = case.build()
    assert model.lm_head.weight is model.wte.weight
    w0 = model.wte.weight.detach().clone()
    report = _check(case, model)
    applied = torchdiag.apply_suggestions(model, report, only_flagged=False)
    tied = [n for n in applied if n in ("wte", "lm_head")]
    assert len(tied) <= 1
    factor = applied[tied[0]] if tied else 1.0
    torch.testing.assert_close(model.wte.weight.detach(), w0 * factor)


def test_non_finite_weights_never_give_a_nan_suggestion():
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.ReLU())])
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    report = torchdiag.check(model, torch.randn(8, 16))
    for layer in report.layers:
        assert layer.suggested_scale is None or math.isfinite(layer.suggested_scale)
        for f in layer.findings:
            assert "nan" not in f.message.split("Fix:")[-1]
    assert any("weights hold NaN/Inf" in n for n in report["4"].notes)
