"""What a recorded step launches per recorded tensor, counted with a ``TorchDispatchMode`` on the CPU with the C
kernel off (the ATen path, which is what a GPU without Triton runs): the proxy for the kernels and launches a
recording costs where no GPU can be timed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchdiag
from torchdiag._stats import _cpurow as cpurow

# views, detaches and reading a CPU scalar (the float32 reliability check, CPU only) launch no kernel
_FREE = {"aten.view.default", "aten.detach.default", "aten._local_scalar_dense.default", "aten.select.int",
         "aten._to_copy.default"}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def kernels(counted: Count) -> int:
    return sum(n for op, n in counted.ops.items() if op not in _FREE)


@pytest.fixture
def aten_path():
    cpurow.set_enabled(False)
    yield
    cpurow.set_enabled(True)


def test_a_recorded_tensor_costs_a_few_reductions_on_the_aten_path(aten_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(16, 32)

    def step() -> None:
        model(x).square().mean().backward()
        model.zero_grad()

    step()
    with Count() as plain:
        step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, every=1, nonfinite_origin=False, attention_rules=False,
                             output_logits_rule=False, adam_epsilon_rule=False) as diag:
            step()
            diag.step()
            with Count() as watched:
                step()
            report = diag.step()
    assert report is not None
    recorded = 2 * len(report.layers)  # every layer's output and its gradient
    extra = kernels(watched) - kernels(plain)
    print(f"{extra} kernels for {recorded} recorded tensors: {extra / recorded:.1f} each")
    # a sum, a dot and an aminmax per output, a sum and a dot per gradient; counts where a rule reads them
    assert 0 < extra / recorded <= 4.5
