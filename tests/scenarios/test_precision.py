"""The precision dimension: a half-precision layer that runs out of its dtype's range, found before it does.

Every figure is checked against the tensors themselves (hooks of the test's own on a twin of the model, the same
seed): float16's largest value is 65504 (``torch.finfo(torch.float16)``); its smallest subnormal step is the next
float16 after 0 (2**-24), and a value under eight such steps keeps 3 significant bits or fewer (the precision
floor underflow counts below), under half a step it is flushed to zero. Autocast runs on the CPU in float16 as on a
GPU (``torch.autocast("cpu", dtype=torch.float16)``).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import torchdiag
from tests.helpers import zoo

FP16 = torch.finfo(torch.float16)
STEP = torch.nextafter(torch.zeros((), dtype=torch.float16), torch.ones((), dtype=torch.float16)).item()
FLOOR = 8 * STEP
MARGIN = 8.0  # defaults.yaml overflow_margin
UNDERFLOW = 0.1  # defaults.yaml underflow_fraction

pytestmark = pytest.mark.usefixtures("one_thread")


def kaiming_mlp(depth: int = 4, width: int = 256, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.kaiming_mlp(depth, width)


def batch(width: int = 256, scale: float = 1.0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, width, generator=g) * scale, torch.randint(0, 10, (64,), generator=g)


def small_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, weight: float = 1e-3
               ) -> torch.Tensor:
    """A loss term weighted 1e-3 (an auxiliary loss, or a fitted model's ~2e-3): float16 output gradients of ~4e-7,
    below float16's smallest normal, which is what a GradScaler exists for."""
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    return weight * nn.functional.cross_entropy(out.float(), y)


def output_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
                     weight: float = 1e-3) -> dict[str, torch.Tensor]:
    """The gradient of every module's output in one backward of a twin, as the backward computed it (scaled)."""
    twin = copy.deepcopy(model)
    grads: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in twin.named_children():
        def hook(_m, _args, out, name=name):
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))
        handles.append(m.register_forward_hook(hook))
    (small_loss(twin, x, y, dtype, weight) * scale).backward()
    for h in handles:
        h.remove()
    return grads


def low_share(t: torch.Tensor) -> float:
    """The share of the non-zero values under the precision floor."""
    a = t.float().abs()
    nonzero = int((a > 0).sum())
    return int(((a > 0) & (a < FLOOR)).sum()) / nonzero if nonzero else 0.0


def train(model: nn.Module, dtype: torch.dtype, scaler: torch.amp.GradScaler | None, steps: int = 4,
          scale: float = 1.0, weight: float = 1e-3) -> tuple[torchdiag.Watcher, list[torchdiag.Report], list[str]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(scale=scale)
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, optimizer=opt, scaler=scaler, every=1) as diag:
            for _ in range(steps):
                opt.zero_grad()
                loss = small_loss(model, x, y, dtype, weight)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                r = diag.step()
                if r is not None:
                    reports.append(r)
    return diag, reports, [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]


def test_fp16_without_a_scaler_is_underflow_on_the_flushed_layers_with_the_gradscaler_fix():
    model = kaiming_mlp()
    x, y = batch()
    truth = {name: low_share(g) for name, g in output_gradients(model, x, y, torch.float16).items()}
    expected = {name for name, share in truth.items() if share > UNDERFLOW}
    assert len(expected) >= 5, truth  # the premise: most output gradients reach under float16's precision floor

    diag, reports, warned = train(model, torch.float16, None)
    first = reports[0]
    assert {layer.name for layer in first.layers if "underflow" in layer.status} == expected
    for layer in first.layers:
        assert layer.precision == "float16"
        assert layer.grad_underflow == pytest.approx(truth[layer.name], abs=1e-9)
    findings = [f for layer in first.layers for f in layer.findings if f.problem == "underflow"]
    assert len(findings) == 1 and findings[0].reason == "precision" and findings[0].covers == len(expected)
    assert "GradScaler" in findings[0].message
    # the gradients flushed to zero are not a second problem: no vanishing, nothing but underflow in the run
    assert {f.problem for f in diag.findings} == {"underflow"}
    assert all("vanishing" not in layer.status for r in reports for layer in r.layers)
    assert any("underflow" in w and "GradScaler" in w for w in warned)


def test_fp16_with_a_gradscaler_that_keeps_the_gradients_in_range_is_silent():
    model = kaiming_mlp()
    x, y = batch()
    scaler = torch.amp.GradScaler("cpu")
    truth = output_gradients(model, x, y, torch.float16, scale=scaler.get_scale())
    assert max(low_share(g) for g in truth.values()) < UNDERFLOW  # the premise: scaled, they are in range

    diag, reports, warned = train(model, torch.float16, scaler)
    assert diag.findings == [] and warned == []
    first = reports[0]
    for layer in first.layers:  # the figures are those of the scaled gradients, as the backward computed them
        assert layer.grad_underflow == pytest.approx(low_share(truth[layer.name]), abs=1e-9)
        absmax = truth[layer.name].float().abs().max().item()
        assert layer.grad_headroom == pytest.approx(math.log2(FP16.max / absmax), abs=1e-6)


def test_a_gradscaler_finding_its_scale_by_overflowing_is_not_a_problem():
    # GradScaler starts high and halves its scale at each step whose scaled gradients overflow: routine
    model = kaiming_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    diag, reports, warned = train(model, torch.float16, scaler, steps=16, weight=1.0)
    assert scaler.get_scale() < 2.0 ** 24  # the premise: it overflowed and backed off
    assert diag.findings == [] and warned == []
    assert any("overflowed at GradScaler's scale" in note for r in reports for note in r.notes)


def test_bf16_has_float32s_range_so_no_precision_figure_and_no_finding():
    diag, reports, warned = train(kaiming_mlp(), torch.bfloat16, None)
    assert diag.findings == [] and warned == []
    assert all(layer.precision is None and layer.grad_underflow is None for r in reports for layer in r.layers)


def test_an_fp16_output_near_65504_is_overflow_risk_on_that_layer_before_any_inf():
    # raw sensor counts of ~5000 into a Kaiming Linear: its float16 outputs reach ~2e4, three times under the max
    model = kaiming_mlp(width=64)
    x = batch(width=64, scale=5000.0)[0]
    outs: dict[str, torch.Tensor] = {}
    twin = copy.deepcopy(model)
    for name, m in twin.named_children():
        m.register_forward_hook(lambda _m, _a, out, name=name: outs.__setitem__(name, out.detach()))
    with torch.autocast("cpu", dtype=torch.float16):
        twin(x)
    assert all(torch.isfinite(o).all() for o in outs.values())  # no Inf anywhere yet
    near = [n for n, o in outs.items() if o.float().abs().max().item() * MARGIN > FP16.max]
    assert near and near[0] == "0"

    report = torchdiag.check(model, x, precision="fp16")
    flagged = [layer.name for layer in report.layers if "overflow_risk" in layer.status]
    assert flagged == near
    top = report["0"]
    assert top.act_headroom == pytest.approx(math.log2(FP16.max / outs["0"].float().abs().max().item()), abs=1e-6)
    finding = next(f for f in top.findings if f.problem == "overflow_risk")
    assert finding.reason == "precision" and finding.direction == "forward" and "float32" in finding.message
    assert not any("nonfinite" in layer.status for layer in report.layers)
    # the same model in bfloat16: float32's range, nothing to say
    assert not any(p in layer.status for layer in torchdiag.check(model, x, precision="bf16").layers
                   for p in ("overflow_risk", "underflow"))


def test_an_fp16_output_growing_towards_65504_is_forecast_with_the_steps_to_go_before_it_overflows():
    # a layer whose outputs grow x1.25 per step (weights grown by the user's loop), from far under the max
    model = kaiming_mlp(width=64)
    x, y = batch(width=64, scale=30.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    overflow_at, forecasts = None, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, optimizer=opt, every=1, config={"attention_rules": True}) as diag:
            for step in range(60):
                with torch.autocast("cpu", dtype=torch.float16):
                    out = model[0](x)
                if overflow_at is None and not torch.isfinite(out).all():
                    overflow_at = step
                    break
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.cross_entropy(model(x).float(), y)
                loss.backward()
                opt.step()
                r = diag.step()
                if r is not None:
                    forecasts += [(r.step, f) for f in r.forecasts if f.layer == "0"]
                with torch.no_grad():
                    model[0].weight.mul_(1.25)
    assert overflow_at is not None
    assert forecasts, "no forecast before the overflow"
    step, f = forecasts[0]
    assert step < overflow_at and f.figure == "outputs" and f.key == "float16"
    actual = overflow_at - step
    print(f"forecast at step {step}: ~{f.steps_to_go:.0f} steps to go; it overflowed {actual} steps later")
    assert actual / 2 <= f.steps_to_go <= actual * 2


def test_check_precision_names_its_argument_and_the_formats_it_takes():
    with pytest.raises(ValueError, match=r"check\(precision=...\): expected one of .*float16.*got 'fp12'"):
        torchdiag.check(nn.Linear(4, 4), torch.randn(2, 4), precision="fp12")


def test_check_fp8_is_the_share_under_the_floor_once_scaled_per_tensor():
    # e4m3's floor (eight smallest subnormal steps of 2**-9) is 2**-6, 2**-6 / 448 of its max: a tensor spanning more
    # than that loses its small values
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(64))
        model[0].bias.zero_()
    x = torch.logspace(-8, 0, 64).repeat(8, 1)  # a spread of 8 decades, evenly in log
    report = torchdiag.check(model, x, precision="e4m3")
    out = x  # the identity layer's output
    cut = out.abs().max() * (2.0 ** -6 / 448.0)
    want = ((out.abs() < cut) & (out != 0)).sum().item() / (out != 0).sum().item()
    layer = report["0"]
    assert layer.precision == "float8_e4m3fn" and layer.act_headroom is None
    assert layer.act_underflow == pytest.approx(want, abs=1e-9) and want > UNDERFLOW
    assert "underflow" in layer.status


def test_tensorboard_shows_the_float16_headroom_by_layer_and_step_only_where_layers_compute_in_float16(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torchdiag._report.tags import HEADROOM_TAG
    from torchdiag._sinks.overview import History, heatmap_geometry, render_headroom, row_labels

    x, y = batch(width=64, scale=5000.0)  # the first Linear's float16 outputs reach ~1e4: 2.7 bits under 65504
    reports = {}
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)  # a LayerNorm (float32 under autocast) brings the signal back to unit scale
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.LayerNorm(64), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torchdiag.watch(model, optimizer=opt, every=1, logdir=tmp_path / str(dtype)) as diag:
                for _ in range(3):
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=dtype):
                        loss = nn.functional.cross_entropy(model(x).float(), y)
                    loss.backward()
                    opt.step()
                    reports.setdefault(dtype, []).append(diag.step())
        acc = EventAccumulator(str(tmp_path / str(dtype)), size_guidance={"images": 0})
        acc.Reload()
        assert (HEADROOM_TAG in acc.Tags()["images"]) == (dtype == torch.float16)
    history = History()
    for r in reports[torch.float16]:
        history.add(r)
    canvas = render_headroom(history)
    rows = history.rows()
    x0, y0, cw, ch = heatmap_geometry(len(rows), len(history.columns), max(len(s) for s in row_labels(rows)))

    def pixel(name: str) -> tuple[int, ...]:
        r = [n for n, _, _ in rows].index(name)
        o = 3 * ((y0 + r * ch) * canvas.width + x0)  # a cell's corner: a finding's dot sits in its middle
        return tuple(canvas.px[o:o + 3])

    first = reports[torch.float16][0]
    assert first["0"].act_headroom < 3 < 10 < first["3"].act_headroom  # the premise, from the run
    red, white = pixel("0"), pixel("3")
    assert min(white) >= 240 and red[0] > 150 and red[1] < 120  # a dark red against (near) white
    dot = 3 * ((y0 + ch // 2) * canvas.width + x0 + cw // 2)  # overflow_risk is a finding on '0' at once: dotted
    assert tuple(canvas.px[dot:dot + 3]) == (0, 0, 0)


def test_gradients_float16_flushed_entirely_are_underflow_not_silence():
    # a loss weighted 1e-7: float16 rounds every output gradient to an exact zero (the float32 reference is ~4e-10)
    model = kaiming_mlp()
    x, y = batch()
    zero = [n for n, g in output_gradients(model, x, y, torch.float16, weight=1e-7).items() if int((g != 0).sum()) == 0]
    diag, reports, _ = train(model, torch.float16, None, weight=1e-7)
    assert zero, "the premise: float16 flushed whole gradients"
    flagged = {layer.name for layer in reports[0].layers if "underflow" in layer.status}
    assert set(zero) <= flagged
    assert [(f.problem, f.direction) for f in diag.findings] == [("underflow", "backward")]


def test_an_overflowed_float16_layer_has_no_underflow_figure_and_reads_0_bits_on_the_heatmap():
    from torchdiag._sinks.overview import HEADROOM, History

    model = nn.Sequential(nn.Linear(32, 32))
    report = torchdiag.check(model, torch.randn(32, 32) * 1e5, precision="fp16")  # outputs past 65504: Inf
    layer = report["0"]
    assert "nonfinite" in layer.status and layer.precision == "float16"
    assert layer.act_underflow is None  # NaN/Inf are not values under the floor
    history = History()
    history.add(report)
    assert history.columns[0][2][HEADROOM]["0"] == 0.0  # no headroom left: dark red, not the grey of float32
