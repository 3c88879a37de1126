"""CUDA: statistics on the device, no host sync inside any hook, one copy per recorded step.

Skipped without a GPU (CI has none); run on a machine with one.
"""

import pytest
import torch
from torch import nn

import torchdiag

from . import zoo

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
