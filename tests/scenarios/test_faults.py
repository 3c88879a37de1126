"""Fault injection: torchdiag never breaks the user's run (issue #14).

A full disk, a writer that lacks methods, warnings turned into errors, torch.func transforms: the
training step behaves as without torchdiag, and torchdiag says once what it could not do.
"""

import errno
import warnings

import pytest
import torch
from torch import nn

import torchdiag


def net():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def sgd_steps(model, xs, diag=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in xs:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if diag is not None:
            diag.step()


def ours(caught):
    return [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]


# ---------------------------------------------------------------------------------------------- item 1
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread's own death
@pytest.mark.parametrize("explicit_step", [True, False], ids=["diag.step()", "auto-step hook"])
def test_a_full_log_disk_warns_once_naming_the_logdir_and_training_goes_on(tmp_path, monkeypatch, explicit_step):
    # the real failure: TensorBoard's writer thread gets ENOSPC from the event file; the error resurfaces at
    # the next add_event / flush / close on the training thread (tensorboard's _AsyncWriter), i.e. inside
    # diag.step() or inside the auto-step forward pre-hook
    from tensorboard.summary.writer import record_writer

    real_write = record_writer.RecordWriter.write
    calls = {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] > 3:  # the event file header and the first events got onto the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    torch.manual_seed(0)
    model = net()
    twin = net()
    twin.load_state_dict(model.state_dict())
    xs = [torch.randn(32, 8) for _ in range(12)]
    logdir = tmp_path / "full_disk"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, logdir=logdir, config={"histogram_every": 1}, every=1) as diag:
            sgd_steps(model, xs, diag if explicit_step else None)
    assert calls["n"] > 3, "the simulated disk never filled up"
    failed = [m for m in ours(caught) if "TensorBoard" in m]
    assert len(failed) == 1, failed
    assert str(logdir) in failed[0] and "No space left on device" in failed[0]
    # training went on unchanged: the same SGD steps without torchdiag give the same weights
    sgd_steps(twin, xs)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # and the in-memory reports went on to the last step
    assert diag.report().step == len(xs) - 1 and diag.report()["0"].calls == 1


def test_a_user_writer_that_raises_is_switched_off_after_one_warning():
    class Broken:
        def __init__(self):
            self.calls = 0

        def add_scalar(self, tag, value, step):
            self.calls += 1
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    writer = Broken()
    model = net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, writer=writer) as diag:
            for _ in range(4):
                model(torch.randn(4, 8)).sum().backward()
                assert diag.step() is not None
    failed = [m for m in ours(caught) if "TensorBoard" in m]
    assert len(failed) == 1 and "Broken" in failed[0] and "Input/output error" in failed[0]
    assert writer.calls == 1  # switched off after the first failure
    rec = diag._recorder  # (private: what the recorder and the time budget do after it)
    assert rec is not None and rec.histogram_every == 0 and rec.cadence.heavy_every == 0  # no histograms, none budgeted


# ---------------------------------------------------------------------------------------------- item 5
def test_a_writer_with_only_add_scalar_gets_scalars_and_the_users_exception_is_kept():
    class ScalarsOnly:
        def __init__(self):
            self.tags = []

        def add_scalar(self, tag, value, step):
            self.tags.append(tag)

    writer = ScalarsOnly()
    model = net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyError, match="the user's own"):
            with torchdiag.watch(model, writer=writer) as diag:
                model(torch.randn(4, 8)).sum().backward()
                diag.step()
                raise KeyError("the user's own")
        with torchdiag.watch(model, writer=writer) as diag:  # and a clean exit raises nothing either
            model(torch.randn(4, 8)).sum().backward()
            diag.step()
    assert "log10_act_std/0" in writer.tags
    assert not [m for m in ours(caught) if "TensorBoard" in m]  # optional methods are optional: no complaint


# ---------------------------------------------------------------------------------------------- item 6
def test_warnings_as_errors_never_raise_out_of_the_users_forward(monkeypatch, capsys):
    from torchdiag._stats import stats

    def boom(*a, **k):
        raise RuntimeError("internal")

    monkeypatch.setattr(stats, "act_row", boom)  # torchdiag's own recording fails (the ATen path's rows,
    monkeypatch.setattr(stats, "cpu_row_into", boom)  # and the CPU kernel's)
    torch.manual_seed(0)
    model = net()
    x = torch.randn(4, 8)
    expected = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # python -W error
        with torchdiag.watch(model) as diag:
            out = model(x)  # must not raise DiagnosticWarning from inside the forward hook
            out.sum().backward()
            model(x).sum().backward()  # the auto-step pre-hook ends step 0 inside this forward
            diag.step()
    assert torch.equal(out.detach(), expected)
    assert "recording '0' (Linear) failed" in capsys.readouterr().err  # said, not raised


def test_warnings_as_errors_do_not_raise_model_findings_from_the_auto_step_hook():
    # a broken model (NaN output) under -W error: its finding is emitted inside the next forward's pre-hook
    model = net()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torchdiag.watch(model) as diag:
            for _ in range(3):
                model(x).sum().backward()  # auto-step: each forward ends the previous step
    assert "nonfinite" in diag.report()["0"].status


# ---------------------------------------------------------------------------------------------- item 2
def test_torch_func_transforms_of_the_watched_model_end_the_step_normally():
    from torch.func import functional_call, grad, jacrev, vmap

    torch.manual_seed(0)
    model = net()
    x = torch.randn(5, 8)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).pow(2).sum()

    with torchdiag.watch(model) as diag:
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)  # per-sample gradients
        batched = vmap(model)(x)
        jac = jacrev(model)(x[0])
        model(x).pow(2).sum().backward()
        report = diag.step()
    # the transforms computed what they compute without torchdiag
    for i in range(5):
        g = torch.autograd.grad(loss(params | {"0.weight": params["0.weight"].requires_grad_()}, x[i]),
                                params["0.weight"])[0]
        params["0.weight"].requires_grad_(False)
        torch.testing.assert_close(per_sample["0.weight"][i], g)
    torch.testing.assert_close(batched, model(x).detach())
    assert jac.shape == (4, 8)
    # the step holds the plain forward alone (one call per layer), its numbers those of that forward
    ref = model[0](x).detach().double()
    assert report["0"].calls == 1
    assert report["0"].act_std == pytest.approx(ref.std(correction=0).item(), rel=1e-5)


def test_a_nan_made_only_in_the_backward_pass_is_reported_nonfinite():
    # issue #14 item 9: sqrt(x * x) at the ReLU's exact zeros is 0 forward and 0 * inf = NaN backward
    class SqrtOfSquare(nn.Module):
        def forward(self, x):
            return torch.sqrt(x * x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), SqrtOfSquare(), nn.Linear(8, 2))
    x = torch.randn(16, 8)
    h = model[1](model[0](x))
    h.retain_grad()
    out = model[3](model[2](h))
    out.sum().backward()
    assert torch.isfinite(out).all() and not torch.isfinite(h.grad).all()  # the premise, with plain tensors
    model.zero_grad()
    with torchdiag.watch(model) as diag:
        model(x).sum().backward()
        diag.step()
    report = diag.report()
    # the first layer, loss side first, whose output gradient holds the NaN: the ReLU feeding the sqrt
    assert report.first_nonfinite is None and report.first_nonfinite_grad == "1"
    assert "nonfinite" in report["1"].status and report["1"].findings[0].direction == "backward"
    assert report["2"].status == set() and report["3"].status == set()  # the layers after it are clean
    # (the ReLU's backward zeroes the gradient where its output was 0, so the NaN stops there)
    assert "nonfinite" not in report["0"].status and torch.isfinite(model[0].weight.grad).all()
    assert any(f.problem == "nonfinite" for f in diag.findings)


# ---------------------------------------------------------------------------------------------- forked children
def _teacher_in_child(model, xs, conn):
    """A DataLoader worker calling the watched teacher net with grad (forward and backward, several times)."""
    grads = []
    for x in xs:
        model.zero_grad()
        model(x).pow(2).mean().backward()
        grads.append([p.grad.numpy().copy() for p in model.parameters()])  # (tensors would go by shared memory)
    conn.send(grads)
    conn.close()


def test_a_watched_model_run_in_a_forked_child_records_and_writes_nothing_there(tmp_path):
    import multiprocessing

    torch.manual_seed(0)
    teacher = net()
    plain = net()
    plain.load_state_dict(teacher.state_dict())
    xs = [torch.randn(4, 8) for _ in range(3)]
    ctx = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with the writer's thread running: the point
        with torchdiag.watch(teacher, logdir=tmp_path) as diag:
            sgd_steps(teacher, xs[:2])  # auto-step: each training forward of the teacher starts a step
            plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)  # the parent's training, unwatched
            for x in xs[:2]:
                plain(x).pow(2).mean().backward()
                plain_opt.step()
                plain_opt.zero_grad()
            before = len(list(tmp_path.iterdir()))
            parent_end, child_end = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_teacher_in_child, args=(teacher, xs, child_end))
            child.start()
            child_end.close()
            got = parent_end.recv() if parent_end.poll(30) else None
            child.join(10)
            alive = child.is_alive()
            if alive:
                child.kill()
                child.join()
            assert not alive and child.exitcode == 0 and got is not None
            sgd_steps(teacher, xs[2:])  # the parent's watch goes on
            assert diag.step_count == 2 and diag.report().layers
        assert len(list(tmp_path.iterdir())) == before  # the child opened no event file of its own
    for x, grads in zip(xs, got):  # the child's gradients, as without the watch
        plain.zero_grad()
        plain(x).pow(2).mean().backward()
        for a, b in zip(grads, plain.parameters()):
            torch.testing.assert_close(torch.from_numpy(a), b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("at_step", [0, 2])
def test_a_nan_in_the_input_batch_is_blamed_on_the_data_not_on_the_weights_or_the_learning_rate(at_step):
    """The commonest NaN: one element of one batch. Right answer, before looking at torchdiag: the first layer's
    output holds NaN because its input did; neither a weight rescale (at the init) nor a lower learning rate (later)
    fixes a batch. The finding is blamed on the data, and apply_suggestions leaves the weights alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1) as diag:
            for step in range(at_step + 1):
                x = torch.randn(32, 8, generator=gen)
                if step == at_step:
                    x[3, 1] = float("nan")
                assert bool(torch.isnan(x).any()) == (step == at_step)  # the batch holds it, nothing else
                model(x).pow(2).mean().backward()
                model.zero_grad()  # no update: the weights stay finite, only the batch is bad
                report = diag.step()
    (finding,) = report["0"].findings
    assert finding.problem == "nonfinite" and finding.reason == "data"
    assert "check the data" in finding.message and "multiply" not in finding.message
    assert "learning rate" not in finding.message.replace("not the learning rate", "")
    assert not report["0"].init_fixes
    assert torchdiag.apply_suggestions(model, report) == {}
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    said = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    assert any("check the data" in m for m in said) and not any("multiply its weights" in m for m in said)


def test_a_model_on_the_meta_device_is_said_once_and_a_failure_of_the_step_end_is_not_repeated(monkeypatch):
    """A model on the meta device (built before its weights are materialised) has no data to read: one warning
    saying so, and a report that says why it is empty, not one failure per step. Any other failure of torchdiag's
    own step end that repeats is said once too."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).to("meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1) as diag:
            for _ in range(4):
                model(torch.randn(32, 8, device="meta")).sum().backward()
                diag.step()
    said = ours(caught)
    assert len(said) == 1 and "meta device" in said[0]
    assert "meta device" in diag.report().notes[0] and diag.report().layers == []

    from torchdiag._record import buffer

    def broken(self, *a, **k):
        raise RuntimeError("the host copy failed")

    monkeypatch.setattr(buffer.Recorder, "_launch", broken)
    model = net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1) as diag:
            sgd_steps(model, [torch.randn(4, 8) for _ in range(5)], diag)
    said = [m for m in ours(caught) if "the host copy failed" in m]
    assert len(said) == 1 and "completing step 0 failed" in said[0]
