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

# Today's false alarms on runs that train fine (recorded against 9458b4c).
SILENT_XFAIL = {
    "mlp_adam": (
        "false alarm: the 12 x (Linear 256 + ReLU) Kaiming MLP, Adam 1e-3, 97% held-out, is flagged exploding "
        "(backward) on every Linear '0' ... '24' (finding first_step 103, warned at step 182): 'along 13 repeated "
        "Linear layers the output gradient norm changes 1.23x per layer, 11.6x from the last to the first "
        "(exploding_ratio 10). Fix: the weights already have the textbook scale, so the drift comes from the "
        "structure (residual sums that grow with depth, no normalisation): scale each residual branch down ... as "
        "Fixup does' -- the model has no residual branch"),
    "mlp_adam_no_opt_arg": (
        "false alarm, same as mlp_adam without optimizer=: exploding (backward) on '0' ... '24', warned at step 182, "
        "'scale each residual branch down ... as Fixup does'"),
    "mlp_adamw_cosine": (
        "false alarm: AdamW + warm-up + cosine + clipping, 97% held-out: exploding (backward) @ '0' from step 110 "
        "(warned at step 129), the Fixup/residual-branch fix on a model without residual branches"),
    "mlp_small_data": (
        "false alarm: 400 training digits, batch 16, Adam 1e-3 (training loss to ~1e-4, 91% held-out): the Gaussian "
        "6-sigma loss-spike rule fires on one heavy-tailed batch, warned at step 218: 'loss spike at step 217: 1.573 "
        "is 8.4 sigma above the mean 0.1002 (std 0.18) of the steps before it; first to spike: '0' gradient norm at "
        "step 210 ... Fix: lower the learning rate or clip gradients; skip the batch if it repeats.' (no finding)"),
    "mlp_tiny_data": (
        "false alarm: 100 training digits, batch 16, Adam 1e-3, the training loss falls to ~1e-6: adam_epsilon on "
        "the Linears '0' ... '22' from step ~214 (warned at step 251: 'its gradient rms ... is ... x Adam's eps 1e-08 "
        "... Fix: eps=1e-10 (Wortsman et al. 2023)'): a fitted model's gradients are small because nothing is left "
        "to learn"),
    "cnn_adam": (
        "false alarm (debatable): four 3x3 convs at PyTorch's default init (kaiming_uniform a=sqrt(5): std "
        "1/sqrt(3 fan_in), 0.41x rms per conv+ReLU) are flagged vanishing (forward) and vanishing (backward) @ '1' "
        "at step 0 with 'multiply each layer's weights by its suggested scale (x2.4 for most ...)'; the net trains "
        "to 97% held-out with Adam"),
}


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


@pytest.mark.parametrize("name", [_param(c, SILENT_XFAIL, _slow(c)) for c in HEALTHY])
def test_healthy_run_is_silent(name):
    """A run that trains fine gets no DiagnosticWarning and no finding."""
    r = result(name)
    print(f"\n{name}: held-out {r.metric:.3f}; {len(r.warnings)} warnings; findings: {describe_findings(r, 120)}")
    assert [w.text for w in r.warnings] == []
    assert [f.describe() for f in r.findings] == []


# ------------------------------------------------------------------------------------------------ diverging runs

# Late warnings (recorded against 9458b4c): without optimizer= there is no update ratio, and a flag raised mid-run
# becomes a finding (and a warning) only once raised at finding_steps (3) of the last finding_window (5) steps.
INTIME_XFAIL = {
    "mlp_adam_lr0.3_no_opt_arg": (
        "late: the loss blows up at step 1 (3.06 -> 2.6e15); exploding (forward) and (backward) on '0' ... '24' are "
        "raised from step 1 but warned only at step 3 (lead -2): 'along 13 repeated Linear layers the output rms "
        "changes 7.91x per layer, 6.04e+10x ...'"),
    "gpt2_adamw_lr0.3_no_opt_arg": (
        "late: the loss goes 5.42 -> 6.77 (step 1) -> 15.6 (step 2) -> 19.5 (step 4); attention_entropy of "
        "'transformer.h.0.attn.c_attn' is raised from step 2 but warned at step 4 ('its heads average 0.004 of the "
        "uniform entropy'), attention_logits (1.48e+03) at step 5: lead -3"),
}

# A warning's fix must name the optimisation; these name an init fix as well (recorded against 9458b4c).
CAUSE_XFAIL = {
    "mlp_adam_lr0.3": (
        "wrong cause: the first warning (step 0, large_updates 'lower the learning rate or clip gradients') is "
        "right, but at step 3 (divergence at step 1) '0' (Linear) is exploding (forward) and (backward): 'Fix: "
        "multiply each layer's weights by its suggested scale (x0.349 for this one, x0.145 for most: "
        "torchdiag.apply_suggestions does it) or use torch.nn.init.kaiming_normal_' -- an init fix for weights an "
        "optimizer step at lr 0.3 blew up"),
    "mlp_adam_lr0.3_no_opt_arg": (
        "wrong cause: without optimizer= the only warnings before the collapse are exploding (forward)/(backward) @ "
        "'0' at step 3 with 'Fix: multiply each layer's weights by its suggested scale (x0.349 for this one, x0.145 "
        "for most ...) or use torch.nn.init.kaiming_normal_'; nothing names the learning rate"),
}

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
