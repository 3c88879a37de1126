"""The compiled path (issue #18): under torch.compile the statistics are traced into the graph, with no graph
break caused by torchdiag, at most two graphs per model (recorded and not), the same numbers as eager."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import torchdiag

dynamo = pytest.importorskip("torch._dynamo")
if not hasattr(torch, "compile"):
    pytest.skip("torch.compile is not available", allow_module_level=True)

BACKEND = "aot_eager"  # Dynamo and AOT autograd (the graphs inductor gets), without inductor's compile time


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        # PyTorch warns that global module hooks also see torch.compile's OptimizedModule
        warnings.filterwarnings("ignore", message=".*global hooks.*")
        yield
    dynamo.reset()


def _breaks() -> int:
    return sum(dynamo.utils.counters["graph_break"].values())


def _graphs() -> int:
    return dynamo.utils.counters["stats"]["unique_graphs"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _transformer() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(16, 4))


def _one_step(model: nn.Module, run: nn.Module, x: torch.Tensor, **kw) -> torchdiag.Report:
    with torchdiag.watch(model, warnings=False, **kw) as diag:
        run(x).square().mean().backward()
        return diag.step()


def _eager_and_fresh(make) -> tuple[torch.Tensor, nn.Module, torchdiag.Report, nn.Module]:
    """A batch for ``make``'s model, the model after one eager watched step and that step's report, and a fresh
    model to compile."""
    x = torch.randn(8, 5, 16) if make is _transformer else torch.randn(8, 16)
    eager_model = make()
    return x, eager_model, _one_step(eager_model, eager_model, x), make()


FIELDS = ("act_mean", "act_std", "act_absmax", "zero_fraction", "saturated_fraction", "grad_std", "grad_norm",
          "weight_std", "gain", "calls")


def _assert_same(eager: torchdiag.Report, comp: torchdiag.Report) -> None:
    assert [r.name for r in comp.layers] == [r.name for r in eager.layers]
    for a, b in zip(eager.layers, comp.layers):
        for f in FIELDS:
            va, vb = getattr(a, f), getattr(b, f)
            if va is None:
                assert vb is None, (a.name, f)
            elif f == "act_mean":  # a mean near 0 (a norm's output) is known to float32 rounding of values of its std
                assert vb == pytest.approx(va, rel=1e-5, abs=1e-6 * (a.act_std or 1.0)), (a.name, f, va, vb)
            else:
                assert vb == pytest.approx(va, rel=1e-5, abs=1e-7), (a.name, f, va, vb)


@pytest.mark.parametrize("make", [_net, _transformer], ids=["mlp", "transformer"])
def test_compiled_statistics_equal_eager_and_no_graph_break(make):
    x, eager_model, eager, model = _eager_and_fresh(make)
    comp = _one_step(model, torch.compile(model, backend=BACKEND), x)
    assert _breaks() == 0, dict(dynamo.utils.counters["graph_break"])
    assert _graphs() == 1
    assert len(comp.layers) == len(eager.layers) > 3
    _assert_same(eager, comp)
    for p, q in zip(eager_model.parameters(), model.parameters()):  # the same training step
        assert torch.equal(p.grad, q.grad)


def test_compiled_statistics_against_plain_tensor_ops():
    model = _net()
    x = torch.randn(8, 16)
    y0 = model[0](x)
    h = torch.relu(y0)
    h.retain_grad()
    model[4](torch.tanh(model[2](h))).square().mean().backward()
    g = h.grad.double()
    model.zero_grad()
    rep = _one_step(model, torch.compile(model, backend=BACKEND), x)
    relu = rep.layers[1]
    h64 = h.detach().double()
    assert relu.name == "1"
    assert relu.act_mean == pytest.approx(h64.mean().item(), rel=1e-6)
    assert relu.act_std == pytest.approx(h64.std(unbiased=False).item(), rel=1e-6)
    assert relu.zero_fraction == pytest.approx((h64 == 0).double().mean().item())
    assert relu.act_absmax == pytest.approx(h64.abs().max().item(), rel=1e-6)
    assert relu.grad_std == pytest.approx(g.std(unbiased=False).item(), rel=1e-5)
    assert relu.grad_norm == pytest.approx(g.norm().item(), rel=1e-5)
    assert rep.layers[0].gain == pytest.approx(y0.detach().double().std(unbiased=False).item()
                                               / x.double().square().mean().sqrt().item(), rel=1e-5)


def test_unrecorded_steps_run_the_second_graph_without_recompiling():
    model = _net()
    run = torch.compile(model, backend=BACKEND)
    x = torch.randn(8, 16)
    reports = []
    with torchdiag.watch(model, every=3, warnings=False) as diag:
        for i in range(8):
            run(x).square().mean().backward()
            reports.append(diag.step())
            if i == 1:
                graphs = _graphs()
    assert graphs == 2  # recorded and not
    assert _graphs() == 2 and _breaks() == 0
    assert [r is not None for r in reports] == [i % 3 == 0 for i in range(8)]
    assert all(len(r.layers) == 5 for r in reports if r is not None)


def test_the_wrapper_of_a_compiled_model_keeps_the_forward_hook_on_at_steps_not_recorded():
    """A step no watch records runs under torchdiag's pre-hook alone, except while torch.compile(model)'s wrapper
    is in use: its forward hook sees the wrapper's exit. The graphs stay the two of the recorded and the plain
    steps, each recorded step equals the eager one, and the next watch starts unpinned."""
    from torch.nn.modules import module as module_mod

    model, eager = _net(), _net()
    run = torch.compile(model, backend=BACKEND)
    before = set(module_mod._global_forward_hooks)
    x = torch.randn(8, 16)
    hooked, reports, expected = [], [], []
    with torchdiag.watch(model, every=3, warnings=False) as diag, \
            torchdiag.watch(eager, every=3, warnings=False) as eager_diag:
        for _ in range(7):
            hooked.append(bool(set(module_mod._global_forward_hooks) - before))
            run(x).square().mean().backward()
            eager(x).square().mean().backward()
            reports.append(diag.step())
            expected.append(eager_diag.step())
    assert hooked == [True] * 7
    assert set(module_mod._global_forward_hooks) == before
    assert _graphs() == 2 and _breaks() == 0
    assert [r is not None for r in reports] == [i % 3 == 0 for i in range(7)]
    for got, want in zip(reports, expected):
        if want is not None:
            assert [layer.act_rms for layer in got.layers] == pytest.approx([layer.act_rms for layer in want.layers],
                                                                            rel=1e-5)
    with torchdiag.watch(eager, every=3, warnings=False) as diag:  # no wrapper in use: the pre-hook alone
        hooked = []
        for _ in range(2):
            hooked.append(bool(set(module_mod._global_forward_hooks) - before))
            eager(x).square().mean().backward()
            diag.step()
    assert hooked == [True, False]


# compiles ``how`` at step 1, a step not recorded (steps end at step(), so it runs without torchdiag's hooks), and
# prints the act_rms of each recorded step's layers, compiled and eager
_FIRST_COMPILED_MID_RUN = """
import json, sys, warnings
import torch
from torch import nn
import torchdiag
warnings.filterwarnings("ignore")


class Net(nn.Module):  # a class of the user's own: Dynamo compiles its forward (an nn.Sequential's is torch's)
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


how, preload = sys.argv[1], sys.argv[2] == "1"
if preload:
    import torch._dynamo
assert ("torch._dynamo" in sys.modules) == preload
model, eager, x = Net(), Net(), torch.randn(8, 16)
run, got = model, []
with torchdiag.watch(model, every=3, warnings=False) as diag, torchdiag.watch(eager, every=3, warnings=False) as ed:
    for i in range(7):
        if i == 1:
            if how == "wrapper":
                run = torch.compile(model, backend="aot_eager")
            else:
                model.compile(backend="aot_eager")
        run(x).square().mean().backward()
        eager(x).square().mean().backward()
        r, e = diag.step(), ed.step()
        got.append(None if r is None else [[l.act_rms for l in r.layers], [l.act_rms for l in e.layers]])
print(json.dumps(got))
"""


@pytest.mark.parametrize("preload", [False, True], ids=["dynamo-loaded-by-compile", "dynamo-loaded-before"])
@pytest.mark.parametrize("how", ["wrapper", "in place"])
def test_a_model_first_compiled_on_a_step_run_without_hooks_is_recorded_after_it(how, preload):
    """Steps that end at diag.step() and are not recorded run without torchdiag's hooks. A model compiled for the
    first time on such a step (torch.compile(model) or model.compile() mid-run) is traced with the pre-hook on,
    which reads whether a step is recorded: the recorded steps after it equal eager ones. In a fresh process, with
    Dynamo loaded before the watch (its compile-start callback puts the pre-hook back) and without (no optimizer
    has loaded it: the pre-hook stays on until Dynamo is loaded)."""
    import json
    import subprocess
    import sys

    args = ["wrapper" if how == "wrapper" else "inplace", str(int(preload))]
    out = subprocess.run([sys.executable, "-c", _FIRST_COMPILED_MID_RUN, *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [g is not None for g in got] == [i % 3 == 0 for i in range(7)]
    for step in (3, 6):
        compiled, eager = got[step]
        assert len(compiled) == 3
        assert compiled == pytest.approx(eager, rel=1e-5)


def test_a_compiled_module_that_is_not_watched_does_not_keep_the_forward_hook_on():
    from torch.nn.modules import module as module_mod

    model, helper = _net(), torch.compile(nn.Linear(4, 4), backend=BACKEND)
    before = set(module_mod._global_forward_hooks)
    x = torch.randn(8, 16)
    hooked = []
    with torchdiag.watch(model, every=3, warnings=False) as diag:
        for _ in range(4):
            hooked.append(bool(set(module_mod._global_forward_hooks) - before))
            helper(model(x)).square().mean().backward()  # (a compiled head the watch does not hold)
            diag.step()
    assert hooked == [True, False, False, True]


@pytest.mark.parametrize("summed", [False, True], ids=["backward-each", "one-backward"])
def test_microbatches_and_a_shared_module_merge_like_eager(summed):
    shared = nn.Linear(8, 8)
    net = nn.Sequential(shared, nn.ReLU(inplace=True), shared)  # (in place on a tapped output)
    xs = [torch.randn(4, 8), torch.randn(4, 8)]
    reports = []
    for compiled in (False, True):
        model = copy.deepcopy(net)
        run = torch.compile(model, backend=BACKEND) if compiled else model
        with torchdiag.watch(model, warnings=False, auto_step=False) as diag:
            if summed:  # two forwards of one graph, then one backward through both
                sum(run(x).sum() for x in xs).backward()
            else:  # gradient accumulation: two forwards and backwards in one step
                for x in xs:
                    run(x).sum().backward()
            reports.append(diag.step())
    eager, comp = reports
    assert eager.layers[0].calls == 4
    _assert_same(eager, comp)


def test_an_unwatched_model_compiles_exactly_as_without_torchdiag():
    graphs: list[str] = []

    def backend(gm, example_inputs):  # the graph's inputs (their order may differ) and its operations
        nodes = list(gm.graph.nodes)
        # an operation's arguments by what they are (an input by name, another node by its position), not by the
        # name Dynamo gave its variable, which follows the names in the Python code it traced through
        where = {n: n.name if n.op == "placeholder" else f"%{i}" for i, n in enumerate(nodes)}
        graphs.append((sorted(n.name for n in nodes if n.op == "placeholder"),
                       [(n.op, str(n.target), str(torch.fx.node.map_arg(n.args, lambda a: where[a])))
                        for n in nodes if n.op != "placeholder"]))
        return gm.forward

    x = torch.randn(8, 16)
    plain = _net()
    torch.compile(plain, backend=backend)(x).sum().backward()
    dynamo.reset()
    other, model = nn.Linear(3, 3), _net()
    with torchdiag.watch(other, warnings=False):
        torch.compile(model, backend=backend)(x).sum().backward()
    assert _breaks() == 0
    assert len(graphs) == 2 and graphs[0] == graphs[1]


def test_a_model_compiled_and_run_before_watch_is_said_once_and_recorded_after_reset():
    model = _net()
    run = torch.compile(model, backend=BACKEND)
    x = torch.randn(8, 16)
    run(x).sum().backward()
    with torchdiag.watch(model, warnings=False) as diag:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                run(x).sum().backward()
                diag.step()
        said = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
        assert len(said) == 1 and "torch.compiler.reset()" in said[0], said
        torch.compiler.reset()
        run(x).sum().backward()
        rep = diag.step()
    assert rep is not None and len(rep.layers) == 5


def test_compiled_training_is_bit_identical_with_and_without_torchdiag():
    finals = []
    x, y = torch.randn(16, 16), torch.randn(16, 4)
    for watched in (False, True):
        dynamo.reset()
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = torch.compile(model, backend=BACKEND)
        ctx = torchdiag.watch(model, every=2, warnings=False) if watched else None
        if ctx is not None:
            ctx.__enter__()
        for _ in range(4):
            (run(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if ctx is not None:
                ctx.step()
        if ctx is not None:
            ctx.__exit__(None, None, None)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_compiled_nonfinite_output_is_flagged_like_eager():
    reports = []
    for compiled in (False, True):
        model = _net()
        with torch.no_grad():
            model[2].weight[0, 0] = math.inf
        x = torch.randn(8, 16)
        reports.append(_one_step(model, torch.compile(model, backend=BACKEND) if compiled else model, x))
    eager, comp = reports
    assert comp.first_nonfinite == eager.first_nonfinite == "2"


class _Broken(nn.Module):
    """A model whose own forward breaks the graph (and checkpoints a block): several graphs, and a region whose
    forward re-runs in backward."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)
        self.checkpointed = checkpointed

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.b, h, use_reentrant=False)
        else:
            h = self.b(h)
        return self.head(h)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["graph-break", "checkpoint"])
def test_the_models_own_graph_breaks_and_checkpointing(checkpointed):
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    plain = _Broken(checkpointed)
    torch.compile(plain, backend=BACKEND)(x).sum().backward()
    breaks = _breaks()
    dynamo.reset()
    dynamo.utils.counters.clear()
    model = copy.deepcopy(plain)
    eager_model = copy.deepcopy(plain)
    eager = _one_step(eager_model, eager_model, x)
    comp = _one_step(model, torch.compile(model, backend=BACKEND), x)
    assert _breaks() == breaks  # the model's own, none added
    recorded = {r.name for r in comp.layers}
    if checkpointed:  # modules inside a checkpointed region are not traced (their forward re-runs in backward)
        assert recorded == {"a.0", "a.1", "head"}, recorded
        eager.layers = [r for r in eager.layers if r.name in recorded]
        comp.layers = [r for r in comp.layers if r.name in recorded]
        for r in (*eager.layers, *comp.layers):
            r.gain = None  # (head's input comes from the unrecorded block)
    _assert_same(eager, comp)
    for p, q in zip(eager_model.parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_two_forwards_then_one_backward_never_raises():
    model = _net()
    run = torch.compile(model, backend=BACKEND)
    x = torch.randn(8, 16)
    with torchdiag.watch(model, warnings=False) as diag:
        for _ in range(2):
            loss = run(x).sum() + run(x).sum()  # the second forward is an auto-step
            loss.backward()
        rep = diag.report()
    assert rep.layers and rep.layers[0].grad_std is not None


def test_model_compile_says_once_that_steps_end_at_step_and_records_them():
    model = _net()
    model.compile(backend=BACKEND)
    x = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, warnings=False, every=2) as diag:
            reports = []
            for _ in range(4):
                model(x).sum().backward()
                reports.append(diag.step())
    said = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    assert len(said) == 1 and "diag.step()" in said[0], said
    assert [r is not None for r in reports] == [True, False, True, False]
    assert len(reports[2].layers) == 5 and _breaks() == 0


@pytest.mark.parametrize("make", [_net, _transformer], ids=["mlp", "transformer"])
def test_successive_watches_of_one_compiled_model_keep_the_number_of_graphs_bounded(make):
    # issue #28 item 4: each watch of a compiled model compiled new graphs (guards on the watch's own gate key and
    # on the new ids of the process-wide hooks), until the recompile limit left the model running eagerly
    x, _, eager, model = _eager_and_fresh(make)
    run = torch.compile(model, backend=BACKEND)
    compiled_before: list[int] = []
    reports = []
    for _ in range(10):  # more than the recompile limit (8)
        with torchdiag.watch(model, every=2, warnings=False) as diag:
            for _ in range(3):  # recorded, not, recorded
                model.zero_grad()
                run(x).square().mean().backward()
                rep = diag.step()
                if rep is not None:
                    reports.append(rep)
        compiled_before.append(_graphs())
    assert _breaks() == 0
    assert compiled_before[-1] == compiled_before[0] == 2  # recorded and not, in the first watch; none after
    assert len(reports) == 20
    _assert_same(eager, reports[-2])  # the last watch's first step: the same numbers as eager


@pytest.mark.parametrize("how", ["model.compile()", "compiled step"])
def test_successive_watches_of_a_model_compiled_without_its_wrapper_keep_the_number_of_graphs_bounded(
        how, no_compiled_graphs):
    """Without torch.compile(model)'s wrapper nothing pins the hooks on: steps not recorded run without the forward
    hook, and where steps end at step() without the pre-hook too, until Dynamo compiles; from then on the pre-hook
    stays on, also in later watches (taken off there, it would fail the guards of the graphs traced with it: one
    graph more per watch, until Dynamo's recompile limit left the model running eagerly)."""
    class Net(nn.Module):  # a class of the user's own: Dynamo compiles its forward
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    model, x = Net(), torch.randn(8, 16)
    if how == "model.compile()":
        model.compile(backend=BACKEND)
        loss_of = lambda: model(x).square().mean()  # noqa: E731
    else:
        loss_of = torch.compile(lambda: model(x).square().mean(), backend=BACKEND)
    graphs, recorded = [], 0
    for _ in range(10):  # more than the recompile limit (8)
        with torchdiag.watch(model, every=2, warnings=False) as diag:
            for _ in range(3):  # recorded, not, recorded
                model.zero_grad()
                loss_of().backward()
                rep = diag.step()
                recorded += rep is not None and len(rep.layers) == 2
        graphs.append(_graphs())
    assert graphs == [graphs[0]] * 10 and _breaks() == 0, graphs
    assert recorded == 20


def test_a_compiled_forward_that_raises_leaves_its_wrapper_so_eager_forwards_count_steps_again():
    from torchdiag._capture import _compiled as compiled

    model = _net()
    run = torch.compile(model, backend=BACKEND)
    x = torch.randn(8, 16)
    with torchdiag.watch(model, warnings=False) as diag:
        run(x).sum().backward()
        key = diag._recorder.capture.gate.key
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever Dynamo or the op raises
            run(torch.randn(8, 3))  # raises inside the compiled model's forward
        assert not compiled.is_wrapped(key)  # left: the root's own pre-hook counts eager forwards again
        for _ in range(3):
            model(x).sum().backward()  # eager forwards: each ends the step before it (auto-step)
    assert diag.report().step >= 2
