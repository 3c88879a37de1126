"""Each example runs as `python examples/X.py`, asserts its own claims, and writes TensorBoard logs."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(name, cwd, *args):
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=180, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "torchdiag report" in done.stdout
    return done


def event_files(logdir: Path) -> list:
    events = list(logdir.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events), list(logdir.rglob("*"))
    return events


@pytest.mark.parametrize("name", ["he2015_depth", "seed_products"])
def test_example_runs_and_holds_its_claims(name, tmp_path):
    logdir = tmp_path / "logs"
    run(name, tmp_path, "--logdir", str(logdir))
    event_files(logdir)
    assert not (tmp_path / "runs").exists()  # everything went under --logdir


def test_glorot_tanh_writes_under_runs_by_default(tmp_path):
    run("glorot_tanh", tmp_path)
    assert {p.name for p in (tmp_path / "runs" / "glorot_tanh").iterdir()} >= {"standard", "normalised"}
    event_files(tmp_path / "runs" / "glorot_tanh")
