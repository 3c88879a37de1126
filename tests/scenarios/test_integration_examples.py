"""The quick-start, CNN, Lightning and Hugging Face examples run as `python examples/X.py --logdir DIR`.

Each example asserts its own claims; here each must exit 0, print a report and leave TensorBoard events
under --logdir that torchdiag's own reader (``summarize``) understands, and nothing under ./runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchdiag import Config
from torchdiag.cli._summarize import find_runs, summarize_run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# the example as a script, after making torchvision (which Lightning and transformers import when it is installed)
# importable beside the CPU torch, as the test process does (tests/helpers/thirdparty.py)
_LAUNCH = ("import runpy, sys; from tests.helpers.thirdparty import import_torchvision; import_torchvision();"
           " sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_example(name: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    logdir = tmp_path / "logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", _LAUNCH, str(EXAMPLES / f"{name}.py"), "--logdir", str(logdir)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "torchdiag report" in done.stdout
    assert "\033[" not in done.stdout
    assert not (tmp_path / "runs").exists()  # everything went under --logdir
    return done, logdir


def recorded_steps(logdir: Path) -> dict[str, list[int]]:
    """{run (relative to logdir): its recorded torchdiag steps}, read back from the event files."""
    return {os.path.relpath(run, logdir): summarize_run(run).steps for run in find_runs(str(logdir))}


def budgeted(steps: list[int], total: int) -> bool:
    """The default time budget's steps of a ``total``-step run: the first ``record_first`` in full, then some of the
    rest (how many depends on what a step costs on this machine)."""
    first = Config.defaults().record_first
    return steps[:first] == list(range(first)) and set(steps) <= set(range(total))


def test_quickstart(tmp_path):
    done, logdir = run_example("quickstart", tmp_path)
    steps = recorded_steps(logdir)
    assert list(steps) == ["kaiming"] and budgeted(steps["kaiming"], 40)
    assert "vanishing" in done.stdout
    assert "\nrecorded: " in done.stdout  # the report says which steps it records, and why


def test_cnn_batchnorm(tmp_path):
    done, logdir = run_example("cnn_batchnorm", tmp_path)
    steps = recorded_steps(logdir)
    assert list(steps) == ["."] and budgeted(steps["."], 30)
    assert "BatchNorm2d" in done.stdout and "validation accuracy" in done.stdout


def test_lightning_callback(tmp_path):
    pytest.importorskip("lightning.pytorch", reason="pip install lightning")
    done, logdir = run_example("lightning_callback", tmp_path)
    steps = recorded_steps(logdir)
    assert sorted(steps) == [os.path.join("kaiming", "version_0"), os.path.join("small", "version_0")]
    assert all(budgeted(s, 16) for s in steps.values())
    assert "FAIL: vanishing found at step 0" in done.stdout


def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers", reason="pip install transformers accelerate")
    pytest.importorskip("accelerate", reason="pip install transformers accelerate")
    done, logdir = run_example("hf_trainer", tmp_path)
    steps = recorded_steps(logdir)
    assert list(steps) == ["."] and budgeted(steps["."], 8)
    assert "8 optimizer steps (2 micro-batches each), 8 torchdiag steps" in done.stdout
