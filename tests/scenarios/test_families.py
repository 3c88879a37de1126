"""timm and torchvision model families at their library's own init (tests/helpers/families.py).

Healthy: a few training steps (cross-entropy on random labels, ``every=1``) must raise no ``DiagnosticWarning`` and
leave ``diag.findings`` empty; ``torchdiag.check`` on the fresh model must flag nothing. Every family runs AdamW
lr 1e-3 with ``optimizer=`` on smooth images; a subset also runs without ``optimizer=``, with SGD + momentum
(lr 0.01) and on white noise. What warns today is ``xfail(strict=True)`` with what fires where (``KNOWN``): the
suite is green now and an XPASS fails it once the false alarm is fixed.

Broken: two cases whose right answer was decided from first principles before running torchdiag on them.

``python -m tests.scenarios.test_families`` prints the table of what torchdiag concludes on every run here.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.helpers import families as fam

STEPS = 4
BY_NAME = {c.name: c for c in fam.CASES}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- what fails today, and why
KNOWN: dict[tuple[str, str, bool, str], str] = {}  # none today


def _param(case: fam.Family, opt: str, passed: bool, kind: str):
    reason = KNOWN.get((case.name, opt, passed, kind))
    marks = [pytest.mark.xfail(strict=True, reason=f"false alarm today: {reason}")] if reason else []
    ident = f"{case.name}-{opt}-{'optimizer=' if passed else 'no-optimizer'}-{kind}"
    return pytest.param(case, opt, passed, kind, marks=marks, id=ident)


# every family: AdamW, optimizer=, smooth images
RUNS = [(c, "adamw", True, "smooth") for c in fam.HEALTHY]
# a subset in the other combinations (cheap ones, and every family where some combination fires today)
_SUBSET = ["tv_resnet18_zero_init_residual", "timm_resnet18", "timm_regnetx_002", "timm_nf_regnet_b0",
           "timm_efficientnet_b0", "timm_mobilenetv2_050", "timm_vit_tiny", "timm_convnext_atto", "tv_densenet_small",
           "tv_squeezenet1_1"]
for _name in _SUBSET:
    for _combo in (("adamw", False, "smooth"), ("sgd", True, "smooth"), ("adamw", True, "white")):
        if _name == "timm_resnet18" and _combo[1]:
            continue  # the same false alarm as with AdamW on smooth images (see KNOWN): not run twice
        RUNS.append((BY_NAME[_name], *_combo))
for _name in ("timm_mobilenetv2_050", "tv_densenet_small"):
    RUNS.append((BY_NAME[_name], "sgd", False, "white"))
RUNS.append((BY_NAME["timm_nf_resnet26"], "adamw", True, "white"))


@pytest.mark.parametrize("case,optimizer,pass_optimizer,kind", [_param(*r) for r in RUNS])
def test_healthy_family_trains_silently(case, optimizer, pass_optimizer, kind):
    out = fam.train(case, optimizer, pass_optimizer, kind, steps=STEPS)
    assert all(math.isfinite(x) for x in out.losses), out.losses  # the run itself is sane
    assert out.warnings == [], f"false alarm on {case.name} ({case.why}): {out.warnings}"
    assert out.findings == [], f"false alarm on {case.name}: {fam.describe(out.findings)}"


@pytest.mark.parametrize("case", [*fam.HEALTHY, fam.FULL_VGG], ids=lambda c: c.name)
def test_healthy_family_passes_check(case):
    report, msgs = fam.check(case)
    assert [(layer.name, sorted(layer.status)) for layer in report.flagged] == [], f"{case.name} ({case.why})"
    assert msgs == []


# ----------------------------------------------------------------------------- broken, decided from first principles
CONV_X50 = "layer3.0.conv2"


def _conv_x50_reference() -> float:
    """The factor that brings the x50 conv back to timm's own init, from its weights: Kaiming fan_out for ReLU,
    sqrt(2 / (out * k * k)), over its std (fan_in = fan_out for this 3x3 conv, so He's fan_in rule agrees)."""
    torch.manual_seed(0)
    w = fam.resnet26_conv_x50().get_submodule(CONV_X50).weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    return math.sqrt(2.0 / fan_out) / float(w.std())


def test_one_conv_times_50_is_named_alone_with_its_fix():
    ref = _conv_x50_reference()
    assert 1 / 55 < ref < 1 / 45  # the model really has that conv at 50x its init
    case = BY_NAME["timm_resnet26_conv_x50"]
    out = fam.train(case, "adamw", True, "smooth", steps=STEPS, keep_reports=True)
    assert {f.layer for f in out.findings} == {CONV_X50}, fam.describe(out.findings)
    row = out.reports[0][CONV_X50]
    assert row.suggested_scale is not None and abs(math.log(row.suggested_scale / ref)) < math.log(1.25)
    assert out.warnings and all(CONV_X50 in m for m in out.warnings)


def test_one_conv_times_50_is_named_by_check():
    report, _ = fam.check(BY_NAME["timm_resnet26_conv_x50"])
    assert [layer.name for layer in report.flagged] == [CONV_X50]


def test_vgg11_bn_adamw_first_step_blamed_on_the_optimisation():
    case = BY_NAME["tv_vgg11_bn_adamw_lr1e-3"]
    rms: list[float] = []  # classifier.0's output rms at each forward, measured here, not by torchdiag
    real_build = case.build

    def build():
        model = real_build()
        model.classifier[0].register_forward_hook(lambda m, i, o: rms.append(float(o.detach().pow(2).mean().sqrt())))
        return model

    case = fam.Family(case.name, build, case.size, case.why, False, case.lr, case.expect, case.fused)
    out = fam.train(case, "adamw", True, "smooth", steps=2, keep_reports=True)
    # the reference facts: one Adam step breaks it (loss and the first classifier Linear's outputs jump)
    assert out.losses[1] > 5 * out.losses[0], out.losses
    assert rms[1] > 5 * rms[0], rms
    step1 = out.reports[1]
    assert step1["classifier.0"].status, "classifier.0 must be flagged at step 1"
    text = " ".join(f.message for f in step1["classifier.0"].findings).lower()
    assert "learning rate" in text or "warm" in text, text
    assert not any("init" in f.message.lower() and "learning rate" not in f.message.lower()
                   for f in step1["classifier.0"].findings)


# ----------------------------------------------------------------------------- the table
def main(argv: list[str] | None = None) -> None:
    """Print every run of this file with what torchdiag concludes (findings, warnings), then the broken cases."""
    torch.set_num_threads(1)
    out = sys.stdout
    print("| case | optimizer | optimizer= | input | loss first->last | findings (problem @ layer, step, cause:"
          " message) | xfail today |", file=out)
    print("| --- | --- | --- | --- | --- | --- | --- |", file=out)
    broken = [(c, "adamw", True, "smooth") for c in fam.BROKEN]
    for case, opt, passed, kind in [*RUNS, *broken]:
        steps = 2 if "vgg11_bn_adamw" in case.name else STEPS
        res = fam.train(case, opt, passed, kind, steps=steps, keep_reports=True)
        found = fam.describe(res.findings)
        if found == "none" and not case.healthy:  # a flag that is not (yet) a finding
            flags = [f"{layer.name}: {sorted(layer.status)} @{r.step}" for r in res.reports for layer in r.flagged]
            found = "none; per-step flags: " + ("; ".join(flags) or "none")
        known = "yes" if (case.name, opt, passed, kind) in KNOWN or not case.healthy else ""
        print(f"| {case.name} | {opt} | {'yes' if passed else 'no'} | {kind} |"
              f" {res.losses[0]:.3g}->{res.losses[-1]:.3g} | {found} | {known} |", file=out, flush=True)
    for case in [*fam.HEALTHY, fam.FULL_VGG, *fam.BROKEN]:
        report, msgs = fam.check(case)
        flagged = [(layer.name, sorted(layer.status)) for layer in report.flagged]
        print(f"| {case.name} | check() | - | smooth | - | {flagged or 'none'} | |", file=out, flush=True)


if __name__ == "__main__":
    main()
