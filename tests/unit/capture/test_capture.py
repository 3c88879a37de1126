"""capture.Capture and stepbuffer.StepBuffer as units: what the hooks write, and what they trace."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from tests.helpers import zoo
from tests.helpers.recording import recording
from torchdiag._stats import stats
from torchdiag._stats.stepbuffer import Pending, StepBuffer, arrive, decode
from torchdiag._vocab import Row


def test_rows_own_their_storage_so_no_activation_stays_alive():
    # a 0-d view (x[0]) kept until the step ends would pin the whole activation (and see in-place edits)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].bias[0] = -100.0
    with recording(model) as rec:
        y = model(torch.randn(256, 64))
        ref = weakref.ref(y)
        y.sum().backward()
        del y
        gc.collect()
        values = [v for vs in rec.buffer.values.values() for v in vs]
        # (a row is 0-d values, or one tensor from a kernel: either way, storage of its own size)
        assert values and all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in values)
        assert ref() is None


def test_one_activation_and_one_gradient_row_per_layer_call():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with recording(model) as rec:
        model(torch.randn(4, 8)).sum().backward()
        kinds = [(slot, kind) for slot, kind, *_ in rec.buffer.entries]
    for slot in (0, 1, 2):
        assert kinds.count((slot, Row.ACT)) == 1 and kinds.count((slot, Row.GRAD)) == 1
    assert (3, Row.ROOT_IN) in kinds and (3, Row.ROOT_GRAD) in kinds  # the Sequential: model input, output grad
    assert (2, Row.INPUT) in kinds  # the second Linear's input is the ReLU's output: its sum of squares
    assert rec.capture.order == {0: 0, 1: 1, 2: 2}


def test_unrecorded_step_writes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with recording(model, every=2) as rec:
        model(torch.randn(4, 8)).sum().backward()
        assert rec.end_step() is not None
        model(torch.randn(4, 8)).sum().backward()
        assert rec.buffer.entries == [] and rec.capture.order == {}
        assert rec.end_step() is None


def test_feeds_norm_is_traced_by_tensor_identity_not_execution_order():
    torch.manual_seed(0)
    model = zoo.preact_resnet_fixed(blocks=2, c=8)
    with recording(model) as rec:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        traced = {s.name: s.feeds_norm for s in rec.slots}
    assert traced["1.conv1"] is True  # conv1 -> bn2 directly
    assert traced["1.conv2"] is False  # conv2 -> residual sum -> next block's bn1
    assert traced["0"] is True  # the stem conv's output is the first block's bn1 input
    model.eval()  # an eval-mode BatchNorm is an affine map with running stats: it normalises nothing
    with recording(model) as rec:
        rec.capture.record_eval = True
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert not any(s.feeds_norm for s in rec.slots)


class _FreedThenNormed(nn.Module):
    """A Linear whose output is freed before the norm runs: what the norm reads, tanh(3 y), is a new tensor, which
    Python puts at the address the freed output had (its id), so that an id alone would name the Linear as its
    producer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.head = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)
        self.reused = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        was = id(y)
        z = y * 3.0
        del y
        w = torch.tanh(z)
        self.reused += id(w) == was
        return self.head(self.norm(w))


def test_a_tensor_at_the_address_of_a_freed_output_is_not_taken_for_that_output():
    """Right answer: the norm reads tanh(3 y), not the Linear's output y, so the Linear does not feed the norm (its
    scale is not undone by it); the Linear feeding the norm directly does."""
    torch.manual_seed(0)
    model = _FreedThenNormed()
    with recording(model) as rec:
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
        traced = {s.name: s.feeds_norm for s in rec.slots}
    assert model.reused == 3  # (the address was reused at every forward: the case the test is about)
    assert traced["a"] is False
    model.forward = lambda x: model.head(model.norm(model.a(x)))  # the Linear straight into the norm
    with recording(model) as rec:
        model(torch.randn(4, 8)).sum().backward()
        assert {s.name: s.feeds_norm for s in rec.slots}["a"] is True


def test_the_shift_policy_follows_the_last_recorded_step():
    class Offset(nn.Module):
        def forward(self, x):
            return x * 1e-3 + 100.0

    model = nn.Sequential(nn.Linear(16, 16), Offset())
    with recording(model) as rec:
        for _ in range(3):
            model(torch.randn(4096, 16)).sum().backward()
            rec.end_step()
        slots = {s.name: s for s in rec.slots}
        assert slots["0"].shift_act is False and slots["1"].shift_act is True


# ------------------------------------------------------------------ the step buffer alone
def test_buffer_round_trip_decodes_rows_into_moments():
    x, g = torch.randn(1000), torch.randn(1000) * 3
    buf = StepBuffer()
    buf.write(0, Row.ACT, x.numel(), x.device, stats.act_row(x))
    buf.write(0, Row.GRAD, g.numel(), g.device, stats.grad_row(g))
    buf.write(0, Row.INPUT, x.numel(), x.device, [stats.sumsq(x)])
    pending = buf.launch(Pending(step=0, entries=buf.entries, order={0: 0}, calls={0: 1}, reduce=False,
                                 hist_entries=[]), with_histograms=False, defer=False)
    host, hist = arrive(pending)
    step = decode(pending, host)
    act, grad = step.moments[(0, Row.ACT)], step.moments[(0, Row.GRAD)]
    assert act.n == 1000 and act.mean == pytest.approx(x.mean().item(), abs=1e-6)
    assert act.std == pytest.approx(x.std(correction=0).item(), rel=1e-5)
    assert (act.min, act.max) == (x.min().item(), x.max().item())
    assert grad.std == pytest.approx(g.std(correction=0).item(), rel=1e-5)
    inp = step.sumsq[(0, Row.INPUT)]
    assert (inp.total, inp.n) == (pytest.approx((x.double() ** 2).sum().item(), rel=1e-5), 1000)
    assert hist == {}


def test_buffer_unscales_gradients_by_the_step_scale_and_rolls_back():
    g = torch.randn(100)
    buf = StepBuffer()
    row = stats.grad_row(g * 1024)
    width = row.numel() if isinstance(row, torch.Tensor) else len(row)  # 3 values, or a kernel's whole row
    buf.write(0, Row.GRAD, g.numel(), g.device, row)
    mark = buf.mark()
    buf.write(-1, Row.SCALE, 1, g.device, [torch.tensor(1024.0)])
    pending = buf.launch(Pending(step=0, entries=buf.entries, order={0: 0}, calls={0: 1}, reduce=False,
                                 hist_entries=[]), with_histograms=False, defer=False)
    step = decode(pending, arrive(pending)[0])
    assert step.scale == 1024.0
    assert step.moments[(0, Row.GRAD)].std == pytest.approx(g.std(correction=0).item(), rel=1e-5)
    buf.rollback(mark)
    assert len(buf.entries) == 1 and buf.sizes[g.device] == width
