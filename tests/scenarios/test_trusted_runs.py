"""The diagnosis over whole runs: a trained net is judged by what changes, one broken layer is named alone, and each
finding names its cause with the fix for that cause. Real data: scikit-learn's bundled digits."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiag


@pytest.fixture(scope="module")
def digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target)


def _mlp(depth: int = 12, width: int = 256, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        lin = nn.Linear(fan_in, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def _train(model, opt, x, y, steps, watch_kwargs, batch=64):
    gen = torch.Generator().manual_seed(0)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1, **watch_kwargs) as diag:
            for _ in range(steps):
                idx = torch.randint(0, 1500, (batch,), generator=gen)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
    told = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    return diag, losses, told


@pytest.mark.parametrize("pass_optimizer", [True, False])
def test_a_deep_relu_mlp_trained_with_adam_is_judged_by_what_changes_not_by_the_init_band(digits, pass_optimizer):
    """12 x (Linear 256 + ReLU), Kaiming, Adam 1e-3 on the digits: it trains to >90 % held-out accuracy while its
    gradient norm, from the last hidden Linear to the first, grows past the init band's 10x (the trained layers'
    singular directions line up with the gradient). That is a trained net, not a broken one: no finding."""
    x, y = digits
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    diag, losses, told = _train(model, opt, x, y, 200, {"optimizer": opt} if pass_optimizer else {})
    with torch.no_grad():
        accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert accuracy > 0.9
    # the drift the init band would have judged, measured with plain hooks on one more batch
    grads: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, out):
            out.register_hook(lambda g: grads.__setitem__(i, g))
        return hook

    outs = [model[i].register_forward_hook(keep(i)) for i in (0, 22)]
    F.cross_entropy(model(x[:256]), y[:256]).backward()
    for h in outs:
        h.remove()
    assert grads[0].norm() / grads[22].norm() > 5  # far from a fresh init's ~1x
    assert told == []
    assert diag.findings == []


@pytest.mark.parametrize("factor", [50.0, 0.01])
def test_one_mis_scaled_layer_is_named_alone_with_its_own_factor(factor):
    """One Linear of a Kaiming ReLU MLP scaled by ``factor``: it alone is the problem, and its fix is 1/factor; the
    chain around it is healthy (no drift once its step is taken out). apply_suggestions fixes exactly it."""
    model = _mlp(depth=12, width=128)
    broken = "12"
    with torch.no_grad():
        model[12].weight.mul_(factor)
    x = torch.randn(128, 64)
    report = torchdiag.check(model, x)
    assert [layer.name for layer in report.flagged] == [broken]
    (finding,) = report[broken].findings
    assert finding.problem == ("exploding" if factor > 1 else "vanishing")
    assert finding.reason == "init"
    kaiming = math.sqrt(2 / 128)  # the textbook std for a ReLU after a fan_in-128 Linear
    own = model[12].weight.std().item() / kaiming  # ~factor
    assert report[broken].suggested_scale == pytest.approx(1 / own, rel=1e-3)
    assert f"{1 / finding.value:.3g}" in finding.message and finding.value == pytest.approx(own, rel=0.25)
    applied = torchdiag.apply_suggestions(model, report)
    assert list(applied) == [broken]
    assert model[12].weight.std().item() == pytest.approx(kaiming, rel=1e-3)
    assert torchdiag.check(model, x).flagged == []


def test_a_learning_rate_that_blows_the_net_up_is_blamed_on_the_optimisation_not_the_init(digits):
    """Adam at lr 0.3 on the same healthy MLP: the loss diverges after the first updates. The init was fine at
    step 0 (nothing flagged there), so what appears later is the optimisation's: its fix is the learning rate,
    never a weight rescale, and apply_suggestions applies nothing."""
    x, y = digits
    model = _mlp(depth=8, width=128)
    assert torchdiag.check(model, x[:256]).flagged == []  # a healthy init
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    diag, losses, told = _train(model, opt, x, y, 30, {})
    assert not all(math.isfinite(v) and v < 2 * losses[0] for v in losses)  # it diverged
    found = diag.findings
    assert found and {f.reason for f in found} == {"optimisation"}
    assert told and not any("multiply" in t or "kaiming" in t for t in told)
    assert torchdiag.apply_suggestions(model, diag.report()) == {}
