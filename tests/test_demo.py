"""The main job runs from the command line, as the README says."""

import subprocess
import sys


def test_demo_runs_and_fixes_the_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torchdiag", "demo", "--logdir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vanishing" in out.stdout
    assert "no problems found" in out.stdout
    assert "warnings: 0" in out.stdout
    assert any((tmp_path / "runs" / "xavier").iterdir()) and any((tmp_path / "runs" / "fixed").iterdir())
