"""watch(): lifecycle, never changing training, steps, warnings, TensorBoard stream, errors."""

import copy
import gc
import io
import os
import pickle
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_mod

import torchdiag
from tests.helpers.recording import hook_ids as _ours
from torchdiag._capture import capture


def small_net():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(32, 32),
                         nn.ReLU(), nn.Linear(32, 4))


def n_global_hooks():
    return len(module_mod._global_forward_hooks) + len(module_mod._global_forward_pre_hooks)


def train(model, steps, *, watched, **kw):
    torch.manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(steps, 8, 16), torch.randint(0, 4, (steps, 8))

    def loop(diag=None):
        for i in range(steps):
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            opt.step()
            opt.zero_grad()
            if diag is not None:
                diag.step()

    if watched:
        with torchdiag.watch(model, **kw) as diag:
            loop(diag)
        return diag
    loop()
    return None


def test_weights_bit_identical_with_and_without_watch():
    torch.manual_seed(0)
    a = small_net()
    b = copy.deepcopy(a)
    train(a, 5, watched=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(b, 5, watched=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_hooks_and_references_gone_after_exit_and_after_exception():
    before = n_global_hooks()
    len_pre, len_post = len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)
    model = small_net()
    with torchdiag.watch(model) as diag:
        # one pre-hook and one forward hook for everything torchdiag does: capture, signals, the non-finite tripwire
        assert len(module_mod._global_forward_pre_hooks) == len_pre + 1
        assert len(module_mod._global_forward_hooks) == len_post + 1
        model(torch.randn(4, 16)).sum().backward()
    assert n_global_hooks() == before
    assert not capture.is_watched(model) and not capture.global_hooks_installed()

    with pytest.raises(RuntimeError, match="user error"):
        with torchdiag.watch(model):
            model(torch.randn(4, 16)).sum().backward()
            raise RuntimeError("user error")
    assert n_global_hooks() == before
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())

    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "the watcher kept a reference to the model"
    assert diag.report().layers  # the report outlives the model


def test_a_step_no_watch_records_runs_no_hook_where_steps_end_at_step(no_compiled_graphs):
    """The hooks cost every module call. Steps that end at ``diag.step()`` need no hook at the root's forward, so a
    step that is not recorded runs with neither of torchdiag's hooks; a recorded step gets both back under the ids
    they had, and its statistics are the layers' own."""
    torch.manual_seed(0)
    model = small_net()
    model[2].p = 0.0  # (the same output whatever the step)
    x = torch.randn(8, 16)
    pre, post, reports, outputs = [], [], [], []
    with torchdiag.watch(model, every=3, warnings=False) as diag:
        for _ in range(7):
            pre.append(_ours(module_mod._global_forward_pre_hooks))
            post.append(_ours(module_mod._global_forward_hooks))
            out = model(x)
            outputs.append(out.detach().clone())
            out.square().mean().backward()
            reports.append(diag.step())
    recorded = [True, False, False, True, False, False, True]
    assert [bool(ids) for ids in post] == [bool(ids) for ids in pre] == recorded
    for ids in (pre, post):
        assert ids[0] == ids[3] == ids[6] and len(ids[0]) == 1  # one hook each, under one id
    assert not _ours(module_mod._global_forward_hooks) and not _ours(module_mod._global_forward_pre_hooks)
    for step in (0, 3, 6):
        rms = outputs[step].square().mean().sqrt().item()
        assert reports[step].step == step
        assert reports[step]["5"].act_std == pytest.approx(outputs[step].std(correction=0).item(), rel=1e-4)
        assert reports[step]["5"].act_rms == pytest.approx(rms, rel=1e-4)


def test_steps_that_end_at_the_roots_forward_keep_the_pre_hook_on_every_step():
    """Without ``step()`` calls a forward of the root ends the step (auto-step): the pre-hook that sees it stays on
    the steps not recorded, alone, and every forward is counted."""
    model = small_net()
    x = torch.randn(8, 16)
    pre = []
    with torchdiag.watch(model, every=3, warnings=False) as diag:
        for _ in range(7):
            pre.append(bool(_ours(module_mod._global_forward_pre_hooks)))
            model(x).square().mean().backward()
        assert diag.step_count == 6
    assert pre == [True] * 7
    assert diag.report().step == 6 and diag.report()["0"].calls == 1


def test_no_activation_kept_alive_after_its_hook():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    refs = []
    h = model[0].register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
    with torchdiag.watch(model):
        model(torch.randn(4, 16)).sum().backward()
        gc.collect()
        assert refs and refs[0]() is None
    h.remove()


def test_an_inplace_edit_after_the_row_does_not_change_the_recorded_moments():
    # (that the rows own their storage is tests/unit/capture/test_capture.py's); here the figures the user sees
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].bias[0] = -100.0  # the first element (the shift) is negative: the in-place ReLU zeroes it
    x = torch.randn(256, 64)
    with torchdiag.watch(model) as diag:
        model(x).sum().backward()
        rep = diag.step()
    pre = model[0](x).detach().double()
    assert rep["0"].act_mean == pytest.approx(pre.mean().item(), rel=1e-5)
    assert rep["0"].act_std == pytest.approx(pre.std(correction=0).item(), rel=1e-5)


def test_inplace_relu_gradient_is_the_pre_activation_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
    x = torch.randn(32, 8)
    report = torchdiag.check(model, x, loss_fn=lambda out: out.sum())
    # independent: the same net without in-place, gradient of the Linear output via retain_grad
    y = model[0](x)
    y.retain_grad()
    model[2](torch.relu(y)).sum().backward()
    assert report["0"].grad_std == pytest.approx(y.grad.std(correction=0).item(), rel=1e-5)
    model.zero_grad()


def test_inplace_residual_and_training_runs():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.lin(x)
            out += x  # in place on a module output, as torchvision's BasicBlock does
            return self.act(out)

    model = nn.Sequential(Block(), Block(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    train(ref, 3, watched=False)
    diag = train(model, 3, watched=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert {layer.name for layer in diag.report().layers} >= {"0.lin", "0.act", "1.lin", "2"}


def test_every_n_records_steps_0_n_2n_and_no_grad_forward_does_not_overwrite(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    with torchdiag.watch(model, logdir=tmp_path, every=3) as diag:
        for _ in range(7):
            model(x).sum().backward()
            with torch.no_grad():  # a validation forward on other data
                model(torch.randn(8, 16) * 100)
            diag.step()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("log10_act_std/0")  # (the stds' log10 twins are written at every recorded step)
    assert [e.step for e in events] == [0, 3, 6]
    ref = model[0](x).detach().double().std(correction=0).item()  # weights never changed
    assert 10 ** events[-1].value == pytest.approx(ref, rel=1e-5)
    assert diag.report().step == 6


def test_auto_step_without_step_calls():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with torchdiag.watch(model) as diag:
        for i in range(3):
            model(torch.randn(8, 4) * (i + 1)).sum().backward()
        assert diag.step_count == 2
    assert diag.report().step == 2
    assert diag.report()["0"].grad_std is not None


def test_deepcopy_pickle_and_save_inside_watch_and_copy_not_recorded():
    model = small_net()
    with torchdiag.watch(model) as diag:
        ema = copy.deepcopy(model)
        pickle.dumps(model)
        torch.save(model, io.BytesIO())
        ema(torch.randn(4, 16) * 1000).sum().backward()  # must not be recorded into model's watch
        model(torch.randn(4, 16)).sum().backward()
        rep = diag.step()
    assert rep["0"].calls == 1
    assert rep["0"].act_absmax < 100


def test_nested_watch_is_a_clear_error():
    model = small_net()
    with torchdiag.watch(model):
        with pytest.raises(torchdiag.TorchDiagError, match="already being watched"):
            torchdiag.watch(model)
    with torchdiag.watch(model):  # a later watch works again
        pass


def test_warnings_once_per_problem_and_name_layer_figure_threshold():
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(64, 64), nn.Tanh())])
    with torch.no_grad():
        for m in model[::2]:
            nn.init.xavier_normal_(m.weight, gain=15.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model) as diag:
            for _ in range(3):
                model(torch.randn(32, 64)).sum().backward()
                diag.step()
    ours = [w for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    sat = [str(w.message) for w in ours if "saturated" in str(w.message)]
    assert sat, [str(w.message) for w in ours]
    assert len(sat) == 1  # one per problem and cause (the first layer, the count of the others), not per step
    assert "'1' (Tanh)" in sat[0] and "saturated_fraction 0.3" in sat[0] and "%" in sat[0]
    assert "and 7 more Tanh layers" in sat[0].splitlines()[0]


def test_healthy_model_trains_without_warnings():
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        lin = nn.Linear(64, 64)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with torchdiag.watch(model) as diag:
            for _ in range(5):
                F.cross_entropy(model(torch.randn(32, 64)), torch.randint(0, 4, (32,))).backward()
                opt.step()
                opt.zero_grad()
                diag.step()
    assert not [w for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]


def test_user_writer_is_written_and_not_closed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torchdiag.watch(model, writer=writer) as diag:
        model(torch.randn(8, 4)).sum().backward()
        diag.step()
    writer.add_scalar("mine", 1.0, 0)  # still open
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"log10_act_std/0", "log10_grad_std/0", "gain/0", "act_mean/1", "mine"} <= set(tags)


def test_check_leaves_everything_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 3))
    model.train()
    model[1].eval()
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # some existing .grad
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    model[1].train()
    modes = [m.training for m in model.modules()]
    x = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    report = torchdiag.check(model, x)
    assert report.layers and report["5"].grad_std is not None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())
    assert not capture.global_hooks_installed()


def test_check_records_an_eval_mode_model_and_integer_inputs():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8)).eval()
    report = torchdiag.check(model, torch.randint(0, 10, (4, 5)))
    assert [layer.name for layer in report.layers] == ["0", "1"]
    assert report["1"].grad_std is not None
    assert (report["0"].fan_in, report["0"].fan_out) == (8, 10)  # torch.nn.init reads (num, dim) as (out, in)
    assert report["0"].suggested_scale is None  # a lookup sums nothing: no textbook scale
    assert model.training is False


def test_report_table_and_dict():
    report = torchdiag.check(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(8, 4))
    text = str(report)
    assert "layer" in text and "act std" in text and "grad std" in text
    assert all(len(line) <= 100 for line in text.splitlines())
    d = report.to_dict()
    assert d["layers"][0]["name"] == "0" and d["layers"][0]["status"] == []


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: torchdiag.watch("not a model"), "expected a torch.nn.Module, got str"),
        (lambda m: torchdiag.watch(m, every=0), "'every' expects an integer >= 1, or 'auto'"),
        (lambda m: torchdiag.watch(m, config={"evry": 2}), "unknown key 'evry'"),
        (lambda m: torchdiag.watch(m, config={"include": ["nomatch*"]}), "'include'"),
        (lambda m: torchdiag.watch(m, rescale_grads="yes"), "rescale_grads"),
        (lambda m: torchdiag.check(m), "at least one input"),
    ],
)
def test_bad_input_is_a_clear_error_at_the_call(call, match):
    with pytest.raises((TypeError, ValueError, torchdiag.TorchDiagError), match=match):
        call(small_net())


def test_unwritable_logdir_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(torchdiag.TorchDiagError, match="file"):
        torchdiag.watch(small_net(), logdir=blocker / "sub")


def test_a_bytes_logdir_is_accepted_as_its_fsdecoded_path(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = small_net()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 16)
    logdir = tmp_path / "rün"
    torch.manual_seed(1)
    with torchdiag.watch(model, logdir=os.fsencode(logdir)) as diag:
        model(x).sum().backward()
        diag.step()
    torch.manual_seed(1)
    ref(x).sum().backward()  # training as without the watch (the same dropout draws)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ref.parameters(), model.parameters()))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("log10_act_std/0")] == [0]
    with pytest.raises(ValueError, match="NUL byte"):
        torchdiag.watch(small_net(), logdir=b"a\0b")


def test_error_in_torchdiag_hook_code_never_reaches_training(monkeypatch):
    from torchdiag._stats import stats

    def boom(*a, **k):
        raise RuntimeError("internal")

    monkeypatch.setattr(stats, "act_row", boom)  # the ATen path's rows
    monkeypatch.setattr(stats, "cpu_row_into", boom)  # the CPU kernel's
    model = small_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model) as diag:
            for _ in range(2):
                model(torch.randn(4, 16)).sum().backward()
                diag.step()
    msgs = [str(w.message) for w in caught if "disabled" in str(w.message)]
    assert len(msgs) == len({layer for layer in msgs})  # one per layer
    assert "RuntimeError: internal" in msgs[0]


def test_auto_step_false_merges_forwards_until_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torchdiag.watch(model, auto_step=False) as diag:
        for _ in range(3):  # three micro-batches, one step
            model(torch.randn(8, 4)).sum().backward()
        rep = diag.step()
    assert rep.step == 0 and rep["0"].calls == 3


class _Feeds(nn.Module):
    """Weighted layers fed by every kind of producer: an activation module, a Linear directly, a LayerNorm,
    a Dropout, a Linear's output edited in place after its row was taken, and a functional activation."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e, self.f, self.g = (nn.Linear(24, 24) for _ in range(7))
        self.act, self.norm, self.drop = nn.Tanh(), nn.LayerNorm(24), nn.Dropout(0.3)
        self.seen = {}

    def forward(self, x):
        h = self.act(self.a(x))
        self.seen["b"] = h.detach().clone()
        h = self.b(h)                       # fed by an activation module
        self.seen["c"] = h.detach().clone()
        h = self.c(h)                       # fed by a Linear directly
        h = self.norm(h)
        self.seen["d"] = h.detach().clone()
        h = self.d(h)                       # fed by a LayerNorm
        h = self.drop(h)
        self.seen["e"] = h.detach().clone()
        h = self.e(h)                       # fed by a Dropout (its row serves as the probe)
        h.add_(3.0)                         # edited in place after e's row was taken
        self.seen["f"] = h.detach().clone()
        h = self.f(h)
        h = F.relu(h)                       # a functional activation: nothing recorded this tensor
        self.seen["g"] = h.detach().clone()
        return self.g(h)


def test_input_rms_from_producer_rows_equals_the_direct_computation():
    torch.manual_seed(0)
    model = _Feeds()
    x = torch.randn(64, 24)
    with torchdiag.watch(model, config={"warnings": False}) as diag:
        for _ in range(3):  # the first step switches zero counting on for the Dropout; later ones reuse rows
            model.zero_grad()
            model(x).sum().backward()
            diag.step()
            rep = diag.report()
            for name in "bcdefg":
                row = next(r for r in rep.layers if r.name == name)
                with torch.no_grad():  # not recorded
                    out = getattr(model, name)(model.seen[name])
                expected = out.std(correction=0).item() / model.seen[name].pow(2).mean().sqrt().item()
                assert row.gain == pytest.approx(expected, rel=1e-4), name
            g_row = next(r for r in rep.layers if r.name == "f")
            assert g_row.nonlinearity == "relu"  # inferred from g's input probe


def _run_deferred(defer, tmp_path, steps=5):
    """Published reports (as the loop and the end of the watch see them) and the TensorBoard scalars."""
    torch.manual_seed(5)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(steps, 8, 16)
    published = []
    with torchdiag.watch(model, logdir=tmp_path / defer, every=2,
                         config={"warnings": False, "histogram_every": 2, "defer_report": defer}) as diag:
        for i in range(steps):
            model(x[i]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            r = diag.step()
            published.append(None if r is None else (i, r.to_dict()))
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp_path / defer), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()[ea.SCALARS]}
    hists = {tag: [(e.step, list(e.histogram_value.bucket)) for e in acc.Histograms(tag)]
             for tag in acc.Tags()[ea.HISTOGRAMS]}
    return published, diag.report().to_dict(), scalars, hists


def test_deferred_reports_are_the_immediate_ones_one_step_later(tmp_path):
    now, now_final, now_scalars, now_hists = _run_deferred("never", tmp_path)
    late, late_final, late_scalars, late_hists = _run_deferred("always", tmp_path)
    # recorded steps 0, 2, 4: immediately they come out of step() at those steps; deferred, at the next
    # step's end (steps 1 and 3), and the last one when the watch is left
    assert [p[0] for p in now if p] == [0, 2, 4] and [p[1]["step"] for p in now if p] == [0, 2, 4]
    assert [p[0] for p in late if p] == [1, 3] and [p[1]["step"] for p in late if p] == [0, 2]
    assert [p[1] for p in late if p] == [p[1] for p in now if p][:2]
    assert late_final == now_final and late_final["step"] == 4
    assert late_scalars == now_scalars and late_hists == now_hists and late_hists


def test_report_inside_the_watch_catches_up_with_a_deferred_step():
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(8, 16)
    with torchdiag.watch(model, config={"defer_report": "always", "warnings": False}) as diag:
        model(x).sum().backward()
        assert diag.step() is None  # deferred: nothing is ready at the end of the first step
        rep = diag.report()  # completes it now
        assert rep.step == 0 and rep.layers[0].act_std == pytest.approx(
            model[0](x).std(correction=0).item(), rel=1e-5)
        model(x).sum().backward()
        assert diag.step() is None  # step 0 was already published by report()
    assert diag.report().step == 1


def test_unrecorded_steps_do_not_reach_the_capture(monkeypatch):
    from torchdiag._capture.capture import Capture

    seen = []
    original = Capture.on_forward

    def spy(self, *args):
        seen.append(self.generation)  # the step number
        return original(self, *args)

    monkeypatch.setattr(Capture, "on_forward", spy)
    model, other = small_net(), small_net()
    x = torch.randn(4, 16)
    with torchdiag.watch(model, every=3) as diag, torchdiag.watch(other, every=2) as diag2:
        for _ in range(6):
            model(x).sum().backward()
            other(x).sum().backward()
            diag.step()
            diag2.step()
    # the forward hook returns at once unless some watch records the step: model's steps 0, 3; other's 0, 2, 4
    assert sorted(set(seen)) == [0, 2, 3, 4]
    assert [r.step for r in (diag.report(), diag2.report())] == [3, 4]
    assert not capture._RECORDING  # both closed


# ------------------------------------------------------------------ issue #14: eval forwards, bad input, lazy
@pytest.mark.parametrize("explicit_step", [True, False], ids=["step()", "auto-step"])
def test_eval_mode_forwards_with_grad_enabled_are_not_recorded(explicit_step):
    # validation without no_grad (a common pattern) must not be merged into the training step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    xs = [torch.randn(16, 8) for _ in range(3)]
    with torchdiag.watch(model) as diag:
        for x in xs:
            model(x).sum().backward()
            model.eval()
            model(torch.randn(16, 8) * 40)  # validation forward, grad enabled
            model.train()
            if explicit_step:
                diag.step()
    report = diag.report()
    assert report.step == len(xs) - 1 and report["0"].calls == 1
    ref = model[0](xs[-1]).detach().double()
    assert report["0"].act_std == pytest.approx(ref.std(correction=0).item(), rel=1e-5)


def test_config_keys_are_keywords_of_watch_validated_like_the_config(tmp_path):
    model = small_net()
    w = torchdiag.watch(model, config={"histogram_every": 5, "profile_every": 7}, histogram_every=10)
    assert w.config.histogram_every == 10 and w.config.profile_every == 7  # the keyword overrides config=
    with pytest.raises(torchdiag.ConfigError, match="'histogram_every' expects an integer >= 0, got -1"):
        torchdiag.watch(model, histogram_every=-1)
    with pytest.raises(TypeError, match="histogram_evry.*config="):
        torchdiag.watch(model, histogram_evry=10)


def test_logdir_of_the_wrong_type_or_with_a_nul_byte_names_the_argument():
    with pytest.raises(TypeError, match=r"watch\(logdir=...\): expected a path .*got 123 \(int\)"):
        torchdiag.watch(small_net(), logdir=123)
    with pytest.raises(ValueError, match=r"watch\(logdir=...\): the path holds a NUL byte"):
        torchdiag.watch(small_net(), logdir="runs/a\0b")


def test_auto_step_must_be_a_bool():
    with pytest.raises(TypeError, match=r"watch\(auto_step=...\): expected True or False, got 'no' \(str\)"):
        torchdiag.watch(small_net(), auto_step="no")


def test_a_rescale_callable_that_raises_is_an_error_of_the_watch_call():
    def factor(name, module):
        raise KeyError(name)

    model = small_net()
    with pytest.raises(torchdiag.TorchDiagError, match=r"rescale_grads=.*raised KeyError for layer '0'"):
        torchdiag.watch(model, rescale_grads=factor)  # from watch() itself, before any `with`
    assert not capture.is_watched(model)


def test_check_leaves_a_lazy_model_uninitialised_and_reports_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    state = torch.get_rng_state()
    report = torchdiag.check(model, x)
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)  # training later starts as without check
    assert torch.equal(torch.get_rng_state(), state)
    assert report["0"].act_std is not None and report["0"].fan_in == 8
    assert any("lazy" in n for n in report.notes)


def test_check_of_a_lazy_model_that_cannot_be_copied_is_a_clear_error():
    model = nn.Sequential(nn.LazyBatchNorm1d(), nn.ReLU())
    with pytest.raises(torchdiag.TorchDiagError, match="lazy modules.*run one forward pass"):
        torchdiag.check(model, torch.randn(8, 3))
    assert nn.parameter.is_lazy(model[0].weight)


def test_check_runs_a_model_that_sets_requires_grad_on_its_input_view():
    # Hugging Face's Wav2Vec2FeatureEncoder sets hidden_states.requires_grad = True on input_values[:, None]
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3)

        def forward(self, x):
            h = x[:, None]
            if self.training:
                h.requires_grad = True  # allowed on a tensor that does not require grad yet, an error on a view of one
            return self.conv(h)

    model = Encoder()
    x = torch.randn(2, 16)
    report = torchdiag.check(model, x)  # raised "you can only change requires_grad flags of leaf variables"
    with torch.no_grad():
        expected = model.conv(x[:, None]).std(unbiased=False).item()
    assert report["conv"].grad_std is not None and report["conv"].act_std == pytest.approx(expected, rel=1e-4)


class _GcProbeWriter:
    """A user writer (``add_scalar`` only) that notes whether automatic garbage collection was on when
    torchdiag wrote to it, at the end of a step."""

    def __init__(self):
        self.gc_on: list[bool] = []

    def add_scalar(self, tag, value, step):
        self.gc_on.append(gc.isenabled())


@pytest.mark.parametrize("user_gc", [True, False])
def test_garbage_collection_is_paused_while_a_step_ends_and_left_as_the_user_had_it(user_gc):
    model = small_net()
    writer = _GcProbeWriter()
    was = gc.isenabled()
    (gc.enable if user_gc else gc.disable)()
    try:
        with torchdiag.watch(model, writer=writer, config={"warnings": False}) as diag:
            for _ in range(2):
                model(torch.randn(4, 16)).sum().backward()
                assert gc.isenabled() == user_gc  # the user's forward and backward run as they set it
                diag.step()
                assert gc.isenabled() == user_gc
            assert writer.gc_on and not any(writer.gc_on)  # off while torchdiag wrote the step
    finally:
        (gc.enable if was else gc.disable)()


def test_garbage_collection_comes_back_on_when_closing_a_step_raises():
    from torchdiag.watch import _CollectionPaused

    was = gc.isenabled()
    gc.enable()
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with _CollectionPaused():
                assert not gc.isenabled()
                with _CollectionPaused():  # nested (a step ended from inside one): the outer one switches it on
                    pass
                assert not gc.isenabled()
                raise RuntimeError("inside")
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


def test_the_findings_types_are_public_names():
    # N(0, 0.01^2) weights in a 6-layer ReLU MLP: each layer scales the signal by 0.01 * sqrt(64 / 2) = 0.057
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 4))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
    with torchdiag.watch(model, config={"warnings": False}) as diag:
        F.cross_entropy(model(torch.randn(32, 64)), torch.randint(0, 4, (32,))).backward()
        report = diag.step()
    found = [f for layer in report.layers for f in layer.findings]
    assert found and all(type(f) is torchdiag.Finding for f in found)
    assert diag.findings and all(type(f) is torchdiag.RunFinding for f in diag.findings)


def test_a_rank_that_does_not_write_keeps_the_logdir_as_a_str_and_creates_nothing(tmp_path, monkeypatch):
    from torchdiag._arguments import check_watch_arguments
    from torchdiag._reduce import distributed

    group = distributed.Group(pg=None, rank=1, world=2, device=torch.device("cpu"))
    monkeypatch.setattr(distributed, "resolve", lambda process_group: group)
    logdir = tmp_path / "runs"
    args = check_watch_arguments(small_net(), logdir=logdir, writer=None, config=None, every=None,
                                 rescale_grads=False, scaler=None, optimizer=None, process_group=None,
                                 auto_step=True, config_keys={})
    assert args.logdir == str(logdir) and isinstance(args.logdir, str)  # Watcher and its Publisher take a str
    assert args.group is group and not logdir.exists()  # rank 0 alone creates it
