"""The divergence signals reduced across ranks by their declared reductions (``signals.reduce_across``): checked
with two simulated ranks, each rank's collectives combined with the other's in the order they are called."""

from __future__ import annotations

import math

import pytest

from torchdiag.signals.signals import reduce_across
from torchdiag.vocab import StepSignals


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


def test_two_ranks_give_the_largest_logit_the_mean_entropy_and_log_z_and_every_ranks_gradient_rms():
    a = StepSignals(attention={"attn": (12.0, 0.8), "only_a": (3.0, 0.5)}, logz=2.0, softmax_output=True,
                    adam={"w": (3e-4, 1e-8)}, losses=[(0, 1.5)])
    b = StepSignals(attention={"attn": (20.0, 0.6)}, logz=None, softmax_output=True, adam={"w": (4e-4, 1e-8)})
    layers, weights = ["attn", "only_a"], ["w"]
    peer = Recorded()
    reduce_across(b, layers, weights, peer)
    out = reduce_across(a, layers, weights, WithPeer(peer))
    assert out.attention["attn"] == (20.0, pytest.approx(0.7))  # the largest of any rank; the mean over both
    assert out.attention["only_a"] == (3.0, 0.5)  # measured on one rank: its own
    assert out.logz == 2.0  # the mean over the ranks that measured it
    assert out.softmax_output  # every rank passed
    rms, eps = out.adam["w"]
    assert rms == pytest.approx(math.sqrt((3e-4 ** 2 + 4e-4 ** 2) / 2)) and eps == pytest.approx(1e-8)
    assert out.losses == [(0, 1.5)]  # each rank's own


def test_a_rank_whose_output_fails_the_softmax_test_and_a_non_finite_logit_left_out():
    a = StepSignals(attention={"attn": (math.inf, math.nan)}, softmax_output=True)
    b = StepSignals(attention={"attn": (7.0, 0.9)}, softmax_output=False)
    peer = Recorded()
    reduce_across(b, ["attn"], [], peer)
    out = reduce_across(a, ["attn"], [], WithPeer(peer))
    assert out.attention["attn"] == (7.0, 0.9)
    assert not out.softmax_output and out.logz is None and out.adam == {}
