"""Whole training runs under ``torchdiag.watch``: healthy runs stay silent, diverging runs are warned in time.

Each run is trained once per session (``result``) and judged by several tests: the training itself is checked
independently of torchdiag (held-out accuracy / loss, divergence measured from the loss alone), then what torchdiag
said about it. Cases that today's code gets wrong are ``xfail(strict=True)`` with what it says: once fixed they
XPASS, which fails the suite, so the mark has to go. ``-s`` prints the lead times.

The data, models, recipes and the table (``python -m tests.helpers.runs``) are in ``tests/helpers/runs.py``.
"""

from __future__ import annotations

import math
import re
from functools import cache

import pytest

from tests.helpers.runs import CASES, DIVERGING, HEALTHY, LMS, LN_VOCAB, RunResult, describe_findings, run


@cache
def result(name: str) -> RunResult:
    return run(CASES[name])


def _param(case, xfail: dict[str, str], slow: bool):
    marks = []
    if case.name in xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=xfail[case.name]))
    if slow:
        marks.append(pytest.mark.slow)
    return pytest.param(case.name, id=case.name, marks=marks)


def _slow(case) -> bool:
    return case.model in LMS or case.model in ("cnn", "mixer")


# ------------------------------------------------------------------------------------------------ healthy runs

SILENT_XFAIL: dict[str, str] = {}  # a healthy run that warns goes here, with what it said

# Runs that train although their init is off: told once, at step 0, with the init as the cause and its fix.
INIT_TOLD = {"cnn_adam"}


@pytest.mark.parametrize("name", [_param(c, {}, _slow(c)) for c in HEALTHY])
def test_healthy_run_trains(name):
    """Independently of torchdiag: the run trains and never diverges."""
    r = result(name)
    assert all(math.isfinite(x) for x in r.losses)
    assert r.divergence_step is None, r.losses
    if r.case.model in LMS:
        assert r.metric < LN_VOCAB - 2.0, f"held-out loss {r.metric:.3f} (uniform: {LN_VOCAB:.3f})"
    elif r.case.n_train is not None:  # small data: it fits its training set, and generalises somewhat
        assert sum(r.losses[-20:]) / 20 < 0.05
        assert r.metric >= (0.7 if r.case.n_train < 200 else 0.85), f"held-out accuracy {r.metric:.3f}"
    else:
        assert r.metric >= 0.9, f"held-out accuracy {r.metric:.3f}"


@pytest.mark.parametrize("name", [_param(c, SILENT_XFAIL, _slow(c)) for c in HEALTHY if c.name not in INIT_TOLD])
def test_healthy_run_is_silent(name):
    """A run that trains fine gets no DiagnosticWarning and no finding."""
    r = result(name)
    print(f"\n{name}: held-out {r.metric:.3f}; {len(r.warnings)} warnings; findings: {describe_findings(r, 120)}")
    assert [w.text for w in r.warnings] == []
    assert [f.describe() for f in r.findings] == []


@pytest.mark.parametrize("name", sorted(INIT_TOLD))
def test_an_off_init_that_still_trains_is_told_once_as_the_init(name):
    """Four 3x3 convs + ReLU at PyTorch's default init, kaiming_uniform(a=sqrt(5)): weight std 1/sqrt(3 fan_in),
    sqrt(6) under the ReLU's Kaiming std, so the output rms falls ~0.41x per conv (10x over four). Adam, which
    rescales each parameter's step, trains it anyway. Right answer: vanishing, present at step 0, the init as the
    cause, the Kaiming factor sqrt(6) as the fix; and nothing more over the run."""
    r = result(name)
    assert r.findings, "the default init's decay was not told"
    assert {f.reason for f in r.findings} == {"init"}
    assert {f.problem for f in r.findings} == {"vanishing"}
    assert all(f.first_step == 0 for f in r.findings)
    assert len({w.text for w in r.warnings}) <= 2 and all(w.step == 0 for w in r.warnings)  # forward, backward
    assert any(f"×{math.sqrt(6):.2g}" in w.text or "2.4" in w.text for w in r.warnings), r.warnings[0].text


# ------------------------------------------------------------------------------------------------ diverging runs

INTIME_XFAIL: dict[str, str] = {}  # a diverging run warned late goes here, with when

# A warning's fix must name the optimisation: a case whose warnings name an init fix goes here, with what they said.
CAUSE_XFAIL: dict[str, str] = {}

_OPTIMISATION = re.compile(r"learning rate|warm-?up|clip", re.I)
_INIT_FIX = re.compile(r"multiply (each layer's|the) weights|suggested scale|apply_suggestions|nn\.init\.|Fixup", re.I)


@pytest.mark.parametrize("name", [_param(c, {}, _slow(c)) for c in DIVERGING])
def test_diverging_run_diverges(name):
    """Independently of torchdiag: the loss goes non-finite, blows up, or climbs back up by more than a nat."""
    r = result(name)
    assert r.divergence_step is not None, [round(x, 3) for x in r.losses]


@pytest.mark.parametrize("name", [_param(c, INTIME_XFAIL, _slow(c)) for c in DIVERGING])
def test_diverging_run_is_warned_in_time(name):
    """A DiagnosticWarning no later than the step the loss diverges."""
    r = result(name)
    print(f"\n{name}: loss diverges at step {r.divergence_step}, first warning at step {r.first_warning_step}, "
          f"lead time {r.lead} steps" + (f": {r.warnings[0].text}" if r.warnings else ""))
    assert r.first_warning_step is not None
    assert r.first_warning_step <= r.divergence_step


@pytest.mark.parametrize("name", [_param(c, CAUSE_XFAIL, _slow(c)) for c in DIVERGING])
def test_diverging_run_names_the_optimisation(name):
    """The first warning blames the optimisation (learning rate / warm-up / clipping), and no warning up to the
    divergence tells the user to change the init or multiply the weights."""
    r = result(name)
    assert r.warnings, "no warning"
    first = r.warnings[0].text
    assert _OPTIMISATION.search(first), first
    upto = max(r.divergence_step or 0, r.first_warning_step) + 5  # what the user reads while it diverges
    wrong = [f"step {w.step}: {w.text}" for w in r.warnings if w.step <= upto and _INIT_FIX.search(w.text)]
    assert wrong == []
    # and a finding of the run blames the optimisation by then (a loss-spike message alone would not)
    assert any(f.reason == "optimisation" and f.first_step <= upto for f in r.findings), [
        (f.layer, f.problem, f.reason, f.first_step) for f in r.findings]
