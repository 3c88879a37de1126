"""One layer of a trained net that the updates moved alone (its weights ×1.3 a step, as a param group with its own
learning rate or a loop that edits it would) is named alone, blamed on the optimisation, not smeared over its chain
as the chain's trend; the whole chain moving together is the chain's trend. Checked against each layer's gain
std(out)/rms(in) computed from the model's own forward."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import torchdiag
from tests.helpers import zoo


def gains(model: nn.Sequential, x: torch.Tensor) -> dict[str, float]:
    out, h = {}, x
    with torch.no_grad():
        for name, m in model.named_children():
            y = m(h)
            if isinstance(m, nn.Linear):
                out[name] = (y.std(correction=0) / h.pow(2).mean().sqrt()).item()
            h = y
    return out


def run(grow: list[int], steps: int = 14) -> tuple[torchdiag.Watcher, dict[str, float], dict[str, float]]:
    torch.manual_seed(0)
    model = zoo.kaiming_mlp(depth=8, width=64)
    x = torch.randn(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    before = gains(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, optimizer=opt, every=1) as diag:
            for _ in range(steps):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
                with torch.no_grad():
                    for i in grow:
                        model[i].weight.mul_(1.3)
    return diag, before, gains(model, x)


def test_one_layer_the_updates_moved_alone_is_named_with_its_factor_and_blamed_on_the_optimisation():
    diag, before, after = run(grow=[6])
    moved = {n: after[n] / before[n] for n in before}
    assert moved["6"] > 10 and all(0.5 < m < 2 for n, m in moved.items() if n != "6")  # the premise, by hand
    found = {(f.layer, f.problem, f.reason) for f in diag.findings}
    assert ("6", "exploding", "optimisation") in found
    assert {f.layer for f in diag.findings if f.problem in ("exploding", "vanishing")} == {"6"}  # not the chain
    finding = next(f for f in diag.findings if f.layer == "6" and f.problem == "exploding")
    assert "alone" in finding.message and "not a weight rescale" in finding.message


def test_the_whole_chain_moving_together_is_the_chains_trend_not_one_layer():
    grow = [0, 2, 4, 6, 8, 10, 12, 14]  # every hidden Linear (the head, 16, stays)
    diag, before, after = run(grow=grow)
    assert all(after[str(i)] / before[str(i)] > 10 for i in grow)  # the premise: every layer moved alike
    assert not any("alone" in f.message for f in diag.findings)
