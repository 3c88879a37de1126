"""locate_nonfinite: the operator, module and line that produced the first NaN/Inf of a batch.

Each broken model is built so that the right answer is known before torchdiag is asked: one operator in one
module turns finite inputs into a non-finite output, at a line of this file found by reading its source.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiag
from torchdiag.errors import TorchDiagError


def _line_of(fn, needle: str) -> str:
    lines, start = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if needle in text:
            return f"{inspect.getsourcefile(fn)}:{start + i}"
    raise AssertionError(f"{needle!r} not in {fn}")


class LogOfShifted(nn.Module):
    """log(x - 1): NaN wherever the input is below 1 (a ReLU output is, mostly)."""

    def forward(self, x):
        y = x * 1.0
        return torch.log(y - 1.0)


class SqrtLayer(nn.Module):
    """sqrt is finite at 0 in the forward; its derivative 1/(2 sqrt(x)) is Inf there."""

    def forward(self, x):
        return torch.sqrt(x)


def _log_net():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(16, 16), LogOfShifted())
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), inner, nn.Linear(16, 4))


def _sqrt_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), SqrtLayer(), nn.Linear(16, 4))
    return net


def test_a_log_of_negatives_is_traced_to_that_op_module_and_line():
    net, x = _log_net(), torch.randn(32, 8)
    # first principles: the inner Linear's output minus 1 is negative somewhere, so log makes NaN there
    with torch.no_grad():
        assert (net[2][0](net[1](net[0](x))) < 1).any()
    origin = torchdiag.locate_nonfinite(net, x)
    assert origin is not None
    assert (origin.phase, origin.module, origin.op, origin.value) == ("forward", "2.1", "aten.log", "NaN")
    assert origin.source == _line_of(LogOfShifted.forward, "torch.log")
    assert origin.parameter is None and origin.step is None
    assert str(origin).startswith("NaN first produced by `aten.log` in '2.1' (forward)")


def test_an_inf_made_only_in_the_backward_is_traced_to_sqrt():
    net, x = _sqrt_net(), torch.randn(32, 8)
    with torch.no_grad():  # the forward is finite; the ReLU makes exact zeros, where sqrt's slope is Inf
        out = net(x)
        assert torch.isfinite(out).all() and (net[1](net[0](x)) == 0).any()
    origin = torchdiag.locate_nonfinite(net, x)
    assert origin is not None
    assert (origin.phase, origin.module, origin.op) == ("backward", "2", "aten.sqrt")
    assert origin.source == _line_of(SqrtLayer.forward, "torch.sqrt")


def test_a_healthy_batch_has_no_origin_and_training_state_is_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(16, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assert torchdiag.locate_nonfinite(net, x) is None
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's running stats included
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in net.parameters())
    assert net.training


def test_the_loss_outside_the_model_and_a_user_loss_fn():
    net, x = nn.Sequential(nn.Linear(8, 4), nn.Tanh()), torch.randn(16, 8)

    def loss_fn(out):
        return torch.log(out).sum()  # tanh < 0 somewhere: NaN in the loss, outside any module

    origin = torchdiag.locate_nonfinite(net, x, loss_fn=loss_fn)
    assert (origin.phase, origin.module, origin.op) == ("forward", None, "aten.log")
    assert origin.source == _line_of(loss_fn, "torch.log")
    assert "outside any module" in str(origin)


def test_half_precision_overflow_names_the_matmul():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half()
    with torch.no_grad():
        net[0].weight.fill_(0.1), net[0].bias.zero_()  # h = 0.1 * sum(x) ~ 50, finite
        net[1].weight.fill_(300.0)  # 64 * 300 * 50 ~ 1e6 > 65504: the second matmul overflows fp16
    x = (torch.randn(8, 64).abs() * 10).half()
    with torch.no_grad():
        h = net[0](x)
        assert torch.isfinite(h).all() and not torch.isfinite(net[1](h)).all()
    origin = torchdiag.locate_nonfinite(net, x)
    assert (origin.phase, origin.module, origin.value) == ("forward", "1", "Inf")
    assert origin.op in ("aten.addmm", "aten.mm", "aten.linear")


def test_a_parameter_already_non_finite_and_an_input_with_nan():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].bias[0] = float("inf")
    origin = torchdiag.locate_nonfinite(net, torch.randn(2, 4))
    assert (origin.phase, origin.parameter, origin.module, origin.value) == ("forward", "1.bias", "1", "Inf")
    assert "already in parameter '1.bias'" in str(origin)
    net = nn.Linear(4, 2)
    x = torch.randn(2, 4)
    x[0, 0] = float("nan")
    origin = torchdiag.locate_nonfinite(net, x)
    assert origin.phase == "forward" and origin.op is None and "input" in origin.note


def test_under_autocast_and_for_a_compiled_model():
    net, x = _log_net(), torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        origin = torchdiag.locate_nonfinite(net, x)
    assert (origin.phase, origin.module, origin.op) == ("forward", "2.1", "aten.log")
    compiled = torch.compile(net, backend="eager")  # replayed eagerly: never compiled here
    origin = torchdiag.locate_nonfinite(compiled, x)
    assert (origin.phase, origin.module, origin.op) == ("forward", "2.1", "aten.log")


def test_keyword_inputs_reach_the_forward():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, *, shift):
            return F.softplus(self.lin(x)) - shift

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.kw, self.log = KW(), LogOfShifted()

        def forward(self, x, shift=0.0):
            return self.log(self.kw(x, shift=shift))

    assert torchdiag.locate_nonfinite(Net(), torch.randn(4, 4), shift=-100.0) is None  # softplus + 100 - 1 > 0
    origin = torchdiag.locate_nonfinite(Net(), torch.randn(4, 4), shift=5.0)
    assert (origin.module, origin.op) == ("log", "aten.log")


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"locate_nonfinite\(model=\.\.\.\): expected a torch.nn.Module, got int"):
        torchdiag.locate_nonfinite(3, torch.ones(1))
    with pytest.raises(TypeError, match="give the batch"):
        torchdiag.locate_nonfinite(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"loss_fn=\.\.\.\): expected a callable"):
        torchdiag.locate_nonfinite(nn.Linear(2, 2), torch.ones(1, 2), loss_fn=3)
    with pytest.raises(TorchDiagError, match="raised RuntimeError"):
        torchdiag.locate_nonfinite(nn.Linear(2, 2), torch.ones(1, 3))


# ------------------------------------------------------------------ the replay leaves the user's run as it was
class Poison(nn.Module):
    """Inf (an overflowing exp) wherever its input is above ~0.09, when ``on``; else the identity."""

    def __init__(self):
        super().__init__()
        self.on = False

    def forward(self, h):
        # exp overflows to Inf wherever h > ~0.09; its gradient path is cut (0 * h carries one, all zero), so the
        # updates stay finite
        return torch.exp(1000.0 * h.detach()) + 0.0 * h if self.on else h


class Clamp(nn.Module):
    def forward(self, h):
        return torch.clamp(h, -10.0, 10.0)


class RandomDepth(nn.Module):
    """A hand-written stochastic depth that draws from Python's ``random`` and NumPy's global generator (as timm's
    older DropPath and Hugging Face's SpecAugment masks do), and an Inf at one step that a clamp then removes: the
    watch sees a non-finite output and replays the step; the loss and the updates stay finite."""

    def __init__(self):
        super().__init__()
        self.fc1, self.poison_layer, self.clamp, self.fc2 = nn.Linear(8, 8), Poison(), Clamp(), nn.Linear(8, 2)

    @property
    def poison(self) -> bool:
        return self.poison_layer.on

    @poison.setter
    def poison(self, on: bool) -> None:
        self.poison_layer.on = on

    def forward(self, x):
        import random

        import numpy as np

        h = self.clamp(self.poison_layer(self.fc1(x)))
        keep = random.random() > 0.3
        return self.fc2(h * float(keep) * (1.0 + 0.1 * float(np.random.rand())))


def _random_depth_run(watched: bool) -> tuple[list[torch.Tensor], list[float], bool]:
    import random

    import numpy as np

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = RandomDepth()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 8, generator=gen) for _ in range(6)]
    with warnings.catch_warnings(record=True) as caught, \
            (torchdiag.watch(model, every=1) if watched else contextlib.nullcontext()) as diag:
        warnings.simplefilter("always")
        for step, x in enumerate(xs):
            model.poison = step == 2
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if diag is not None:
                diag.step()  # (the step ends here, its batch replayed while the poison is still on)
    replayed = any("first produced by" in str(w.message) for w in caught)
    return [p.detach().clone() for p in model.parameters()], [random.random(), float(np.random.rand())], replayed


def test_the_replay_and_check_leave_pythons_and_numpys_random_generators_as_they_were():
    pytest.importorskip("numpy")
    import random

    import numpy as np

    weights, draws, _ = _random_depth_run(watched=False)
    weights_w, draws_w, replayed = _random_depth_run(watched=True)
    assert replayed  # the watch replayed the step with the Inf (its warning names the operation)
    assert draws_w == draws  # the replay's forward drew from both generators, and gave back their states
    for a, b in zip(weights, weights_w):
        assert torch.equal(a, b)  # bit-identical training with the watch on
    random.seed(5)
    np.random.seed(5)
    torchdiag.check(RandomDepth(), torch.randn(4, 8))
    after = (random.random(), float(np.random.rand()))
    random.seed(5)
    np.random.seed(5)
    assert after == (random.random(), float(np.random.rand()))


def test_the_replay_never_fires_the_users_parameter_hooks():
    """A user's p.register_hook (per-parameter clipping, wandb.watch's gradient logging) must see one call per real
    backward. Right answer: as many calls with the watch as without, and the same weights, though the watch
    replays the step with the Inf (on detached aliases of the parameters)."""

    def run(watched: bool) -> tuple[int, list[torch.Tensor], bool]:
        import random

        import numpy as np

        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        model = RandomDepth()
        calls = {"n": 0}

        def count(g):
            calls["n"] += 1
            return g

        for p in model.parameters():
            p.register_hook(count)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        with warnings.catch_warnings(record=True) as caught, \
                (torchdiag.watch(model, every=1) if watched else contextlib.nullcontext()) as diag:
            warnings.simplefilter("always")
            for step in range(5):
                model.poison = step == 2
                model(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                if diag is not None:
                    diag.step()
        replayed = any("first produced by" in str(w.message) for w in caught)
        return calls["n"], [p.detach().clone() for p in model.parameters()], replayed

    pytest.importorskip("numpy")  # (RandomDepth draws from NumPy)
    n, weights, _ = run(False)
    n_w, weights_w, replayed = run(True)
    assert replayed  # the watch did replay the step (its warning names the operation)
    assert n == 5 * 4 and n_w == n
    for a, b in zip(weights, weights_w):
        assert torch.equal(a, b)


class WithMemory(nn.Module):
    """A forward that writes into objects it is given (a memory list, a cache dict), and an Inf at one step."""

    def __init__(self):
        super().__init__()
        self.fc1, self.poison_layer, self.clamp, self.fc2 = nn.Linear(8, 8), Poison(), Clamp(), nn.Linear(8, 2)

    def forward(self, x, memory, cache):
        memory.append(float(x.sum()))
        cache["calls"] = cache.get("calls", 0) + 1
        return self.fc2(self.clamp(self.poison_layer(self.fc1(x))))


def test_the_replay_never_writes_into_the_objects_the_batch_holds():
    """#28 item 2: the replay runs the forward again on the step's batch. Right answer: a list and a dict the user
    passes in the batch see one append and one count per real forward, with the watch's replay in between."""
    torch.manual_seed(0)
    model = WithMemory()
    memory, cache = [], {}
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught, torchdiag.watch(model, every=1) as diag:
        warnings.simplefilter("always")
        for step in range(5):
            model.poison_layer.on = step == 2
            model(torch.randn(4, 8, generator=gen), memory, cache).pow(2).mean().backward()
            model.zero_grad()
            diag.step()
    assert any("first produced by `aten.exp`" in str(w.message) for w in caught)  # the step was replayed
    assert len(memory) == 5 and cache == {"calls": 5}


class LogBlock(nn.Module):
    """A container without parameters of its own (so not a watched layer) whose forward body makes the NaN."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.log(self.fc(x) - 10.0)  # NaN wherever fc's output is below 10: made in this body, not in fc


def test_a_nan_made_in_an_unwatched_containers_forward_names_that_container_not_the_loss():
    """#28: the replay named ``module=None`` ("outside any module", which means the loss) for a NaN made in the
    forward body of a container that is not a watched layer. Right answer: the container, by its name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), LogBlock(), nn.Linear(8, 2))
    with warnings.catch_warnings(), torchdiag.watch(model, every=1) as diag:
        warnings.simplefilter("ignore")
        model(torch.randn(4, 8)).sum().backward()
        report = diag.step()
    assert "1" not in [x.name for x in report.layers if x.module_type == "LogBlock"]  # not a watched layer
    origin = report.nonfinite_origin
    assert origin is not None and origin.op == "aten.log" and origin.module == "1", origin


_BIG_BUFFER_RUN = r"""
import sys, warnings
import torch, torchdiag
from torch import nn
sys.path.insert(0, sys.argv[1])
from tests.unit.origin.test_origin import Clamp, Poison

def kib(key):  # from /proc/self/status: VmRSS (now) or VmHWM (the peak since the last reset)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

MB = 200
class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.poison, self.clamp = nn.Linear(8, 8), Poison(), Clamp()
        self.register_buffer("table", torch.ones(MB * 2**20 // 4))  # a large buffer (an embedding cache, a queue)
    def forward(self, x):
        return self.clamp(self.poison(self.fc(x))) + self.table[:8]
model = WithBuffer()
x = torch.randn(4, 8)
model(x).sum().backward()  # allocator warm
model.zero_grad()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from now
before = kib("VmRSS")
with warnings.catch_warnings(record=True) as caught, torchdiag.watch(model, every=1) as diag:
    warnings.simplefilter("always")
    model.poison.on = True
    model(x).sum().backward()
    model.zero_grad()
    diag.step()
replayed = any("first produced by" in str(w.message) for w in caught)
print(replayed, (kib("VmHWM") - before) / 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux: the peak resident size, reset")
def test_the_replay_holds_one_copy_of_the_buffers_not_two():
    """#28 item 14: the replay's model copy has its own buffers (its forward may update them); saving and restoring
    that copy's buffers as well held a second copy. Right answer: the peak grows by about one buffer (200 MB),
    measured as the peak resident size (reset just before the watch) of a fresh interpreter."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", _BIG_BUFFER_RUN, str(root)], capture_output=True, text=True,
                         timeout=240, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    replayed, grown = out.stdout.split()
    assert replayed == "True"
    assert 150 < float(grown) < 300, grown  # one copy (200 MB), not two (400 MB)
