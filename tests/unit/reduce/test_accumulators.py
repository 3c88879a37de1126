"""accumulators and distributed.reduce (_reduction.py) as units: plain formulas, one process, no process group."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

import torchdiag
from torchdiag._reduce import distributed
from torchdiag._reduce.accumulators import (
    MAX,
    MEAN,
    MIN,
    POOLED,
    SUM,
    GradNorms,
    LayerCall,
    MomentAccumulator,
    Scale,
    SumSq,
    Update,
    reductions,
)
from torchdiag._stats import stats


def _acc(x: torch.Tensor, chunks: int = 1) -> MomentAccumulator:
    m = MomentAccumulator()
    for part in x.chunk(chunks):
        m.add_row(part.numel(), [v.item() for v in stats.act_row(part, zeros=True)])
    return m


def test_moments_against_plain_formulas_merged_over_calls():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(3000) * 2.5 + 0.75)  # zeros are counted on non-negative (ReLU family) outputs
    m = _acc(x, chunks=3)
    ref = x.double()
    assert (m.n, m.calls) == (3000, 3)
    assert m.mean == pytest.approx(ref.mean().item(), rel=1e-6)
    assert m.std == pytest.approx(ref.std(correction=0).item(), rel=1e-6)
    assert m.rms == pytest.approx(ref.pow(2).mean().sqrt().item(), rel=1e-6)
    assert m.sumsq == pytest.approx(ref.pow(2).sum().item(), rel=1e-6)
    assert (m.min, m.max, m.absmax) == (x.min().item(), x.max().item(), x.abs().max().item())
    assert m.zeros == (x == 0).sum().item() and m.nonfinite == 0


def test_rescale_and_nonfinite():
    m = _acc(torch.tensor([1.0, -2.0, 3.0]))
    m.rescale(-0.5)
    assert (m.min, m.max) == (-1.5, 1.0) and m.mean == pytest.approx(-1 / 3)
    bad = _acc(torch.tensor([1.0, float("inf")]))
    assert bad.nonfinite == 1


def test_every_field_declares_its_reduction():
    assert dict(reductions(MomentAccumulator)) == {"n": SUM, "mean": POOLED, "m2": POOLED, "min": MIN, "max": MAX,
                                                   "zeros": SUM, "saturated": SUM, "nonfinite": SUM, "calls": SUM}
    assert dict(reductions(GradNorms))["pre_replicated"] == MEAN
    for cls in (SumSq, Update, GradNorms, Scale, LayerCall):
        assert reductions(cls) and all(op in (SUM, MAX, MIN, MEAN, POOLED) for _, op in reductions(cls))


def _accumulators(x: torch.Tensor) -> dict:
    return {"act": _acc(x), "in": SumSq(float((x.double() ** 2).sum()), x.numel()), "u": Update(1.0, 4.0, 10.0),
            "clip": GradNorms(2.0, 1.0, 0.5, 0.25), "scale": Scale(1024.0), "call": LayerCall(first=3.0, calls=2)}


def test_reduce_without_a_group_is_the_identity():
    accs = _accumulators(torch.randn(10))
    assert distributed.reduce(accs, None) is accs


def test_reduce_over_one_rank_packs_and_unpacks_every_field():
    accs = _accumulators(torch.randn(100) + 3.0)
    out = distributed.reduce(accs, distributed.OneRank())
    assert out.keys() == accs.keys()
    for key, acc in accs.items():
        for name, _ in reductions(acc):
            assert getattr(out[key], name) == pytest.approx(getattr(acc, name), rel=1e-12, abs=1e-12, nan_ok=True), name


class _Threads:
    """A group of threads: ``all_reduce`` meets the other ranks' at a barrier."""

    def __init__(self, world: int) -> None:
        self.barrier, self.values, self.result = threading.Barrier(world), [None] * world, None

    def rank(self, r: int):
        group = self

        class Rank:
            def all_reduce(self, values, op):
                group.values[r] = values
                if group.barrier.wait() == 0:
                    fn = max if op == "max" else sum
                    group.result = [fn(col) for col in zip(*group.values)]
                group.barrier.wait()
                out = list(group.result)
                group.barrier.wait()
                return out

        return Rank()


def _in_threads(per_rank: list[dict], layout: list) -> list[dict]:
    world = _Threads(len(per_rank))
    out: list = [None] * len(per_rank)

    def run(r):
        out[r] = distributed.reduce(per_rank[r], world.rank(r), layout)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(per_rank))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_reduce_over_ranks_pools_moments_exactly_and_applies_each_declared_op():
    torch.manual_seed(1)
    x0, x1 = torch.randn(500) * 0.01 + 100.0, torch.randn(1500) * 0.03 + 100.05
    layout = [(k, type(v)) for k, v in _accumulators(x0).items()] + [("absent", SumSq)]
    a, b = _in_threads([_accumulators(x0), _accumulators(x1)], layout)
    assert repr(a) == repr(b) and "absent" not in a
    x = torch.cat([x0, x1]).double()
    m = a["act"]
    assert m.n == 2000 and m.calls == 2
    assert m.mean == pytest.approx(x.mean().item(), rel=1e-7)
    assert m.std == pytest.approx(x.std(correction=0).item(), rel=1e-4)  # float32 rows: their precision
    assert (m.min, m.max) == (x.min().item(), x.max().item())
    assert a["in"].n == 2000 and a["in"].total == pytest.approx((x ** 2).sum().item(), rel=1e-6)
    assert (a["u"].dd, a["u"].ww, a["u"].n) == (2.0, 8.0, 20.0)  # SUM
    assert (a["clip"].pre_replicated, a["clip"].pre_sharded) == (2.0, 1.0)  # MEAN over ranks, SUM
    assert a["scale"].value == 1024.0 and (a["call"].first, a["call"].calls) == (3.0, 2)


def test_reduce_nan_range_and_a_rank_without_the_key():
    nan = _acc(torch.tensor([1.0, float("nan")]))
    ok = _acc(torch.tensor([-4.0, 5.0]))
    layout = [("m", MomentAccumulator)]
    a, _ = _in_threads([{"m": nan}, {"m": ok}], layout)
    assert math.isnan(a["m"].min) and math.isnan(a["m"].max) and a["m"].nonfinite == 1 and a["m"].n == 4
    a, b = _in_threads([{"m": ok}, {}], layout)
    assert (a["m"].n, a["m"].mean, a["m"].min, a["m"].max) == (2, 0.5, -4.0, 5.0) and repr(a) == repr(b)
    a, _ = _in_threads([{}, {}], layout)
    assert a == {}


def test_a_single_process_step_goes_through_the_same_reduce(monkeypatch):
    calls = []
    original = distributed.reduce

    def spy(accumulators, group, layout=None):
        calls.append(group)
        return original(accumulators, group, layout)

    monkeypatch.setattr(distributed, "reduce", spy)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torchdiag.watch(model) as diag:
        model(torch.randn(3, 4)).sum().backward()
        assert diag.step() is not None
    assert calls == [None]
