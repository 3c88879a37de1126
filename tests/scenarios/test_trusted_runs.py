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
from tests.helpers.forecast import growing_attention


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
    gradient norm grows several times from the last hidden Linear to the first, towards the init band's 10x that
    flagged it before (the trained layers' singular directions line up with the gradient; the band's Theil-Sen
    total over all 13 Linears read 11-19x at steps 40-200). That is a trained net, not a broken one: no finding."""
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


def _three_linears(factor: float, at: int) -> nn.Sequential:
    """Linear(64, 256), ReLU, Linear(256, 256), ReLU, Linear(256, 10), Kaiming, zero biases; model[at]'s weights
    multiplied by ``factor``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        model[at].weight.mul_(factor)
    return model


@pytest.mark.parametrize("factor", [1e-3, 1e3])
def test_a_lone_layer_far_from_its_textbook_scale_is_named_with_its_fix(factor):
    """Three Linears of different shapes (no chain, no peers): the middle one's weights x``factor``. Its output, and
    everything after it, is ``factor`` times what a Kaiming init gives, and the gradient into the layers before
    it too: that layer alone is the problem, fixed by 1/factor (its own Kaiming std over its weight std)."""
    model = _three_linears(factor, 2)
    x = torch.randn(256, 64)
    outs = {}
    hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in (0, 2)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    gain = outs[2].std() / outs[0].relu().pow(2).mean().sqrt()  # the middle layer's gain, by hand
    assert gain == pytest.approx(math.sqrt(2) * factor, rel=0.1)  # Kaiming's sqrt(2), times the factor
    report = torchdiag.check(model, x)
    assert [layer.name for layer in report.flagged] == ["2"]
    (finding,) = report["2"].findings
    assert (finding.problem, finding.reason) == ("exploding" if factor > 1 else "vanishing", "init")
    kaiming = math.sqrt(2 / 256)
    assert report["2"].suggested_scale == pytest.approx(kaiming / model[2].weight.std().item(), rel=1e-3)
    assert torchdiag.apply_suggestions(model, report) == {"2": pytest.approx(1 / factor, rel=0.05)}
    assert model[2].weight.std().item() == pytest.approx(kaiming, rel=1e-3)
    assert torchdiag.check(model, x).flagged == []


def test_a_lone_head_far_too_large_and_a_lone_layer_before_a_norm_are_named():
    """A head x1000 gives logits 1000x Kaiming's (a saturated softmax): named, though a small head is not. A lone
    Linear x0.005 before a BatchNorm: the norm restores the forward signal, but the layer's gradient grows 200x
    against its weights (a norm makes its output invariant to their scale), so it is named with that effect."""
    report = torchdiag.check(_three_linears(1e3, 4), torch.randn(256, 64))
    assert [(x.name, f.problem, f.reason) for x in report.flagged for f in x.findings] == [
        ("4", "exploding", "init")]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
    with torch.no_grad():
        model[0].weight.mul_(0.005)
        model[0].bias.zero_()
    report = torchdiag.check(model, torch.randn(256, 64))
    (finding,) = report["0"].findings
    assert (finding.problem, finding.reason) == ("vanishing", "init")
    assert "normalisation after it undoes that forward" in finding.message
    assert [x.name for x in report.flagged] == ["0"]


def test_a_lone_layer_whose_small_weights_offset_a_large_input_is_healthy():
    """Linear(1, 256) with std 0.005 on a time t in [0, 1000] (rms ~577): its weights are ~200x under the textbook
    and so is its gain, but its output is ~3 in rms, a healthy scale for what comes after: nothing to fix (scaling
    its weights up would give outputs in the hundreds)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 1))
    nn.init.normal_(model[0].weight, std=0.005)
    nn.init.zeros_(model[0].bias)
    t = torch.rand(512, 1) * 1000
    with torch.no_grad():
        out = model[0](t)
    assert 1 < out.pow(2).mean().sqrt().item() < 10
    report = torchdiag.check(model, t)
    assert report["0"].suggested_scale > 100  # the weights are that far from the textbook...
    assert report.flagged == []  # ...and the signal is fine


def test_a_lone_small_layer_that_a_skip_or_the_output_absorbs_is_no_problem():
    """The same x1e-3 where it harms nothing: the model's last Linear (a small head, as zero-init heads are made on
    purpose: the logits start near zero) and a residual branch's projection (its output is added to the skip, so
    the next layer's input keeps its scale: ReZero / SkipInit start so)."""
    assert torchdiag.check(_three_linears(1e-3, 4), torch.randn(256, 64)).flagged == []

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proj = nn.Linear(256, 512), nn.Linear(512, 256)
            nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")
            nn.init.zeros_(self.proj.bias)  # (a bias would hide the weights' scale from the measured gain)
            with torch.no_grad():
                self.proj.weight.mul_(1e-3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.proj(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), Residual(), nn.Linear(256, 10))
    assert torchdiag.check(model, torch.randn(256, 64)).flagged == []


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


@pytest.mark.parametrize("edit", [False, True])
def test_a_chain_the_init_left_vanishing_is_judged_after_training_as_a_healthy_one_would_be(digits, edit):
    """5 x Linear with PyTorch's default init and ReLU, AdamW 1e-3 memorising one batch of 64 digits. At step 0 the
    output rms falls ~0.47x a layer (the default init's gain, 1/sqrt(3) of Kaiming's): vanishing, the init's, whose
    fix is a gain. Memorising the batch then grows every layer's weights, and tens of steps later the rms grows
    ~14x along the same chain: past the init band's 10x, but what a trained chain reaches (a healthy 12-layer MLP
    under Adam goes from ~1x to ~20x: drift_change_ratio is 100x from where a textbook init starts). No finding,
    and certainly not a weight multiplication. ``edit``: the loop multiplies the last three Linears' weights by 6
    at step 30 (as a learning rate that blows up would): the chain's drift grows past 100x, the optimisation's."""
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(),
                          *[m for _ in range(3) for m in (nn.Linear(256, 256), nn.ReLU())], nn.Linear(256, 10))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    xb, yb = x[:64], y[:64]

    def chain_ratio() -> float:  # the last Linear's output rms over the first's, with plain hooks
        rms: list[float] = []
        hooks = [m.register_forward_hook(lambda m, a, o: rms.append(o.pow(2).mean().sqrt().item())) for m in linears]
        with torch.no_grad():
            model(xb)
        for h in hooks:
            h.remove()
        return rms[-1] / rms[0]

    assert chain_ratio() < 0.1  # vanishing at init
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1) as diag:
            for step in range(60):
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
                opt.zero_grad()
                if edit and step == 30:
                    with torch.no_grad():
                        for m in linears[2:]:
                            m.weight.mul_(6.0)
    told = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    found = {(f.problem, f.direction): f for f in diag.findings}
    assert found[("vanishing", "forward")].reason == "init"
    exploding = [t for t in told if t.split(":")[1].strip().startswith("exploding (forward)")]
    if not edit:
        assert 10 < chain_ratio() < 100  # past the init band, within a trained chain's drift
        assert ("exploding", "forward") not in found and exploding == []
    else:
        assert chain_ratio() > 100
        assert found[("exploding", "forward")].reason == "optimisation"
        assert exploding and not any("multiply" in t or "suggested scale" in t for t in exploding)


def test_a_growing_attention_logit_is_forecast_with_its_steps_to_go_before_it_crosses():
    """The query and key weights grow 12 % a step (what a too-high learning rate does to them over tens of steps,
    Wortsman et al. 2023): the largest logit grows ~1.25x a step, from ~2 to past attention_logit_max (1000) in
    ~30 steps. Right answer: a warning with the steps to go while the logit is still far below the threshold, its
    estimate near the crossing measured by hand."""
    threshold = torchdiag.Config.defaults().attention_logit_max
    logits, forecasts, told = growing_attention()
    crossed = next(i for i, v in enumerate(logits) if v > threshold)
    assert 15 < crossed < 50  # the scenario is what it says
    (said,) = [f for f in forecasts if f.figure == "attention logit"]
    assert said.layer == "attn" and said.step < crossed
    assert said.value == pytest.approx(logits[said.step], rel=1e-3)
    actual = crossed - said.step
    assert 0.5 * actual <= said.steps_to_go <= 1.5 * actual + 1
    print(f"\nforecast at step {said.step}: crosses in ~{said.steps_to_go:.0f} steps; crossed at step {crossed}"
          f" (lead {actual} steps)")
    assert any(f"crosses attention_logit_max {threshold:g} in ~" in t for t in told)


def test_attention_one_hot_before_any_update_is_blamed_on_the_query_key_init():
    """BERT with initializer_range 1.0 (50x the 0.02 its config normally asks for), checked before any training:
    its attention is one-hot from block 0. Nothing was trained, so the cause is the init and the fix is the
    query/key weights' scale, not qk-layernorm-or-a-lower-learning-rate; the message gives the weights' std
    against 1/sqrt(fan_in), which we compute from the module itself."""
    from tests.helpers import real_zoo

    case = next(c for c in real_zoo.BROKEN if c.name == "bert_init_range_1")
    torch.manual_seed(0)
    model = case.build()
    report = real_zoo.check_case(case)
    found = [(row.name, f) for row in report.layers for f in row.findings if f.problem == "attention_entropy"]
    assert found and all(f.reason == "init" for _, f in found)
    name, first = found[0]
    assert "learning rate" not in first.message and "nothing was trained yet" in first.message
    modules = dict(model.named_modules())
    unit = 1 / math.sqrt(modules[name].weight.shape[1])
    told = {f"×{modules[name.rsplit('.', 1)[0] + '.' + p].weight.std().item() / unit:.3g}" for p in ("query", "key")}
    assert any(t in first.message for t in told), first.message


def test_summarize_reads_back_the_same_findings_as_the_live_watch(tmp_path):
    """One update blows a layer up for a step (its weights x10 between two recorded steps, as a bad step of a high
    learning rate does), then the run goes on. The live watch makes it a finding at once (the updates did it);
    `torchdiag summarize` on the logdir must reach the same verdict from the events alone."""
    from torchdiag.cli._logreader import find_runs, summarize_run
    from torchdiag.cli._summarize import run_findings

    model = _mlp(depth=6, width=64)
    x = torch.randn(128, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, logdir=tmp_path, every=1) as diag:
            for step in range(6):
                model(x).pow(2).mean().backward()
                model.zero_grad()
                diag.step()
                with torch.no_grad():
                    if step == 2:
                        model[6].weight.mul_(10.0)
                    if step == 3:
                        model[6].weight.div_(10.0)
    live = {(f.layer, f.problem) for f in diag.findings}
    assert ("6", "exploding") in live
    assert {f.reason for f in diag.findings if f.layer == "6"} == {"optimisation"}
    (run,) = find_runs(str(tmp_path))
    read = {(f.layer, f.problem) for f in run_findings(summarize_run(run))}
    assert read == live


def test_a_watch_opened_on_a_model_already_in_training_judges_it_by_change(digits):
    """A 12-layer ReLU MLP trained 300 steps with Adam, then watched with its optimizer: the optimizer's state says
    training is under way, so the first watched step is the start a trained net is judged against, not an init.
    `check()` on the same model, which can only judge it as an init, shows what the init band would say of it."""
    x, y = digits
    model = _mlp(depth=12, width=256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, 1500, (64,), generator=gen)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    as_init = torchdiag.check(model, x[:64], loss_fn=lambda out: F.cross_entropy(out, y[:64]))
    diag, losses, told = _train(model, opt, x, y, 20, {"optimizer": opt})
    assert all(math.isfinite(v) for v in losses)
    assert as_init.flagged  # the premise: judged by the init band, this trained model would be flagged
    assert told == [] and diag.findings == []
