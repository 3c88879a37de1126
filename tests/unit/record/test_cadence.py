"""Which steps a watch records: a fixed ``every``, or the time budget (``_record/cadence.py``), alone and in a watch."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiag
from torchdiag._record.cadence import Cadence
from torchdiag._reduce.accumulators import Interval


def _timed(cadence: Cadence, recording: float, plain: float, own: float, n_rec: int = 9, n_plain: int = 15,
           plain_own: float = 0.0) -> None:
    for _ in range(n_rec):
        cadence.observe(recording, True, own, True)
    for _ in range(n_plain):
        cadence.observe(plain, False, plain_own, False)


def _smallest_interval(cost: float, plain: float, budget: float) -> int:
    """By hand: the smallest k for which one recording of ``cost`` every k steps of ``plain`` is within ``budget``."""
    k = 1
    while cost / (k * plain) > budget + 1e-12:
        k += 1
    return k


def test_the_interval_is_the_smallest_that_keeps_the_recordings_within_the_budget():
    for recording, plain, own, budget in ((1.5, 1.0, 0.2, 0.03), (1.02, 1.0, 0.01, 0.03), (3.0, 1.0, 0.5, 0.1)):
        c = Cadence(None, budget=budget)
        _timed(c, recording, plain, own)
        proposed = c.propose()
        k, cost, step = proposed.steps, proposed.cost, proposed.step
        assert (cost, step) == (recording - plain, plain)
        assert k == _smallest_interval(recording - plain, plain, budget)
    # what torchdiag's end of a step took is a floor on a recording's cost (a plain step slower than usual)
    c = Cadence(None, budget=0.03)
    _timed(c, 1.1, 1.0, own=0.3)
    assert c.propose().cost == 0.3
    # before any plain step: the cost is the end-of-step work, the step the rest
    c = Cadence(None, budget=0.03)
    _timed(c, 1.2, 1.0, own=0.2, n_plain=0)
    assert (c.propose().steps, c.propose().cost) == (_smallest_interval(0.2, 1.0, 0.03), 0.2)
    # a recording completed at the next step (deferral) costs both steps
    c = Cadence(None, budget=0.03)
    for _ in range(5):
        c.observe(1.3, True, 0.1, True)
        c.observe(1.3, True, 0.1, False)  # the next step completes it
    _timed(c, 1.3, 1.0, 0.1, n_rec=0)
    assert c.propose().cost == pytest.approx(2 * 0.3)
    # the first steps' recordings (slowed by what a run's start does once) count until three later ones are known
    c = Cadence(None, budget=0.03)
    for _ in range(4):
        c.observe(9.0, True, 0.2, True, early=True)
    _timed(c, 1.5, 1.0, 0.2, n_rec=2)
    assert c.propose().cost == pytest.approx(8.0)  # the median of six, four of them early
    c.observe(1.5, True, 0.2, True)
    assert c.propose().cost == pytest.approx(0.5)
    # histogram steps (their own schedule) are left out of a recording's cost, unless nothing else is known
    c = Cadence(None, budget=0.03)
    c.observe(9.0, True, 5.0, True, heavy=True)
    _timed(c, 1.5, 1.0, 0.2, n_rec=0)
    assert c.propose().cost == 8.0
    _timed(c, 1.5, 1.0, 0.2, n_plain=0)
    assert c.propose().cost == pytest.approx(0.5)


def test_the_budget_also_covers_the_steps_not_recorded_and_the_histogram_steps():
    # torchdiag's own work at a step not recorded takes its share of every step: the recordings get the rest
    c = Cadence(None, budget=0.03)
    _timed(c, 1.5, 1.0, 0.2, plain_own=0.01)
    assert c.propose().steps == _smallest_interval(0.5, 1.0, 0.03 - 0.01) and c.propose().every_step == 0.01
    # where that work alone takes the budget, the recordings keep a tenth of it: the budget cannot be kept, and the
    # report says so
    c = Cadence(None, budget=0.03)
    _timed(c, 1.5, 1.0, 0.2, plain_own=0.05)
    assert c.propose().steps == _smallest_interval(0.5, 1.0, 0.003)
    c.agree(c.propose())
    for step in range(10):
        c.decide(step)
    assert c.describe().endswith("; time budget 3 %, not kept: a step not recorded takes 5 % of the step")
    # a histogram step's extra time over a recording's: its windows (100 steps) double until it takes at most a
    # third of the budget, and the recordings get what is left
    for extra in (0.5, 3.0, 9.0):
        c = Cadence(None, budget=0.03, heavy_every=100)
        c.observe(1.5 + extra, True, 0.2 + extra, True, heavy=True)
        _timed(c, 1.5, 1.0, 0.2, plain_own=0.004)
        proposed = c.propose()
        k, heavy, stretch = proposed.steps, proposed.heavy, proposed.stretch
        m = 1
        while extra / (m * 100 * 1.0) > 0.03 / 3 + 1e-12:
            m *= 2
        assert (heavy, stretch) == (pytest.approx(extra), m)
        assert k == _smallest_interval(0.5, 1.0, 0.03 - 0.004 - extra / (m * 100))
    c.agree(c.propose())
    assert c.stretch == 1  # (the agreed stretch takes effect at the next step decided)
    for step in range(10):
        c.decide(step)
    assert c.stretch == 16
    said = c.describe()
    assert "a histogram step 9000 ms more (histogram and overview windows 16x longer)" in said
    assert "a step not recorded 4 ms" in said  # 0.4 % of the step: over a tenth of the budget, so it is said
    c = Cadence(None, budget=0.03)
    _timed(c, 1.5, 1.0, 0.2, plain_own=0.001)
    c.agree(c.propose())
    for step in range(10):
        c.decide(step)
    assert "one step in" in c.describe() and "not recorded" not in c.describe()  # 0.1 %: under a tenth, unsaid
    # histograms switched off (TensorBoard failed): none of the budget goes to them any more
    c = Cadence(None, budget=0.03, heavy_every=100)
    c.observe(10.5, True, 9.2, True, heavy=True)
    _timed(c, 1.5, 1.0, 0.2, plain_own=0.001)
    assert (c.propose().heavy, c.propose().stretch) == (9.0, 16.0)
    c.no_heavy()
    assert (c.propose().heavy, c.propose().stretch) == (-math.inf, 1.0)
    assert c.propose().steps == _smallest_interval(0.5, 1.0, 0.03 - 0.001)
    # until three recordings after the first steps are known, the windows are as configured
    c = Cadence(None, budget=0.03, heavy_every=100)
    c.observe(10.5, True, 9.2, True, heavy=True)
    _timed(c, 1.5, 1.0, 0.2, n_rec=2)
    assert c.propose().stretch == 1.0


def test_the_schedule_records_the_first_steps_then_one_step_in_the_agreed_interval():
    fixed = Cadence(4)
    assert [s for s in range(12) if fixed.decide(s)] == [0, 4, 8]
    c = Cadence(None, budget=0.03, record_first=5)
    got = []
    for step in range(60):
        if step == 5:
            c.agree(Interval(17, 0.5, 1.0))
        if c.decide(step):
            got.append(step)
    # the gap after the first steps grows at most 4-fold a time (4, then 16), then it is the agreed 17
    assert got == [0, 1, 2, 3, 4, 8, 24, 41, 58]
    # every step fits the budget: every step is recorded but three (one in two, for a median) and then one in 100,
    # which time the step without torchdiag
    c = Cadence(None, budget=0.03, record_first=5)
    c.agree(Interval(1, 0.001, 1.0))
    plain = [s for s in range(250) if not c.decide(s)]
    assert plain == [6, 8, 10, 110, 210]


def test_something_new_records_the_next_steps_in_full_and_the_same_again_does_not():
    c = Cadence(None, budget=0.03, record_first=2, settle=3)
    c.agree(Interval(10, 1.0, 1.0))
    assert [s for s in range(20) if c.decide(s)] == [0, 1, 5, 15]
    c.observe_report(15, frozenset({("fc2", "exploding")}), events=False)
    assert "something new at step 15" in c.describe()
    assert [s for s in range(20, 23) if c.decide(s)] == [20, 21, 22]
    c.observe_report(22, frozenset({("fc2", "exploding")}), events=False)  # the same flag: nothing new
    assert [s for s in range(23, 40) if c.decide(s)] == [26, 36]  # (the gap grows again from 1: 4, then 10)
    c.observe_report(36, frozenset(), events=True)  # a loss spike, a NaN or a forecast is always news
    assert [s for s in range(37, 40) if c.decide(s)] == [37, 38, 39]
    c.observe_report(39, frozenset({("fc2", "exploding")}), events=False)  # back after a gap: flickering, not news
    assert [s for s in range(40, 50) if c.decide(s)] == [43]
    c.observe_report(200, frozenset({("fc2", "exploding")}), events=False)  # not seen for 161 steps: news again
    assert [s for s in range(201, 205) if c.decide(s)] == [201, 202, 203]


def test_a_flag_records_what_a_finding_needs_and_a_trend_what_a_forecast_fits():
    # a flag becomes a finding over finding_window recorded steps; a forecast fits forecast_window of them
    def in_full_after(**news) -> int:
        c = Cadence(None, budget=0.03, record_first=1, settle=5, settle_trend=8)
        c.agree(Interval(50, 1.0, 1.0))
        assert [s for s in range(30) if c.decide(s)] == [0, 4, 20]  # (the gap grows 4-fold up to the budget's)
        c.observe_report(20, events=False, **news)
        run = 0
        while c.decide(21 + run):
            run += 1
        return run

    assert in_full_after(flags=frozenset({("fc2", "vanishing")})) == 5
    assert in_full_after(flags=frozenset(), trends=frozenset({("attn", "approaching attention logit")})) == 8
    assert in_full_after(flags=frozenset(), forecast=True) == 8
    assert in_full_after(flags=frozenset({("fc2", "exploding")}), trends=frozenset({("out", "approaching log Z")})) == 8
    assert in_full_after(flags=frozenset()) == 0


def test_the_first_steps_after_a_trip_at_step_0_count_towards_its_settling():
    # a flag raised at step 0 (an init problem) is seen at steps 1-4 as well, which are recorded anyway: five
    # recorded steps after it (1-5), what a flag needs to become a finding, and then the budget's cadence
    c = Cadence(None, budget=0.03, record_first=5, settle=5)
    c.agree(Interval(50, 1.0, 1.0))
    got = []
    for step in range(30):
        if c.decide(step):
            got.append(step)
            if step == 0:
                c.observe_report(0, frozenset({("fc2", "vanishing")}), events=False)
    assert got == [0, 1, 2, 3, 4, 5, 9, 25]  # (then the gap grows 4-fold a time towards the agreed 50)


def test_ranks_with_different_clocks_record_the_same_steps_once_they_agree():
    a, b = Cadence(None, budget=0.03, heavy_every=100), Cadence(None, budget=0.03, heavy_every=100)
    a.observe(10.5, True, 9.2, True, heavy=True)  # only one rank has timed a histogram step
    _timed(a, 1.5, 1.0, 0.2, plain_own=0.02)
    _timed(b, 1.2, 1.0, 0.1, plain_own=0.01)
    # what the reduction (MAX) gives every rank: a NaN on any rank is NaN; a figure one rank has not timed is -inf
    pa, pb = a.propose(), b.propose()
    agreed = Interval(*(math.nan if math.isnan(x) or math.isnan(y) else max(x, y)
                        for x, y in ((getattr(pa, f.name), getattr(pb, f.name)) for f in dataclasses.fields(Interval))))
    assert pb.heavy == -math.inf and agreed.heavy == 9.0
    for c in (a, b):
        c.agree(agreed)
    assert [s for s in range(200) if a.decide(s)] == [s for s in range(200) if b.decide(s)]
    assert a.stretch == b.stretch == 16  # 9 s over 100 steps of 1 s: 16 x longer windows take 0.56 %
    assert a.describe() == b.describe() and "16x longer" in a.describe()


# ------------------------------------------------------------------ in a watch
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 128), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def _kaiming(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def _train(model, steps, event=None, losses=None, **kw):
    """SGD on a fixed batch; ``event(step, model)`` may break something; returns the reports of the recorded steps."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reports = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torchdiag.watch(model, **kw) as diag:
            for step in range(steps):
                if event is not None:
                    event(step, model)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                report = diag.step(loss=losses[step] if losses is not None else None)
                if report is not None:
                    reports[report.step] = report
    return reports, diag


def test_a_watch_under_the_budget_records_the_first_steps_then_spaces_out_the_rest(one_thread):
    # (one thread: on a busy 2-core machine two threads wait on each other, and a 1 ms step takes 80 ms, for which a
    # 1 ms recording is within the budget at every step)
    reports, diag = _train(_kaiming(_mlp()), 300)
    steps = sorted(reports)
    assert steps[:5] == [0, 1, 2, 3, 4]
    assert len(steps) < 150  # a 64 x 128 MLP step is ~1 ms: recording one costs about as much again
    last = reports[steps[-1]]
    assert last.record_interval is not None and last.record_interval > 3
    assert "time budget of 3 %" in last.cadence or "time budget 3 %" in last.cadence
    assert f"one step in {last.record_interval}" in last.cadence
    lines = str(last).splitlines()[1:]  # the report says it under its title, wrapped onto indented lines
    said = lines[0] + "".join(" " + x.strip() for x in itertools.takewhile(lambda x: x.startswith("  "), lines[1:]))
    assert said == "recorded: " + last.cadence
    # the spacing after the first steps follows the agreed interval (never closer, outside a trip)
    gaps = [b - a for a, b in zip(steps[5:], steps[6:])]
    assert gaps and min(gaps) >= 2


def test_under_the_budget_the_histogram_and_overview_windows_lengthen_by_the_agreed_stretch(tmp_path, monkeypatch):
    """Right answer: with the ranks' agreement pinned (one step in 2, windows 4x longer) from step 0's on, the
    histograms come at the first recorded step of each window of 4 x histogram_every steps (step 0's decided
    before any agreement), the overview images at the first recorded step of each window of 4 x overview_every
    from the second on, and at the last recorded step; read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    monkeypatch.setattr(Cadence, "propose", lambda self: Interval(2.0, 1e-3, 1e-3, -math.inf, 1e-2, 4.0))
    reports, _ = _train(_kaiming(_mlp()), 70, logdir=str(tmp_path), histogram_every=3, overview_every=5)
    recorded = sorted(reports)
    assert len(recorded) < 50  # (spaced out: one in 2 but for the first steps and trips)

    def first_of_each_window(length: int) -> list[int]:
        return sorted({w: s for s in reversed(recorded) for w in [s // length]}.values())

    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.HISTOGRAMS: 0, ea.IMAGES: 0})
    acc.Reload()
    assert [e.step for e in acc.Histograms("act/0")] == first_of_each_window(12)
    images = sorted({e.step for t in acc.Tags()["images"] if t.startswith("0_overview/") for e in acc.Images(t)})
    assert images == sorted({s for s in first_of_each_window(20) if s >= 20} | {recorded[-1]})


@pytest.mark.parametrize("defer", ["never", "always"])
def test_a_histogram_step_is_timed_where_its_work_is_done(tmp_path, monkeypatch, defer):
    """Right answer: a histogram step's host work (binning, writing, the overview) is paid where its report is
    completed: at the step itself, or, with the report deferred, at the step after it. That step, and no other, is
    the one the budget times as a histogram step."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    heavy_at, observe = [], Cadence.observe

    def spy(self, seconds, recording, own, recorded, heavy=False, early=False):
        heavy_at.append(heavy)
        return observe(self, seconds, recording, own, recorded, heavy, early)

    monkeypatch.setattr(Cadence, "observe", spy)
    _train(_kaiming(_mlp()), 40, logdir=str(tmp_path), histogram_every=4, defer_report=defer)
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.HISTOGRAMS: 0})
    acc.Reload()
    binned = [e.step for e in acc.Histograms("act/0")]
    assert len(binned) >= 3
    later = 1 if defer == "always" else 0
    # observe runs from step 1 on (step 0 has no step before it to time from): heavy_at[i] is step i + 1
    assert [i + 1 for i, h in enumerate(heavy_at) if h] == [s + later for s in binned if 0 < s + later < 40]


def test_a_layer_broken_mid_run_is_recorded_in_full_until_it_settles(one_thread):
    """Right answer: a Linear's weights x1000 at step 150 explode the signal from there on. The first recorded step
    after it flags that layer, and the steps right after are recorded one by one (``settle`` of them) so that the
    finding persists on consecutive steps; then the budget's spacing resumes."""
    def breaks(step, model):
        if step == 150:
            with torch.no_grad():
                model[4].weight.mul_(1000.0)

    reports, diag = _train(_kaiming(_mlp()), 260, breaks, budget=0.5)  # (a budget that records every few steps)
    steps = sorted(reports)
    first = next(s for s in steps if s >= 150 and reports[s].flagged)
    assert first - 150 < 60
    settle = torchdiag.Config.defaults().finding_window  # what a flag needs to become a finding
    assert [s for s in steps if first < s <= first + settle] == list(range(first + 1, first + settle + 1))
    assert any(f.first_step >= 150 for f in diag.findings)  # and it became a finding of the run


def test_a_loss_spike_at_an_unrecorded_step_records_the_next_step_and_is_reported_with_its_own_step():
    gen = torch.Generator().manual_seed(2)
    losses = [2.0 + 0.01 * torch.randn((), generator=gen).item() for _ in range(300)]
    losses[200] = 50.0
    reports, _ = _train(_kaiming(_mlp()), 300, losses=losses)
    steps = sorted(reports)
    spikes = [s for r in reports.values() for s in r.loss_spikes]
    assert [s.step for s in spikes] == [200]
    assert 201 in steps and all(s in steps for s in range(201, 206))  # recorded in full right after it
    assert 200 not in steps or reports[200].loss_spikes  # (it was not recorded, unless it happened to be)


def test_a_problem_that_persists_becomes_a_finding_at_any_cadence():
    """The verdict counts recorded steps (3 of the last 5): a ReLU killed at step 100 is a finding at the third
    recorded step after, whether that is step 102 (every step) or step 120 (every=10)."""
    def kills(step, model):
        if step == 100:
            with torch.no_grad():
                model[2].bias.fill_(-1e3)  # every unit of the second Linear negative: the ReLU after it is dead

    for every in (1, 10):
        reports, diag = _train(_kaiming(_mlp()), 160, kills, every=every)
        dead = [f for f in diag.findings if f.problem == "dead" and f.layer == "3"]
        assert dead and dead[0].first_step == 100, (every, diag.findings)
        became = min(s for s, r in reports.items() if any(f.problem == "dead" and f.layer == "3"
                                                          for f in r.new_findings))
        assert became == 100 + 2 * every, every
