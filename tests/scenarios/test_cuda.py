"""CUDA: statistics on the device, no host sync inside any hook, one copy per recorded step.

Skipped without a GPU (CI has none); run on a machine with one.
"""

import math

import pytest
import torch
from torch import nn

import torchdiag
from tests.helpers import zoo

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_statistics_equal_plain_formulas_and_bf16_autocast():
    torch.manual_seed(0)
    model = zoo.kaiming_mlp(6, 256).cuda()
    x = torch.randn(128, 256, device="cuda")
    with torch.no_grad():
        ref = model[0](x).double()
    rep = torchdiag.check(model, x)
    assert rep["0"].act_std == pytest.approx(ref.std(correction=0).item(), rel=1e-5)
    assert rep.flagged == []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model[0](x).detach()
        rep = torchdiag.check(model, x)
    assert rep["0"].act_std == pytest.approx(out.double().std(correction=0).item(), rel=1e-4)


@cuda
def test_no_host_sync_inside_hooks():
    torch.manual_seed(0)
    model = zoo.ResNet().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torchdiag.watch(model, optimizer=opt, config={"warnings": False}) as diag:
        for _ in range(2):
            torch.cuda.set_sync_debug_mode("error")  # any synchronising call in forward/backward raises
            try:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            opt.step()  # ends the step: the one device-to-host copy happens here
            opt.zero_grad()
            rep = diag.step()
    assert rep is not None and rep["conv1"].grad_std is not None


def _cuda_run(defer, strict):
    torch.manual_seed(0)
    model = zoo.kaiming_mlp(8, 256).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs = torch.randn(4, 64, 256, device="cuda")
    published = []
    with torchdiag.watch(model, config={"warnings": False, "defer_report": defer}) as diag:
        for x in xs:
            torch.cuda.synchronize()  # the previous step's copy is done: ending this step need not wait
            if strict:
                torch.cuda.set_sync_debug_mode("error")
            try:
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                rep = diag.step()  # stack, non-blocking copy, and the previous step's diagnosis
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if rep is not None:
                published.append(rep)
    return published, diag.report()


@cuda
def test_deferred_step_end_never_syncs_and_reports_what_blocking_does():
    late, late_final = _cuda_run("auto", strict=True)  # auto on a GPU model: deferred
    now, now_final = _cuda_run("never", strict=False)
    assert [r.step for r in late] == [0, 1, 2] and [r.step for r in now] == [0, 1, 2, 3]
    for a, b in zip(late + [late_final], now):
        assert a.step == b.step
        for la, lb in zip(a.layers, b.layers):
            assert la.act_std == pytest.approx(lb.act_std, rel=1e-6)
            assert la.grad_std == pytest.approx(lb.grad_std, rel=1e-6)


def _triton() -> bool:
    from torchdiag._stats import _fused as fused

    return torch.cuda.is_available() and fused.triton is not None


triton_cuda = pytest.mark.skipif(not _triton(), reason="needs CUDA and Triton")


@triton_cuda
@pytest.mark.parametrize("n", [1, 17, 1024, 70_001, 5_000_000, 40_000_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_row_equals_plain_formulas(n, dtype):
    from torchdiag._stats import _fused as fused

    torch.manual_seed(n)
    x = (torch.randn(n, device="cuda") * 3 + 1).to(dtype)
    x[::7] = 0  # zeros to count
    x[0] = 2.5  # the shift
    row = fused.row(x, saturation=(0.0, 2.0), zeros=True).tolist()
    ref = x.double()
    r = ref[0].item()
    assert row[0] == r
    assert row[1] == pytest.approx((ref - r).sum().item(), rel=1e-4, abs=1e-3 * math.sqrt(n))
    assert row[2] == pytest.approx((ref - r).pow(2).sum().item(), rel=1e-5)
    assert (row[3], row[4]) == (ref.min().item(), ref.max().item())
    # counts travel in the float32 row: exact below 2**24 elements, to float32's precision above
    assert row[5] == pytest.approx((ref != 0).sum().item(), rel=1e-7)
    assert row[6] == pytest.approx((ref.abs() > 2.0).sum().item(), rel=1e-7)
    plain = fused.row(x)
    assert math.isnan(plain[5].item()) and math.isnan(plain[6].item())


@triton_cuda
def test_fused_row_propagates_nan_and_inf():
    from torchdiag._stats import _fused as fused

    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(100_000, device="cuda")
        x[54_321] = bad
        row = fused.row(x).tolist()
        assert not (math.isfinite(row[3]) and math.isfinite(row[4]) and math.isfinite(row[1]))
    rep_layers = torchdiag.check(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).cuda(),
                                 torch.full((4, 8), float("nan"), device="cuda"))
    assert rep_layers.first_nonfinite == "0"


@triton_cuda
@pytest.mark.parametrize("n", [1, 5000, 3_000_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_histogram_counts_what_histc_counts(n, dtype):
    from torchdiag._stats import _fused as fused
    from torchdiag._stats import stats

    torch.manual_seed(n)
    x = (torch.randn(n, device="cuda") * 4 - 1).to(dtype)
    row = fused.row(x)
    out = torch.zeros(stats.HIST_BINS + 2, dtype=torch.float64, device="cuda")
    assert fused.histogram(x, row, out)
    mn, mx = x.min().float().item(), x.max().float().item()
    lo, hi = (mn - 1, mx + 1) if mn == mx else (mn, mx)
    ref = torch.histc(x.float(), bins=stats.HIST_BINS, min=lo, max=hi)
    assert out[:2].tolist() == [lo, hi]
    assert out[2:].tolist() == ref.double().tolist()
