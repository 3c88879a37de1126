"""Attention is observed without replacing anything of ``torch.nn.functional`` (issue #28 item 7): a mode entered
around a watched attention module's forward on recorded steps only."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiag
from tests.unit.signals.test_instability import CausalSelfAttention, InterruptedAttention


class ScriptableAttention(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), CausalSelfAttention(), nn.Linear(32, 4))


def test_jit_script_of_a_module_calling_sdpa_works_while_a_watch_records_attention():
    model = _model()
    x = torch.randn(2, 8, 16)
    q = torch.randn(1, 2, 4, 8)
    with torchdiag.watch(model, every=1, warnings=False) as diag:
        model(x).square().mean().backward()
        scripted = torch.jit.script(ScriptableAttention())  # raised NotSupportedError (a *args wrapper)
        rep = diag.step()
    torch.testing.assert_close(scripted(q), F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert rep.layers[1].attention_logit_max is not None  # attention still recorded


def test_torch_nn_functional_is_untouched_during_a_watch():
    model = _model()
    with torchdiag.watch(model, every=1, warnings=False):
        assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
        model(torch.randn(2, 8, 16)).sum().backward()
        assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
        assert torch._C._len_torch_function_stack() == 0  # the mode is left with the attention forward


class ModeCountingAttention(CausalSelfAttention):
    """Notes how many torch function modes are active while it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[int] = []

    def forward(self, x):
        self.modes.append(torch._C._len_torch_function_stack())
        return super().forward(x)


def test_the_mode_is_entered_only_around_watched_attention_forwards_of_recorded_steps():
    torch.manual_seed(0)
    watched = nn.Sequential(nn.Linear(16, 32), ModeCountingAttention(), nn.Linear(32, 4))
    other = nn.Sequential(nn.Linear(16, 32), ModeCountingAttention(), nn.Linear(32, 4))
    with torchdiag.watch(watched, every=2, warnings=False) as diag:
        reports = []
        for _ in range(3):
            watched(torch.randn(2, 8, 16)).sum().backward()
            other(torch.randn(2, 8, 16)).sum().backward()  # another model meanwhile: never observed
            reports.append(diag.step())
    assert [r is not None for r in reports] == [True, False, True]
    assert watched[1].modes == [1, 0, 1] and other[1].modes == [0, 0, 0]
    assert [r.name for r in reports[0].layers if r.attention_logit_max is not None] == ["1.qkv"]


def test_ctrl_c_inside_an_attention_forward_leaves_no_mode_behind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), InterruptedAttention(at=1), nn.Linear(32, 4))
    with pytest.raises(KeyboardInterrupt), torchdiag.watch(model, every=1, warnings=False):
        model(torch.randn(2, 8, 16))
    assert torch._C._len_torch_function_stack() == 0


def test_a_compiled_watched_model_with_attention_has_no_graph_break():
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    dynamo.utils.counters.clear()
    model = _model()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*global hooks.*")
        with torchdiag.watch(model, every=1, warnings=False) as diag:
            torch.compile(model, backend="aot_eager")(torch.randn(2, 8, 16)).sum().backward()
            rep = diag.step()
    assert sum(dynamo.utils.counters["graph_break"].values()) == 0, dict(dynamo.utils.counters["graph_break"])
    assert len(rep.layers) > 3
    dynamo.reset()


class _Seen(torch.overrides.TorchFunctionMode):
    """A user's torch function mode: the names of the functions called under it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_user_function_mode_sees_the_models_calls_not_torchdiags():
    """torchdiag's work in the forward's hooks (the capture's reads of each output, the attention figures of the
    SDPA call, the output's log Z) runs with the torch function modes in effect taken off, and put back after: a
    user's mode sees the model's own calls, as unwatched, and stays on the stack."""
    model = _model()
    x = torch.randn(2, 8, 16)
    with _Seen() as plain:
        model(x)
    with torchdiag.watch(model, every=1, warnings=False) as diag:
        with _Seen() as watched:
            out = model(x)
            assert torch._C._len_torch_function_stack() == 1
        F.cross_entropy(out.reshape(-1, 4), torch.arange(16) % 4).backward()  # (a softmax output: its log Z)
        report = diag.step()
    assert watched.names == plain.names and "scaled_dot_product_attention" in plain.names
    assert report.layers[1].attention_logit_max is not None
    logits = out.detach().reshape(-1, 4).double()
    assert report["2"].output_logz == pytest.approx(torch.logsumexp(logits, -1).mean().item(), rel=1e-5)
    assert report["2"].act_rms == pytest.approx(logits.square().mean().sqrt().item(), rel=1e-5)


def test_a_watched_model_run_inside_another_watched_forward_keeps_the_attention_callbacks_paired():
    """B's auto-step, inside A's attention forward, starts and ends steps no watch records: the attention module's
    post-callback runs exactly where its pre-callback did, so nothing is left on the attention stack."""
    from torchdiag._signals._attention import SDPA

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    class CallingAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            return inner(self.q(x))  # another watched model, inside this forward

    outer = nn.Sequential(CallingAttention(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    left = []
    with torchdiag.watch(outer, every=1000, warnings=False) as diag, \
            torchdiag.watch(inner, every=3, warnings=False) as inner_diag:
        for _ in range(8):
            outer(x).square().mean().backward()
            diag.step()
            left.append(len(getattr(SDPA.local, "stack", [])))
        assert inner_diag.report().step == 6  # (the inner model's own steps go on: 0, 3, 6 recorded)
    assert left == [0] * 8
