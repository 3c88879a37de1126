"""``torchdiag demo``: a deep MLP with a bad init is flagged, fixed with the suggested gains, and trains."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._checks.fix import apply_suggestions
from .._report.render import render, run_lines, use_color
from ..watch import watch


def make_data(n: int = 4096, dim: int = 64, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: ``classes`` random centres in ``dim`` dimensions, unit noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g)
    return x, y


def make_model(depth: int = 24, width: int = 256, dim: int = 64, classes: int = 10, seed: int = 0) -> nn.Sequential:
    """A deep ReLU MLP with Xavier-normal init: the classic vanishing case (He et al. 2015)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = dim
    for _ in range(depth):
        lin = nn.Linear(fan_in, width)
        nn.init.xavier_normal_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        fan_in = width
    head = nn.Linear(width, classes)
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logdir: str, steps: int, lr: float = 1e-3,
          batch: int = 128):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    losses = []
    with watch(model, logdir=logdir) as diag:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            diag.step()
            losses.append(loss.item())
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    return diag.report(), diag.findings, losses, acc


def _train_and_tell(model, x, y, logdir: Path, steps: int, gap: str) -> list:
    """Train one run with every warning shown as it comes (category and message), then its loss, accuracy, short
    report and verdict; returns the run's findings."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.formatwarning = lambda msg, cat, *a, **k: f"{cat.__name__}: {msg}\n"
        report, found, losses, acc = train(model, x, y, str(logdir), steps)
    print(f"{gap}   loss {losses[0]:.3f} -> {losses[-1]:.3f}, accuracy {acc:.1%}\n")
    print(_short(report))
    print(_verdict(found))
    return found


def run(logdir: str = "runs/demo", steps: int = 60) -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = make_data()
    print("torchdiag demo: a 24-layer ReLU MLP with Xavier init, on generated data (Gaussian blobs, 10 classes)\n")

    model = make_model()
    print("1) train it with torchdiag watching. Warnings appear as soon as the first step is recorded:\n")
    found = _train_and_tell(model, x, y, Path(logdir) / "xavier", steps, gap="\n")

    print("\n2) apply the suggested scales (torchdiag.apply_suggestions) to a fresh copy of the same init,"
          " and train again:\n")
    fixed = make_model()
    first = __import__("torchdiag").check(fixed, x[:256])
    applied = apply_suggestions(fixed, first)
    scales = sorted(applied.values())
    print(f"   rescaled {len(applied)} layers by factors {scales[0]:.3g} .. {scales[-1]:.3g}"
          f" (sqrt(2) = {2 ** 0.5:.3g} is the Xavier -> Kaiming factor for a square ReLU layer)\n")
    found2 = _train_and_tell(fixed, x, y, Path(logdir) / "fixed", steps, gap="")
    print(f"\nTensorBoard logs are in {logdir}/ (runs 'xavier' and 'fixed'). Open them with:\n"
          f"   tensorboard --logdir {logdir}\n")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    # the story, judged on each run's findings (not on whichever step came last): the Xavier net is flagged at
    # its first recorded step, the fixed one never
    caught = any(f.first_step == 0 for f in found)
    return 0 if caught and not found2 else 1


def _verdict(found) -> str:
    if not found:
        return "run verdict: no findings (nothing was wrong at any recorded step)"
    return "run verdict: " + run_lines(found)


def _short(report, keep: int = 8) -> str:
    """The report table, with the middle rows of a long net elided; the run's findings are left to the verdict
    printed after it (``_verdict``), so that they are told once."""
    findings = report.run_findings
    report.run_findings = []
    try:
        lines = render(report, color=use_color(sys.stdout)).splitlines()
    finally:
        report.run_findings = findings
    if findings and lines and lines[-1].endswith("no problems found"):  # at this step; the run's verdict follows
        lines[-1] = lines[-1].replace("no problems found", f"no problems at step {report.step}")
    head, table = lines[:2], lines[2:]
    n_layers = len(report.layers)
    body, tail = table[:n_layers], table[n_layers:]
    if len(body) > 2 * keep:
        body = body[:keep] + [f"   ... {len(body) - 2 * keep} more layers ..."] + body[-keep:]
    if len(tail) > 6:
        tail = tail[:6] + [f"   ... {len(tail) - 6} more lines"]
    return "\n".join(head + body + tail)
