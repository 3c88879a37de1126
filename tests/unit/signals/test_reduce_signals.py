"""The divergence signals as rows of the step buffer (``signals.stage`` -> ``StepBuffer.write_signal``), brought to
the host with the step (``decode``) and reduced across ranks by the reductions their accumulators declare
(``reduce`` over ``signals.layout``): checked with two simulated ranks, each rank's collectives combined with the
other's in the order they are called."""

from __future__ import annotations

import math

import pytest
import torch

from torchdiag._reduce.distributed import reduce
from torchdiag._signals import signals
from torchdiag._stats.stepbuffer import Pending, StepBuffer, arrive, decode


class Recorded:
    """A rank whose collectives return its own values, kept in call order."""

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def all_reduce(self, values: list[float], op: str) -> list[float]:
        self.calls.append(list(values))
        return list(values)


class WithPeer:
    """A rank whose collectives combine its values with the peer's recorded ones, call by call."""

    def __init__(self, peer: Recorded) -> None:
        self.peer = iter(peer.calls)

    def all_reduce(self, values: list[float], op: str) -> list[float]:
        other = next(self.peer)
        pick = max if op == "max" else (lambda a, b: a + b)
        return [pick(a, b) for a, b in zip(values, other)]


def t(v: float) -> torch.Tensor:
    return torch.tensor(v)


def raw(attention=None, logz=None, softmax=None, adam=None, losses=()):
    """What ``Signals.take`` gives: 0-d tensors still 'on the device'."""
    return {"attention": attention or {}, "logz": logz, "softmax": softmax, "adam": adam or {},
            "losses": list(losses)}


def through_the_buffer(taken: dict, earlier_losses=()) -> dict:
    """A rank's signal figures as its step buffer brings them back: staged, one copy, decoded."""
    buf = StepBuffer()
    signals.stage(taken, list(earlier_losses), buf)
    pending = Pending(step=0, entries=buf.entries, order={}, calls={}, reduce=True, hist_entries=[],
                      signals=buf.signals)
    buf.launch(pending, with_histograms=False, defer=False)
    host, _ = arrive(pending)
    return decode(pending, host).signals


def test_one_rank_reads_back_what_it_measured():
    figs = through_the_buffer(raw(attention={"attn": (t(12.0), t(0.8)), "eager": (None, t(0.3))}, logz=t(2.0),
                                  softmax=t(2e-4), adam={"w": (t(9e-8), 1e-8)}, losses=[(3, t(1.25))]),
                              earlier_losses=[(1, 1.5), (2, t(float("nan")))])
    out = signals.read(figs)
    assert out.attention["attn"] == (12.0, pytest.approx(0.8))
    top, ent = out.attention["eager"]  # probabilities only: the entropy, no logit
    assert math.isnan(top) and ent == pytest.approx(0.3)
    assert out.logz == 2.0 and out.softmax_output
    assert out.adam["w"] == (pytest.approx(3e-4), 1e-8)
    assert [s for s, _ in out.losses] == [1, 2, 3] and out.losses[0][1] == 1.5 and math.isnan(out.losses[1][1])
    assert not signals.read(through_the_buffer(raw(softmax=t(0.5)))).softmax_output


def test_two_ranks_give_the_largest_logit_the_mean_entropy_and_log_z_and_every_ranks_gradient_rms():
    a = through_the_buffer(raw(attention={"attn": (t(12.0), t(0.8)), "only_a": (t(3.0), t(0.5))}, logz=t(2.0),
                               softmax=t(1e-5), adam={"w": (t(3e-4 ** 2), 1e-8)}, losses=[(0, t(1.5))]))
    b = through_the_buffer(raw(attention={"attn": (t(20.0), t(0.6))}, softmax=t(2e-4),
                               adam={"w": (t(4e-4 ** 2), 1e-8)}, losses=[(0, t(9.0))]))
    layout = signals.layout(["attn", "only_a"], ["w"])
    peer = Recorded()
    reduce(b, peer, layout)
    got = reduce(a, WithPeer(peer), layout)
    assert not any(k[0] == "loss" for k in got)  # not in the layout: each rank keeps its own
    out = signals.read(got)
    assert out.attention["attn"] == (20.0, pytest.approx(0.7))  # the largest of any rank; the mean over both
    assert out.attention["only_a"] == (3.0, 0.5)  # measured on one rank: its own
    assert out.logz == 2.0  # the mean over the ranks that measured it
    assert out.softmax_output  # every rank passed
    rms, eps = out.adam["w"]
    assert rms == pytest.approx(math.sqrt((3e-4 ** 2 + 4e-4 ** 2) / 2)) and eps == pytest.approx(1e-8)


def test_a_rank_whose_output_fails_the_softmax_test_and_a_non_finite_logit_left_out():
    a = through_the_buffer(raw(attention={"attn": (t(math.inf), t(math.nan))}, softmax=t(0.0),
                               logz=t(math.nan), adam={"w": (t(math.nan), 1e-8)}))
    b = through_the_buffer(raw(attention={"attn": (t(7.0), t(0.9))}, softmax=t(0.4)))
    layout = signals.layout(["attn"], ["w"])
    peer = Recorded()
    reduce(b, peer, layout)
    out = signals.read(reduce(a, WithPeer(peer), layout))
    assert out.attention["attn"] == (7.0, pytest.approx(0.9))
    assert not out.softmax_output and out.logz is None and out.adam == {}
