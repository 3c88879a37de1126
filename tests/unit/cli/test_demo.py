"""The main job runs from the command line, as the README says, and tells the same story on any CPU."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_demo_runs_and_fixes_the_model(tmp_path, isa):
    env = dict(os.environ)
    if isa == "avx2":  # the verdict must not depend on the instruction set's rounding
        env.update(MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-m", "torchdiag", "demo", "--logdir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    first, second = out.stdout.split("2) apply the suggested scales")
    assert "vanishing (forward) from step 0" in first  # the Xavier run's finding, from its first step
    assert "run verdict: no findings" in second  # the fixed run: nothing at any recorded step
    assert any((tmp_path / "runs" / "xavier").iterdir()) and any((tmp_path / "runs" / "fixed").iterdir())
    # summarize judges the logdir's runs as the demo did: the Xavier run failed, the fixed one did not
    for run, code, verdict in (("xavier", 1, "FAIL: vanishing found in the run"),
                               ("fixed", 0, "OK: nothing found in the run")):
        done = subprocess.run([sys.executable, "-m", "torchdiag", "summarize", str(tmp_path / "runs" / run)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == code and verdict in done.stdout, done.stdout[-2000:] + done.stderr



def test_the_demo_tells_a_runs_verdict_once():
    """The demo's report of a run whose findings recovered by the last step (the Xavier run at 60 steps): the
    run's findings are told once, on the verdict line after the table, not also as the report's "run:" block."""
    import torch
    from torch import nn

    import torchdiag
    from torchdiag._diagnose.verdict import RunFinding
    from torchdiag.cli.demo import _short, _verdict

    report = torchdiag.check(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(16, 8))
    assert not report.flagged
    found = [RunFinding("0", "Linear", 0, "vanishing", d, 0, 3, 4, True, "...", cause="0", reason="init")
             for d in ("forward", "backward")]
    report.run_findings = found
    text = _short(report) + "\n" + _verdict(found)
    assert text.count("problem(s) on 1 layer(s) during the run") == 1, text
    assert text.count("vanishing (forward) from step 0") == 1 and text.count("run verdict: ") == 1, text
    assert not any(line.startswith("run: ") for line in text.splitlines())
    assert f"no problems at step {report.step}" in text and "above" not in text and "no problems found" not in text
    assert report.run_findings is found  # the report itself is left as it was
