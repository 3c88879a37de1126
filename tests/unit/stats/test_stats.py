"""Statistics against plain tensor formulas."""

import math

import pytest
import torch
from torch import nn

import torchdiag
from tests.helpers.recording import spy
from torchdiag._stats import stats


def _ref(t):
    t = t.detach().double().reshape(-1)
    return {
        "mean": t.mean().item(),
        "std": t.std(correction=0).item(),
        "absmax": t.abs().max().item(),
        "zero": (t == 0).double().mean().item(),
    }


def test_layer_stats_equal_plain_formulas():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(128, 32)
    acts, grads = spy(model)
    report = torchdiag.check(model, x)
    for layer in report.layers:
        ref = _ref(acts[layer.name])
        assert layer.act_mean == pytest.approx(ref["mean"], rel=1e-4, abs=1e-6)
        assert layer.act_std == pytest.approx(ref["std"], rel=1e-4)
        assert layer.act_absmax == pytest.approx(ref["absmax"], rel=1e-6)
        if layer.module_type == "ReLU":  # counted where the dead-ReLU rule reads it
            assert layer.zero_fraction == pytest.approx(ref["zero"], abs=1e-9)
        else:
            assert layer.zero_fraction is None
        g = grads[layer.name].double()
        assert layer.grad_std == pytest.approx(g.std(correction=0).item(), rel=1e-4)
        assert layer.grad_norm == pytest.approx(g.norm().item(), rel=1e-4)
    w = model[0].weight.detach().double()
    assert report["0"].weight_std == pytest.approx(w.std(correction=0).item(), rel=1e-4)
    assert report["1"].zero_fraction == pytest.approx(0.5, abs=0.05)
    # forward gain std(out)/rms(in) (He et al. use the second moment of the input)
    rms_in = x.double().pow(2).mean().sqrt().item()
    assert report["0"].gain == pytest.approx(_ref(acts["0"])["std"] / rms_in, rel=1e-4)


def test_a_large_offset_keeps_its_std_across_steps():
    class Offset(nn.Module):
        def forward(self, x):
            return x * 1e-3 + 100.0

    model = nn.Sequential(nn.Linear(16, 16), Offset())
    with torchdiag.watch(model) as diag:
        for _ in range(3):
            x = torch.randn(4096, 16)
            model(x).sum().backward()
            rep = diag.step()
    # (which rows were shifted: tests/unit/capture/test_capture.py); here the figure stays exact either way
    ref = (model[0](x).detach().double() * 1e-3 + 100.0)
    assert rep["1"].act_std == pytest.approx(ref.std(correction=0).item(), rel=1e-3)


def test_large_mean_small_std_keeps_precision():
    # |mean| >> std: a plain sum/sum-of-squares in float32 cancels to garbage (even negative variance).
    class Offset(nn.Module):
        def forward(self, x):
            return x * 1e-3 + 100.0

    x = torch.randn(200_000)
    model = nn.Sequential(Offset())
    report = torchdiag.check(model, x)
    ref = (x.double() * 1e-3 + 100.0)
    assert report.layers[0].act_std == pytest.approx(ref.std(correction=0).item(), rel=1e-3)
    assert report.layers[0].act_mean == pytest.approx(ref.mean().item(), rel=1e-7)


def test_multi_call_merge_is_exact():
    lin = nn.Linear(16, 16)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x * 3.0) + 1.0))

    model = Shared()
    x = torch.randn(64, 16)
    outs = []
    h = lin.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    report = torchdiag.check(model, x)
    h.remove()
    assert len(outs) == 2
    row = report["lin"]
    assert row.calls == 2
    both = torch.cat([o.reshape(-1) for o in outs]).double()
    assert row.act_mean == pytest.approx(both.mean().item(), rel=1e-5)
    assert row.act_std == pytest.approx(both.std(correction=0).item(), rel=1e-5)
    assert row.act_absmax == pytest.approx(both.abs().max().item(), rel=1e-6)


def test_half_precision_statistics_are_float32_accumulated():
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    x = torch.randn(512, 64, dtype=torch.bfloat16)
    out = model(x).detach().double()
    report = torchdiag.check(model, x)
    assert report.layers[0].act_std == pytest.approx(out.std(correction=0).item(), rel=1e-3)


def test_nonfinite_detected_from_min_max():
    class Bad(nn.Module):
        def forward(self, x):
            y = x.clone()
            y[0, 0] = math.nan
            return y

    model = nn.Sequential(nn.Linear(4, 4), Bad(), nn.Linear(4, 4))
    report = torchdiag.check(model, torch.randn(3, 4))
    assert report.first_nonfinite == "1"
    assert "nonfinite" in report["1"].status and "nonfinite" in report["2"].status
    assert report["0"].status == set()
    assert report["1"].act_std is None  # not measurable, never a made-up number


@pytest.mark.parametrize("n,dtype,relu", [(1, torch.float32, False), (1000, torch.float32, True),
                                          (300_001, torch.float32, False), (70_000, torch.bfloat16, False),
                                          (600_000, torch.float16, True)])
def test_histogram_row_counts_exactly_what_histc_counts(n, dtype, relu):
    torch.manual_seed(n)
    x = (torch.randn(n) * 37.0 + 5.0).to(dtype)  # more than one CPU chunk (2**18) for the large ones
    if relu:
        x = x.relu()
    mn, mx = torch.aminmax(x)
    out = torch.zeros(stats.HIST_BINS + 2, dtype=torch.float64)
    stats.histogram_row(x, [None, None, None, mn, mx], out)
    lo, hi = (mn.item() - 1, mx.item() + 1) if mn == mx else (mn.item(), mx.item())
    ref = torch.histc(x.float(), bins=stats.HIST_BINS, min=mn.item(), max=mx.item())
    assert out[:2].tolist() == [lo, hi]
    assert out[2:].tolist() == ref.double().tolist()


def test_the_first_ill_conditioned_step_after_a_well_conditioned_one_keeps_precision():
    # the shift policy drops the shift after a well-conditioned step; when the next step has |mean| >> std,
    # float32 sum(x^2) - n*mean^2 cancelled to 0 (act_std 0 instead of 1e-3)
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = 0.0

        def forward(self, x):
            return x * 1e-3 + self.c

    offset = Offset()
    model = nn.Sequential(nn.Linear(16, 16), offset)
    with torchdiag.watch(model) as diag:
        for c in (0.0, 0.0, 100.0, 100.0):
            offset.c = c
            x = torch.randn(4096, 16)
            model(x).sum().backward()
            report = diag.step()
            ref = model[0](x).detach().double() * 1e-3 + c
            assert report["1"].act_std == pytest.approx(ref.std(correction=0).item(), rel=1e-3), c
            assert report["1"].act_mean == pytest.approx(ref.mean().item(), rel=1e-6, abs=1e-6), c


def test_finite_activations_above_1e19_give_a_finite_std():
    # float32 sum of squares overflows above ~1e19: act_std was None
    model = nn.Sequential(nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.mul_(1e19)
    x = torch.randn(512, 16)
    with torchdiag.watch(model) as diag:
        model(x).sum().backward()
        report = diag.step()
    ref = model[0](x).detach().double()
    assert torch.isfinite(ref).all()
    assert report["0"].act_std == pytest.approx(ref.std(correction=0).item(), rel=1e-4)
    assert report["0"].weight_std == pytest.approx(model[0].weight.detach().double().std(correction=0).item(),
                                                   rel=1e-4)
    assert report["0"].gain == pytest.approx(ref.std(correction=0).item() / x.double().pow(2).mean().sqrt().item(),
                                             rel=1e-4)


def test_a_histogram_range_too_wide_for_float32_is_skipped_with_a_note_and_recording_goes_on(tmp_path):
    # binning (x - lo) * bins overflowed float32 for ranges above ~5e36: bincount raised, the layer was
    # disabled for the rest of the watch and the inf one step later was never flagged
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity())
    with torch.no_grad():
        model[0].weight.fill_(1e37)
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])  # outputs +-4e37: finite, range 8e37
    with torchdiag.watch(model, logdir=tmp_path, histogram_every=1) as diag:
        model(x).sum().backward()
        first = diag.step()
        model(torch.full((2, 4), math.inf)).sum().backward()
        second = diag.step()
    assert first["0"].act_absmax == pytest.approx(4e37, rel=1e-6)
    assert any("'0'" in n and "histogram" in n and "too wide" in n for n in first.notes), first.notes
    assert "nonfinite" in second["0"].status and second.first_nonfinite == "0"
