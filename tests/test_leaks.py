"""Never leak: memory flat over a long run, nothing held after the watch."""

import gc
import tracemalloc

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
