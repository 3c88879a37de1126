"""Training-loop features: GradScaler, optimizer steps and update ratio, clipping, accumulation, autocast."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import torchdiag


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_gradscaler_statistics_are_reported_unscaled():
    x = torch.randn(8, 16)
    plain, scaled = net(), net()
    ref = torchdiag.check(plain, x, loss_fn=lambda o: o.pow(2).mean())
    opt = torch.optim.SGD(scaled.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    with torchdiag.watch(scaled, optimizer=opt, scaler=scaler) as diag:
        scaler.scale(scaled(x).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        rep = diag.step()
    assert rep.amp_scale == 2.0**14
    for a, b in zip(ref.layers, rep.layers):
        assert b.grad_std == pytest.approx(a.grad_std, rel=1e-6)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-6)


def test_update_ratio_and_preclip_norm_against_direct_computation():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torchdiag.watch(model, optimizer=opt) as diag:
        for max_norm in (1e-3, 1e3):
            before = [m.weight.detach().clone() for m in (model[0], model[2])]
            model(torch.randn(8, 16)).pow(2).mean().backward()
            pre = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            opt.zero_grad()
            rep = diag.step()
            assert rep.grad_norm_preclip == pytest.approx(pre, rel=1e-5)
            assert rep.clipped is (max_norm < pre)
            for w0, name in zip(before, ("0", "2")):
                w1 = dict(model.named_modules())[name].weight.detach()
                assert rep[name].update_ratio == pytest.approx(((w1 - w0).norm() / w0.norm()).item(), rel=1e-4)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_gradient_accumulation_merges_backward_passes_into_one_optimizer_step():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    grads = []

    def spy(module, args, out):
        out.register_hook(lambda g: grads.append(g.clone()))

    model[2].register_forward_hook(spy)
    with torchdiag.watch(model, optimizer=opt) as diag:
        for _ in range(2):
            model(torch.randn(8, 16)).pow(2).mean().backward()
        assert diag.step() is None  # no optimizer step yet: the step goes on
        opt.step()
        rep = diag.step()
    assert rep.step == 0 and rep["2"].calls == 2
    both = torch.cat([g.reshape(-1) for g in grads]).double()
    assert rep["2"].grad_std == pytest.approx(both.std(correction=0).item(), rel=1e-5)


def test_watch_steps_with_optimizer_and_every():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    recorded = []
    with torchdiag.watch(model, optimizer=opt, every=2) as diag:
        for _ in range(5):
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
            rep = diag.step()
            recorded.append(rep.step if rep is not None else None)
    assert recorded == [0, None, 2, None, 4]


def test_bfloat16_autocast_statistics_in_float32():
    model = net()
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model[0](x).detach()
        rep = torchdiag.check(model, x)
    assert out.dtype == torch.bfloat16
    assert rep["0"].act_std == pytest.approx(out.double().std(correction=0).item(), rel=1e-4)


def test_fp16_overflow_is_nonfinite_at_the_first_layer_it_happens():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].weight.fill_(1e4)  # 16 * 1e4 * O(1) inputs: past fp16's 65504
    with torch.autocast("cpu", dtype=torch.float16):
        rep = torchdiag.check(model, torch.randn(8, 16) * 10)
    assert rep.first_nonfinite == "1"
    assert "nonfinite" not in rep["0"].status


def test_high_learning_rate_warns_large_updates_and_healthy_adam_does_not():
    for lr, expect in ((5.0, True), (1e-3, False)):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torchdiag.watch(model, optimizer=opt):
                for _ in range(2):
                    model(torch.randn(8, 16)).pow(2).mean().backward()
                    opt.step()
                    opt.zero_grad()
        msgs = [str(w.message) for w in caught if "large_updates" in str(w.message)]
        assert bool(msgs) is expect, msgs
        if expect:
            assert "update_ratio_high 0.5" in msgs[0]


def test_weights_bit_identical_with_optimizer_and_scaler_hooks():
    a = net()
    b = copy.deepcopy(a)
    for model, watched in ((a, False), (b, True)):
        torch.manual_seed(3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu")
        ctx = torchdiag.watch(model, optimizer=opt, scaler=scaler) if watched else None
        if ctx:
            ctx.__enter__()
        for _ in range(3):
            scaler.scale(model(torch.randn(8, 16)).pow(2).mean()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        if ctx:
            ctx.__exit__(None, None, None)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bad_optimizer_and_scaler_arguments():
    with pytest.raises(TypeError, match="optimizer=.*expected a torch.optim.Optimizer, got str"):
        torchdiag.watch(net(), optimizer="adam")
    with pytest.raises(TypeError, match="scaler=.*GradScaler, got int"):
        torchdiag.watch(net(), scaler=3)


def test_gradscaler_skipped_steps_counted_and_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    skipped = 0
    with torchdiag.watch(model, scaler=scaler, logdir=tmp_path) as diag:
        for i in range(4):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            if i in (1, 2):
                loss = loss * float("inf")  # an overflowing step: the scaler skips it and halves its scale
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < before
            opt.zero_grad()
            diag.step()
    assert skipped == 2
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    counts = [e.value for e in acc.Scalars("amp/skipped_steps")]
    scales = [e.value for e in acc.Scalars("amp/scale")]
    assert scales == [2.0**10, 2.0**10, 2.0**9, 2.0**8]  # the scale in effect for each step's backward
    assert counts == [0, 0, 1, 2]  # a skipped step shows in the scale of the next recorded step


def test_layers_stepped_by_another_optimizer_have_no_update_ratio():
    # two optimizers, one given to watch(): the other's layers were reported with update_ratio 0.0
    model = net()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2].parameters(), lr=0.1)
    x = torch.randn(8, 16)
    with torchdiag.watch(model, optimizer=first) as diag:
        model(x).sum().backward()
        w0 = model[0].weight.detach().clone()
        second.step()
        first.step()
    report = diag.report()
    assert report["2"].update_ratio is None  # not owned by `first`: no figure, rather than a false 0
    want = ((model[0].weight.detach() - w0).norm() / w0.norm()).item()
    assert report["0"].update_ratio == pytest.approx(want, rel=1e-5)


def test_complex_gradients_give_the_true_pre_clip_norm_and_never_warn():
    """#28 item 6: with optimizer= the pre-clip gradient norm cast complex gradients to real inside the user's
    backward: a ComplexWarning (an exception under -W error) and a wrong norm (the imaginary parts dropped). Right
    answer: sqrt(sum |g|^2) over every gradient, computed here from the gradients themselves, and no warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.cfloat), nn.Linear(4, 2, dtype=torch.cfloat))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4, dtype=torch.cfloat)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, torchdiag's or torch's, raises
        with torchdiag.watch(model, every=1, optimizer=opt) as diag:
            for _ in range(2):
                model(x).abs().pow(2).sum().backward()
                true = math.sqrt(sum(float((p.grad.abs() ** 2).sum()) for p in model.parameters()))
                opt.step()
                opt.zero_grad()
                report = diag.step()
    assert report.grad_norm_preclip == pytest.approx(true, rel=1e-5)
