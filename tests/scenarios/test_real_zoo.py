"""Real architectures (tests/helpers/real_zoo.py): healthy ones are silent, broken ones are flagged right.

Every model is a third-party architecture (Hugging Face ``transformers``, or plain torch for the
classic broken recipes) at its library's own init, built from a small config; see each case's ``why``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import real_zoo

HEALTHY = [c for c in real_zoo.CASES if c.healthy]
BROKEN = [c for c in real_zoo.CASES if not c.healthy]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pass_optimizer", [True, False], ids=["optimizer=", "no-optimizer"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("case", HEALTHY, ids=lambda c: c.name)
def test_healthy_real_models_raise_no_warning(case, optimizer, pass_optimizer):
    out = real_zoo.run(case, optimizer, steps=3, pass_optimizer=pass_optimizer)
    assert out["fired"] == {}, f"false alarm on {case.name} ({case.why}): {out['fired']}"
    assert out["warnings"] == [], f"false alarm on {case.name} ({case.why})"


@pytest.mark.parametrize("case", HEALTHY, ids=lambda c: c.name)
def test_healthy_real_models_pass_check(case):
    report = real_zoo.check_case(case)
    assert [(layer.name, sorted(layer.status)) for layer in report.flagged] == [], f"{case.name} ({case.why})"


@pytest.mark.parametrize("pass_optimizer", [True, False], ids=["optimizer=", "no-optimizer"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.name)
def test_broken_real_models_are_flagged_on_the_first_bad_layer(case, optimizer, pass_optimizer):
    if "large_updates" in case.expect and not pass_optimizer:
        pytest.skip("update ratios are measured only with watch(..., optimizer=)")
    out = real_zoo.run(case, optimizer, steps=3, pass_optimizer=pass_optimizer)
    assert real_zoo.verdict(case, optimizer, out["fired"]) is None, f"{case.name} ({case.why}): {out['fired']}"
    assert out["warnings"], "a broken model must warn on the console"


def test_a_deep_pre_norm_lm_trained_for_a_while_stays_silent():
    # depth and training grow the residual stream that RMSNorm divides by: the zoo's 3 steps at 4 layers miss it
    out = real_zoo.run(real_zoo.DEEP_LLAMA, "adamw", steps=20)
    assert out["fired"] == {} and out["warnings"] == []


@pytest.mark.parametrize("case", [c for c in HEALTHY if c.autocast is None], ids=lambda c: c.name)
def test_healthy_real_models_under_bf16_autocast_raise_no_warning(case):
    # bfloat16 has float32's range: no precision flag, and the other rules read its coarser figures the same way
    _runs_unwatched(case, torch.bfloat16)
    out = real_zoo.run(dataclasses.replace(case, autocast=torch.bfloat16), "adamw", steps=3)
    assert out["fired"] == {}, f"false alarm on {case.name} under bf16 autocast ({case.why}): {out['fired']}"
    assert out["warnings"] == []
    assert all(layer.precision is None for layer in out["report"].layers)


@pytest.mark.parametrize("case", [c for c in HEALTHY if c.autocast is None], ids=lambda c: c.name)
def test_healthy_real_models_under_fp16_autocast_with_a_gradscaler_raise_no_warning(case):
    # the float16 recipe: its scaled gradients in range, its overflowing first steps the scaler's own business
    _runs_unwatched(case, torch.float16)
    out = real_zoo.run(dataclasses.replace(case, autocast=torch.float16), "adamw", steps=3, scaler=True)
    assert out["fired"] == {}, f"false alarm on {case.name} under fp16 + GradScaler ({case.why}): {out['fired']}"
    assert out["warnings"] == []


def _runs_unwatched(case: real_zoo.Case, dtype: torch.dtype) -> None:
    """Skip where this CPU's kernels cannot run the model under autocast in ``dtype`` at all, watched or not (CPU
    bfloat16 attention needs AVX-512: "pack_vnni2 is only supported when avx512 is supported")."""
    torch.manual_seed(0)
    model = case.build()
    inputs, labels = case.data(torch.Generator().manual_seed(1))
    try:
        with torch.autocast("cpu", dtype=dtype):
            case.loss(model(*inputs), labels).backward()
    except RuntimeError as e:
        pytest.skip(f"{case.name} does not run under {dtype} autocast on this CPU: {str(e)[:120]}")
