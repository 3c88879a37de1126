"""Never leak: memory flat over a long run, nothing held after the watch."""

import gc
import tracemalloc

import pytest
import torch
from torch import nn

import torchdiag


def test_500_steps_hold_memory_flat():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(16, 32)
    with torchdiag.watch(model, every=1) as diag:
        for _ in range(50):  # warm up: buffers reach their steady size
            model(x).sum().backward()
            diag.step()
        gc.collect()
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(500):
            model(x).sum().backward()
            diag.step()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    # one step's report is a few tens of KB; a growing history would add that per step (~10+ MB here)
    assert grown < 1_000_000, f"python heap grew by {grown} bytes over 500 steps"
    model.zero_grad()


def test_no_gradient_hook_piles_up_on_a_parameter_a_module_returns():
    # issue #14 item 3: a watched module whose output is a persistent tensor (a parameter through Identity)
    # got one more capture hook per step: 2,000 hooks after 2,000 steps
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(4, 8))
            self.id = nn.Identity()

        def forward(self, x):
            return x + self.id(self.pos)

    model = Table()
    with torchdiag.watch(model) as diag:
        for _ in range(50):
            model(torch.randn(4, 8)).sum().backward()
            diag.step()
            assert len(model.pos._backward_hooks or {}) <= 1
        report = diag.report()
    assert not model.pos._backward_hooks
    # the gradient at Identity's output (the parameter) is still recorded: d sum / d pos = 1 everywhere
    assert report["id"].grad_std == 0.0
    assert report["id"].grad_norm == pytest.approx(torch.ones(4, 8, dtype=torch.float64).norm().item(), rel=1e-7)


def test_a_dropped_watcher_never_exited_unmarks_the_model_and_removes_its_hooks():
    from torch.nn.modules import module as module_mod

    from torchdiag._capture import capture

    before = len(module_mod._global_forward_hooks) + len(module_mod._global_forward_pre_hooks)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = torchdiag.watch(model, optimizer=opt, rescale_grads=2.0)
    w.__enter__()  # entered, never exited: then dropped
    del w
    gc.collect()
    assert not capture.is_watched(model)
    assert len(module_mod._global_forward_hooks) + len(module_mod._global_forward_pre_hooks) == before
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with torchdiag.watch(model) as diag:  # and it can be watched again
        model(torch.randn(2, 4)).sum().backward()
        assert diag.step() is not None
