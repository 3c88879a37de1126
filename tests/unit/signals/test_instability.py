"""The watch's non-finite origin and the divergence signals (attention logits and entropy, output logits, Adam's
epsilon, loss spikes), each against a plain tensor computation of the same figure."""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import statistics
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiag
from tests.unit.origin.test_origin import SqrtLayer, _line_of
from torchdiag._signals._attention import attention_figures


# ------------------------------------------------------------------ the non-finite origin in a watch
class ShiftedLog(nn.Module):
    """log(x + shift): finite for shift >= 0 on a softplus output, NaN where x + shift < 0."""

    def __init__(self):
        super().__init__()
        self.shift = 0.0

    def forward(self, x):
        return torch.log(x + self.shift)


def _log_loop(watched: bool, steps: int = 6, bad_step: int = 2, optimizer_arg: bool = False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 16),
                        nn.Softplus(), ShiftedLog(), nn.Linear(16, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 8, generator=gen) for _ in range(steps)]
    reports = []
    diag = torchdiag.watch(net, optimizer=opt if optimizer_arg else None) if watched else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if diag is not None:
            diag.__enter__()
        for i, x in enumerate(batches):
            net[6].shift = 1.0 if i != bad_step else -3.0  # softplus < 3 somewhere: log of a negative there
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if torch.isfinite(loss):
                opt.step()
            if diag is not None:
                reports.append(diag.step())
        if diag is not None:
            diag.__exit__(None, None, None)
    return net, diag, reports, caught


def test_a_forward_nan_is_traced_to_its_op_and_training_after_it_is_bit_identical():
    plain, *_ = _log_loop(watched=False)
    net, diag, reports, caught = _log_loop(watched=True)
    origin = diag.report().nonfinite_origin
    assert origin is not None
    assert (origin.phase, origin.module, origin.op, origin.step, origin.value) == ("forward", "6", "aten.log", 2, "NaN")
    assert reports[1].nonfinite_origin is None and reports[2].nonfinite_origin == origin
    texts = [str(w.message) for w in caught]
    assert any("NaN first produced by `aten.log` in '6' (forward, step 2)" in t for t in texts)
    # the replay touched nothing: weights, BatchNorm's running stats, and the RNG (dropout) all as without the watch
    for (name, a), b in zip(plain.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_watch_and_locate_nonfinite_agree_on_the_same_batch():
    net, diag, _, _ = _log_loop(watched=True, steps=3)
    torch.manual_seed(0)
    twin = copy.deepcopy(net)
    twin[6].shift = -3.0
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    got = torchdiag.locate_nonfinite(twin, x, loss_fn=lambda out: out.pow(2).mean())
    mine = diag.report().nonfinite_origin
    assert (got.phase, got.module, got.op) == (mine.phase, mine.module, mine.op)


def test_a_backward_inf_with_optimizer_is_replayed_on_the_weights_before_the_update():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), SqrtLayer(), nn.Linear(16, 2))
    with torch.no_grad():  # sqrt(0) = 0 is finite; its slope there is Inf, which reaches the first layer's weights
        net[0].weight.zero_(), net[0].bias.zero_()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(net, optimizer=opt) as diag:
            x = torch.randn(32, 8)
            out = net(x)
            assert torch.isfinite(out).all()
            out.sum().backward()
            opt.step()
    assert not torch.isfinite(net[0].weight).all()  # the update spread it into the weights
    origin = diag.report().nonfinite_origin
    assert (origin.phase, origin.module, origin.op, origin.step) == ("backward", "1", "aten.sqrt", 0)
    assert "before that step's update" in origin.note


def test_an_update_that_makes_weights_non_finite_is_the_optimizers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=1e38)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(net, optimizer=opt) as diag:
            net(torch.randn(16, 8)).pow(2).sum().backward()
            assert all(torch.isfinite(p.grad).all() for p in net.parameters())
            opt.step()
    first_bad = next(n for n, p in net.named_parameters() if not torch.isfinite(p).all())
    origin = diag.report().nonfinite_origin
    assert (origin.phase, origin.parameter, origin.op, origin.step) == ("optimizer", first_bad, None, 0)
    assert str(origin).startswith(f"{origin.value} first produced by the optimizer's update of '{first_bad}'")


def test_a_grad_scaler_skipped_step_is_not_an_origin():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), SqrtLayer(), nn.Linear(16, 2))
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(net, scaler=scaler) as diag:
            scaler.scale(net(torch.randn(32, 8)).sum()).backward()
            scaler.step(opt)  # inf gradients: the scaler skips the step
            scaler.update()
            diag.step()
    assert diag.report().first_nonfinite_grad is not None
    assert diag.report().nonfinite_origin is None
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------ attention
def _mha_reference(m: nn.MultiheadAttention, x: torch.Tensor) -> tuple[float, float]:
    """Max logit and mean-over-heads normalised entropy of a batch_first self-attention, by hand."""
    e, h = m.embed_dim, m.num_heads
    q = x @ m.in_proj_weight[:e].T + m.in_proj_bias[:e]
    k = x @ m.in_proj_weight[e:2 * e].T + m.in_proj_bias[e:2 * e]
    b, s, _ = x.shape
    q = q.view(b, s, h, e // h).transpose(1, 2)
    k = k.view(b, s, h, e // h).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(e // h)
    p = logits.softmax(-1)
    ent = -(p * p.clamp(min=1e-30).log()).sum(-1) / math.log(s)  # (b, h, s); 0 log 0 = 0
    return logits.max().item(), ent.mean(dim=(0, 2)).mean().item()


class Encoder(nn.Module):
    def __init__(self, d=32, heads=4, scale=1.0):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.out = nn.Linear(d, 4)
        with torch.no_grad():
            self.attn.in_proj_weight[: 2 * d] *= scale  # q and k scaled up: logits grow with scale**2

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a + h)


@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_multihead_attention_logits_against_a_hand_computation(scale):
    torch.manual_seed(0)
    model, x = Encoder(scale=scale), torch.randn(2, 24, 16)
    with torch.no_grad():
        top, ent = _mha_reference(model.attn, model.inp(x))
    report = torchdiag.check(model, x)
    row = report["attn"]
    assert row.attention_logit_max == pytest.approx(top, rel=1e-4)
    assert row.attention_entropy == pytest.approx(ent, rel=1e-4, abs=1e-6)
    flagged = top > torchdiag.Config.defaults().attention_logit_max
    assert flagged == (scale == 60.0)  # the broken case is broken by construction (60**2 x the healthy logits)
    assert ("attention_logits" in row.status) == flagged
    if flagged:
        assert ent < 0.05 and "attention_entropy" in row.status  # one-hot heads: entropy collapsed with it
        assert "qk-layernorm" in next(f for f in row.findings if f.problem == "attention_logits").message


class CausalSelfAttention(nn.Module):
    """A hand-written block calling SDPA (recognised by its class name)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


def test_sdpa_inside_an_attention_module_with_a_causal_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), CausalSelfAttention(), nn.Linear(32, 4))
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        b, s = 2, 20
        q, k, _ = model[1].qkv(model[0](x)).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(8)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        top = logits.masked_fill(~causal, -math.inf).max().item()
        p = logits.masked_fill(~causal, -math.inf).softmax(-1)
        ent = -(torch.where(causal, p * p.clamp(min=1e-30).log(), torch.zeros_like(p))).sum(-1)
        n = causal.sum(-1)
        norm = ent[..., 1:] / torch.log(n[1:].float())  # the first query has one key: no entropy to speak of
        ref_ent = norm.mean(dim=(0, 2)).mean().item()
    row = torchdiag.check(model, x)["1.qkv"]  # a container's figures go on its first watched layer
    assert row.attention_logit_max == pytest.approx(top, rel=1e-4)
    assert row.attention_entropy == pytest.approx(ref_ent, rel=1e-4)
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention  # restored after the watch


class InterruptedAttention(CausalSelfAttention):
    """Ctrl-C in the middle of the attention forward (after its SDPA call), on the call numbered ``at``."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        out = super().forward(x)
        if self.calls == self.at:
            raise KeyboardInterrupt
        return out


def _attention_run(watched, model_ref=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), InterruptedAttention(at=2), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    try:
        with torchdiag.watch(model, optimizer=opt) if watched else contextlib.nullcontext():
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(2, 8, 16, generator=gen)).pow(2).mean().backward()
                opt.step()
    except KeyboardInterrupt:
        pass
    weights = [p.detach().clone() for p in model.parameters()]
    if model_ref is not None:
        model_ref.append(weakref.ref(model))
    return weights


def test_ctrl_c_inside_an_attention_forward_leaves_no_sdpa_entry_that_keeps_the_model_alive():
    from torchdiag._signals._attention import SDPA

    refs = []
    weights = _attention_run(watched=True, model_ref=refs)
    gc.collect()
    assert refs[0]() is None
    assert not getattr(SDPA.local, "stack", [])
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    for a, b in zip(weights, _attention_run(watched=False)):  # training as without the watch
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attention_figures_with_grouped_query_heads_and_a_boolean_mask():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    mask = torch.rand(10, 10) > 0.3
    mask[:, 0] = True
    top, ent = attention_figures(q, k, allowed=mask)
    kk = k.repeat_interleave(2, dim=1)
    logits = (q @ kk.transpose(-1, -2)) / math.sqrt(8)
    assert top.item() == pytest.approx(logits.masked_fill(~mask, -math.inf).max().item(), rel=1e-5)


@pytest.mark.parametrize("b,h,hk,sq,sk", [(3, 4, 4, 20, 20), (2, 8, 2, 33, 33), (2, 2, 2, 5, 9), (1, 2, 2, 1, 1)])
def test_causal_attention_figures_by_hand(b, h, hk, sq, sk):
    """SDPA's is_causal mask (top left: query i attends keys 0..i) on grouped-query heads and a key sequence longer
    than the queries: the largest allowed logit and the mean over heads of the entropy over log(keys allowed), rows
    with one key left out, on the first two sequences (every query: under attention_sample)."""
    torch.manual_seed(0)
    q, k = torch.randn(b, h, sq, 8) * 3, torch.randn(b, hk, sk, 8)
    top, ent = attention_figures(q, k, causal=True)
    kk = k[:2].repeat_interleave(h // hk, dim=1)
    logits = (q[:2] @ kk.transpose(-1, -2)) / math.sqrt(8)
    causal = torch.ones(sq, sk, dtype=torch.bool).tril()
    assert top.item() == pytest.approx(logits.masked_fill(~causal, -math.inf).max().item(), rel=1e-6)
    p = logits.masked_fill(~causal, -math.inf).softmax(-1)
    e = -(torch.where(causal, p * p.clamp(min=1e-30).log(), torch.zeros_like(p))).sum(-1)  # (2, h, sq)
    n = causal.sum(-1)
    several = n > 1
    if several.any():
        want = (e[..., several] / torch.log(n[several].float())).mean().item()
    else:
        want = 0.0
    assert ent.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    q[0, 1, -1, 3] = math.nan  # a NaN logit: no figure (NaN), as on the masked path (one key: no entropy, 0)
    top, ent = attention_figures(q, k, causal=True)
    assert math.isnan(top.item()) and (math.isnan(ent.item()) if several.any() else ent.item() == 0.0)


# ------------------------------------------------------------------ output logits
@pytest.mark.parametrize("offset,loss", [(0.0, "ce"), (-120.0, "ce"), (120.0, "ce"), (-120.0, "mse")])
def test_output_logit_drift_is_judged_only_for_softmax_logits(offset, loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        model[2].bias.fill_(offset)
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    loss_fn = (lambda out: F.cross_entropy(out, y)) if loss == "ce" else (lambda out: (out - 1.0).pow(2).mean())
    report = torchdiag.check(model, x, loss_fn=loss_fn)
    row = report["2"]
    with torch.no_grad():
        logz = torch.logsumexp(model(x), dim=-1).mean().item()
    if loss == "mse":
        assert row.output_logz is None and "output_logits" not in row.status  # not the logits of a softmax
        return
    assert row.output_logz == pytest.approx(logz, rel=1e-5)
    assert ("output_logits" in row.status) == (logz < -50)  # very negative logits; large positive ones (CLIP) are fine
    assert (logz < -50) == (offset < 0)


# ------------------------------------------------------------------ Adam's epsilon
@pytest.mark.parametrize("loss_scale", [1.0, 1e-12])
def test_gradients_at_adams_epsilon(loss_scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # eps 1e-8
    x = torch.randn(32, 16)
    rms = []
    with torchdiag.watch(model, optimizer=opt) as diag, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # a layer is flagged when it stays near eps: two recorded steps in a row
            opt.zero_grad()
            (model(x).pow(2).mean() * loss_scale).backward()
            g = model[0].weight.grad
            rms.append((g.pow(2).sum() / torch.count_nonzero(g)).sqrt().item())
            opt.step()
            row = diag.report()["0"]
            assert row.adam_grad_rms == pytest.approx(rms[-1], rel=1e-5)
            near = rms[-1] < 10 * 1e-8
            assert near == (loss_scale != 1.0)
            assert ("adam_epsilon" in row.status) == (near and len(rms) == 2)
    if loss_scale != 1.0:
        assert "eps=" in next(f for f in row.findings if f.problem == "adam_epsilon").message


def test_an_embeddings_unused_rows_are_not_small_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50000, 32), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torchdiag.watch(model, optimizer=opt) as diag:
        model(torch.randint(0, 50000, (8, 4))).pow(2).mean().backward()
        opt.step()
    row = diag.report()["0"]
    assert "adam_epsilon" not in row.status and row.adam_grad_rms > 1e-5


# ------------------------------------------------------------------ loss spikes
def test_a_loss_spike_against_the_runs_own_losses_names_the_layers_that_jumped_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))  # gradients scale with the input
    gen = torch.Generator().manual_seed(0)
    losses = [2.0 + 0.01 * torch.randn((), generator=gen).item() for _ in range(40)] + [5.0]
    spikes, caught_all = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1) as diag:
            for i, value in enumerate(losses):
                scale = 30.0 if i >= 38 else 1.0  # the gradients jump two steps before the loss does
                model(torch.randn(16, 8) * scale).pow(2).mean().backward()
                report = diag.step(loss=torch.tensor(value))
                spikes += report.loss_spikes
        caught_all = [str(w.message) for w in caught]
    assert [s.step for s in spikes] == [40]
    logs = [math.log(torch.tensor(x).item()) for x in losses[:40]]  # robust: median, 1.4826 MAD of the float32 logs
    med = statistics.median(logs)
    mad = 1.4826 * statistics.median(abs(v - med) for v in logs)
    assert spikes[0].sigmas == pytest.approx((math.log(5.0) - med) / mad, rel=1e-6)
    assert spikes[0].layers and all(step == 38 for _, _, step in spikes[0].layers)
    assert any("loss spike at step 40" in t for t in caught_all)


def test_no_spike_on_a_noisy_healthy_loss_and_bad_loss_arguments():
    model = nn.Linear(4, 1)
    gen = torch.Generator().manual_seed(3)
    with torchdiag.watch(model, every=1) as diag:
        for _ in range(300):
            model(torch.randn(8, 4)).sum().backward()
            value = 1.0 + 0.05 * torch.randn((), generator=gen).item()  # minibatch noise
            assert diag.step(loss=value).loss_spikes == []
        with pytest.raises(TypeError, match=r"step\(loss=\.\.\.\): expected a float or a 0-d tensor, got str"):
            diag.step(loss="1.0")
        with pytest.raises(TypeError, match=r"expected a scalar loss, got a tensor of shape \(2,\)"):
            diag.step(loss=torch.ones(2))


def test_the_signals_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = Encoder(scale=60.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, logdir=tmp_path, optimizer=opt) as diag:
            y = torch.randint(0, 4, (2, 24))
            F.cross_entropy(model(torch.randn(2, 24, 16)).reshape(-1, 4), y.reshape(-1)).backward()
            opt.step()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    row = diag.report()
    entropy = row["attn"].attention_entropy
    assert entropy is not None
    for tag, value in (("attention_logit_max/attn", row["attn"].attention_logit_max),
                       ("log10_attention_entropy_deficit/attn", math.log10(1 - entropy)),  # readable ticks (#29)
                       ("output_logz/out", row["out"].output_logz), ("adam_grad_rms/inp", row["inp"].adam_grad_rms)):
        assert value is not None, tag
        assert acc.Scalars(tag)[-1].value == pytest.approx(value, rel=1e-6), tag


def _example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _max_logit_by_hand(model, tokens) -> float:
    """Every block's q.k/sqrt(d) under the causal mask, from the attention inputs a plain forward hook saw."""
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: seen.append((m, a[0]))) for b in model.blocks]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    top = -math.inf
    for m, x in seen:
        b, s, d = x.shape
        q, k, _ = m.qkv(x).view(b, s, 3, m.heads, d // m.heads).permute(2, 0, 3, 1, 4)
        q, k = m.q_norm(q), m.k_norm(k)
        z = q @ k.transpose(-1, -2) / math.sqrt(d // m.heads)
        z = z.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), -math.inf)
        top = max(top, z.max().item())
    return top


def test_attention_logits_grow_at_a_high_learning_rate_unless_qk_layernorm():
    """Wortsman et al. 2023's first instability at small scale: AdamW at lr 0.3, 30 steps of a 2-block LM."""
    ex = _example("attention_logit_growth")
    tokens = next(ex.batches(1, seed=7))[:, :-1]
    plain, normed = (ex.train(qk_norm, steps=30, lr=0.3, every=5) for qk_norm in (False, True))
    assert "attention_logits" in plain["findings"] and plain["warnings"]
    assert normed["findings"] == [] and normed["warnings"] == []
    assert plain["logits_max"][-1][1] > 1e3 > normed["logits_max"][-1][1]
    # first principles, without torchdiag: the trained models' logits on a new batch
    assert _max_logit_by_hand(plain["model"], tokens) > 1e3 > _max_logit_by_hand(normed["model"], tokens)


CALLS = {"n": 0}  # module-level: the replay's copy of the model counts on the same counter


class Flaky(nn.Module):
    """log(x - 10) on the calls listed, log(x + 10) otherwise: a NaN the replay (another call) cannot reproduce."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad = set(bad_calls)
        CALLS["n"] = 0

    def forward(self, x):
        CALLS["n"] += 1
        shift = -10.0 if CALLS["n"] in self.bad else 10.0
        return torch.log(torch.sigmoid(x) * 5 + shift)


def _flaky_run(bad_calls, watched):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Flaky(bad_calls), nn.Linear(8, 2))
    outs, reports = [], []
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag = torchdiag.watch(net) if watched else contextlib.nullcontext()
        with diag:
            for _ in range(5):
                out = net(torch.randn(4, 8, generator=gen))
                out.sum().backward()
                outs.append(out.detach().clone())
                outs.append(net[0].weight.grad.clone())
                if watched:
                    reports.append(diag.step())
    return net, outs, reports, [str(w.message) for w in caught]


def test_a_trip_the_replay_cannot_reproduce_is_found_live_on_the_next_recorded_step():
    # step 2's forward is Flaky's call 3, its replay call 4 (finite), step 3's forward call 5 (NaN again)
    net, outs, reports, caught = _flaky_run({3, 5}, watched=True)
    first = reports[2].nonfinite_origin
    assert (first.phase, first.module, first.op, first.step) == ("forward", "1", None, 2)
    assert "stayed finite" in first.note and "checked live" in first.note
    live = reports[3].nonfinite_origin
    assert (live.phase, live.module, live.op, live.step) == ("forward", "1", "aten.log", 3)
    assert live.source == _line_of(Flaky.forward, "torch.log") and "found live at step 3" in live.note
    assert reports[4].nonfinite_origin == live
    assert any("NaN first produced by `aten.log` in '1' (forward, step 3)" in t for t in caught)
    assert CALLS["n"] == 6  # five steps and one replay
    # the live check only read values: outputs and gradients equal those of an unwatched run (no replay call there)
    _, plain, _, _ = _flaky_run({3, 4}, watched=False)
    for a, b in zip(outs, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


class Interrupted(Flaky):
    """Flaky that raises KeyboardInterrupt (Ctrl-C) at one call."""

    def __init__(self, bad_calls, interrupt_call):
        super().__init__(bad_calls)
        self.interrupt = interrupt_call

    def forward(self, x):
        if CALLS["n"] + 1 == self.interrupt:
            CALLS["n"] += 1
            raise KeyboardInterrupt
        return super().forward(x)


def _interrupted_run(watched):
    # watched: step 2 (call 3) trips, its replay (call 4) stays finite, step 3 (call 5) runs under the live check
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Interrupted({3}, 5 if watched else 4), nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(1)
    outs = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            with torchdiag.watch(net) if watched else contextlib.nullcontext() as diag:
                for _ in range(5):
                    out = net(torch.randn(4, 8, generator=gen))
                    out.sum().backward()
                    outs.append(out.detach().clone())
                    outs.append(net[0].weight.grad.clone())
                    if watched:
                        diag.step()
        except KeyboardInterrupt:
            pass
    return outs


def test_ctrl_c_during_the_live_checked_step_leaves_no_dispatch_or_anomaly_mode_on():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    filters = list(warnings.filters)
    outs = _interrupted_run(watched=True)
    assert len(outs) == 6  # three steps, then Ctrl-C in the fourth's forward
    assert _get_current_dispatch_mode() is None
    assert not torch.is_anomaly_enabled()
    assert warnings.filters == filters
    plain = _interrupted_run(watched=False)
    assert len(plain) == len(outs)
    for a, b in zip(outs, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_ctrl_c_caught_inside_the_watch_leaves_the_live_checks_modes_at_the_steps_end():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Interrupted({3}, 5), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with torchdiag.watch(net) as diag:
            for _ in range(4):
                try:
                    net(torch.randn(4, 8)).sum().backward()
                except KeyboardInterrupt:
                    pass
                diag.step()
                assert _get_current_dispatch_mode() is None and not torch.is_anomaly_enabled()
            net(torch.randn(4, 8)).sum().backward()  # the loop goes on
            diag.step()
    assert _get_current_dispatch_mode() is None and not torch.is_anomaly_enabled()


# ------------------------------------------------------------------ what an independent review found
class MaskedAttention(nn.Module):
    """nanoGPT's causal attention: an Inf written on purpose by masked_fill, then softmax."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        s = x.shape[1]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.ones(s, s).tril() == 0, float("-inf"))
        return att.softmax(-1) @ v


def test_an_inf_written_on_purpose_is_not_an_origin_and_the_real_one_is_found():
    torch.manual_seed(0)
    healthy = nn.Sequential(nn.Linear(8, 16), MaskedAttention(), nn.Linear(16, 4))
    x = torch.randn(2, 6, 8)
    assert torchdiag.locate_nonfinite(healthy, x) is None
    broken = nn.Sequential(nn.Linear(8, 16), MaskedAttention(), ShiftedLog(), nn.Linear(16, 4))
    broken[2].shift = -100.0
    origin = torchdiag.locate_nonfinite(broken, x)
    assert (origin.module, origin.op, origin.value) == ("2", "aten.log", "NaN")


def test_the_replay_is_not_recorded_into_the_next_step():
    _, diag, reports, _ = _log_loop(watched=True, steps=5)
    assert reports[2].nonfinite_origin is not None
    nxt = reports[3]
    assert nxt.first_nonfinite is None and not nxt.flagged
    assert {row.name: row.calls for row in nxt.layers}["6"] == 1  # one forward, no replay merged into it


def test_the_replay_runs_under_the_steps_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        net[0].weight.fill_(0.1), net[0].bias.zero_(), net[1].weight.fill_(300.0)
    x = torch.randn(8, 64).abs() * 10
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()  # fp32: finite; fp16: 64 * 300 * ~50 > 65504
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(net) as diag:
            with torch.autocast("cpu", dtype=torch.float16):
                out = net(x)
            assert not torch.isfinite(out).all()
            diag.step()
    origin = diag.report().nonfinite_origin
    assert (origin.phase, origin.module, origin.value) == ("forward", "1", "Inf")
    assert origin.op in ("aten.addmm", "aten.mm", "aten.linear")


def test_sdpa_taken_during_a_watch_works_after_it():
    model = nn.Sequential(nn.Linear(16, 32), CausalSelfAttention(), nn.Linear(32, 4))
    with torchdiag.watch(model):
        sdpa = F.scaled_dot_product_attention
    q = torch.randn(1, 2, 4, 8)
    torch.testing.assert_close(sdpa(q, q, q), torch._C._nn.scaled_dot_product_attention(q, q, q))


def test_a_mask_filled_with_the_lowest_float_excludes_its_keys():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    keep = torch.rand(8, 8) > 0.5
    keep[:, 0] = True
    lowest = torch.zeros(8, 8).masked_fill(~keep, torch.finfo(torch.float32).min)
    by_bool = attention_figures(q, k, allowed=keep)
    by_float = attention_figures(q, k, additive=lowest)
    torch.testing.assert_close(torch.stack(by_float), torch.stack(by_bool))


def test_a_loss_that_moves_to_a_new_level_is_one_spike_not_one_per_step():
    model = nn.Linear(4, 1)
    gen = torch.Generator().manual_seed(0)
    spikes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1) as diag:
            for i in range(120):
                model(torch.randn(8, 4)).sum().backward()
                level = 1.0 if i < 40 else 3.0
                spikes += diag.step(loss=level + 0.01 * torch.randn((), generator=gen).item()).loss_spikes
    assert [s.step for s in spikes] == [40]
    assert sum("loss spike" in str(w.message) for w in caught) == 1


def test_a_nan_made_by_the_loss_is_said_to_be_the_losss():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model) as diag:
            out = model(torch.randn(8, 4))
            loss = torch.log(out - 5).mean()  # tanh - 5 < 0: NaN, outside the model
            loss.backward()
            assert torch.isfinite(out).all()
            diag.step(loss=loss)
    origin = diag.report().nonfinite_origin
    assert origin.module is None and "loss" in origin.note and origin.value == "NaN"


def test_numpy_losses_feed_the_spike_monitor():
    np = pytest.importorskip("numpy")
    model = nn.Linear(4, 1)
    gen = np.random.default_rng(0)
    spikes = []
    with torchdiag.watch(model, every=1) as diag:
        for i in range(30):
            model(torch.randn(2, 4)).sum().backward()
            value = np.float32(5.0 if i == 29 else 1.0 + 0.01 * gen.standard_normal())
            spikes += diag.step(loss=value).loss_spikes
    assert [s.step for s in spikes] == [29]


def test_the_report_of_a_step_in_progress_keeps_the_origin():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Softplus(), ShiftedLog(), nn.Linear(16, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(net) as diag:  # auto-steps: no step() call, each forward starts a step
            for i in range(3):
                net[2].shift = -3.0 if i == 1 else 1.0
                net(torch.randn(4, 8)).pow(2).mean().backward()
            in_progress = diag.report()  # step 2, not ended yet
    assert in_progress.step == 2 and in_progress.first_nonfinite is None
    origin = in_progress.nonfinite_origin  # (the shift was reset before the replay ran: the module, checked live)
    assert origin is not None and (origin.phase, origin.module, origin.step) == ("forward", "2", 1)


def test_a_heavy_tailed_loss_near_zero_is_no_spike_but_a_real_spike_still_is():
    """A classifier near zero loss: batch losses spread over a factor of a few (log-normal), one batch at ~7x the
    typical loss. On the raw scale that is many Gaussian sigmas; on the log scale with a robust spread it is noise.
    A loss that leaves the run's level by orders of magnitude is still a spike."""
    gen = torch.Generator().manual_seed(0)
    healthy = (0.04 * torch.exp(0.6 * torch.randn(200, generator=gen))).tolist()
    healthy[150] = 0.27
    raw = healthy[:150]
    assert (0.27 - statistics.fmean(raw)) / statistics.pstdev(raw) > 6  # what a Gaussian 6-sigma rule flagged
    model = nn.Linear(4, 1)
    with torchdiag.watch(model, every=1) as diag:
        for value in healthy:
            model(torch.randn(8, 4)).sum().backward()
            assert diag.step(loss=value).loss_spikes == []
        model(torch.randn(8, 4)).sum().backward()
        (spike,) = diag.step(loss=40.0).loss_spikes  # 1000x the typical loss
    logs = [math.log(x) for x in healthy[-128:]]
    med = statistics.median(logs)
    assert spike.sigmas == pytest.approx((math.log(40.0) - med) / (1.4826 * statistics.median(
        abs(v - med) for v in logs)), rel=1e-6)
