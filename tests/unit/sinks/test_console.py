"""The console's warnings: a first line that says the problem, the layer, the cause and the fix; the evidence below;
counts that count what they say."""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

import torchdiag


def _bad_mlp(depth: int = 10, width: int = 64) -> nn.Sequential:
    """Linear/ReLU pairs at std 0.01: far too small for ReLU (He: sqrt(2/64) = 0.18), so the signal vanishes."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, std=0.01)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


def _warnings(model: nn.Module, steps: int = 2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model) as diag:
            for _ in range(steps):
                model(torch.randn(16, 64)).sum().backward()
                diag.step()
    return [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)], diag


def test_the_first_line_says_problem_layer_cause_and_fix_and_the_evidence_is_below():
    ours, diag = _warnings(_bad_mlp())
    assert ours
    for text in ours:
        first, *below = text.splitlines()
        assert len(first) <= 160, (len(first), first)
        assert first.startswith("torchdiag (step ") and "Fix: " in first and "cause: " in first, first
        assert below, text  # the figures and thresholds moved below
    by_problem = {f.problem for f in diag.findings}
    assert "vanishing" in by_problem
    lead = next(t for t in ours if "vanishing" in t.splitlines()[0])
    first = lead.splitlines()[0]
    finding = next(f for f in diag.findings if f.problem == "vanishing" and f.layer == f.cause)
    assert f"'{finding.layer}' ({finding.module_type})" in first
    assert f"cause: {finding.reason}" in first and finding.reason in ("init", "architecture", "optimisation",
                                                                       "precision")
    fix = finding.message.partition(" Fix: ")[2]
    assert first.split("Fix: ")[1] and fix.startswith(first.split("Fix: ")[1].rstrip("…"))
    # the evidence: the sentence's figures and threshold, the whole fix, below the first line
    rest = "\n".join(lead.splitlines()[1:])
    assert "vanishing_ratio" in rest and fix in rest
    assert "vanishing_ratio" not in first


def test_counts_count_layers_of_the_kind_they_name():
    model = _bad_mlp()
    ours, diag = _warnings(model)
    for text in ours:
        first = text.splitlines()[0]
        m = re.search(r"\((forward|backward)\) at '([^']+)' \((\w+)\) and (\d+) more (\w+) layers", first)
        if m is None:
            continue
        direction, layer, kind, n, kind_again = m.groups()
        assert kind == kind_again
        # independent: the run's findings of that problem, direction and cause, counted by their module's class
        members = [f for f in diag.findings if f.direction == direction and (f.cause or f.layer) == layer
                   and f.problem in first]
        same = [f for f in members if type(model.get_submodule(f.layer)).__name__ == kind and f.layer != layer]
        assert int(n) == len(same), (first, len(same))
        relus = [f for f in members if isinstance(model.get_submodule(f.layer), nn.ReLU)]
        if relus and kind != "ReLU":
            assert f"also {len(relus)} ReLU layers" in text, text
        break
    else:
        raise AssertionError(ours)


def test_the_report_counts_by_kind_too():
    model = _bad_mlp()
    report = torchdiag.check(model, torch.randn(16, 64))
    lines = [line for line in str(report).replace("\n  ", " ").splitlines() if line.startswith("! ")]
    counted = [line for line in lines if re.search(r"\(and \d+ more", line)]
    assert counted, lines
    for line in counted:
        m = re.search(r"\(and (\d+) more Linear layers(?:, (\d+) ReLU)?\)$", line)
        assert m, line
        flagged = [layer for layer in report.flagged if any(f.problem in line for f in layer.findings)]
        n_linear = sum(isinstance(model.get_submodule(x.name), nn.Linear) for x in flagged)
        n_relu = sum(isinstance(model.get_submodule(x.name), nn.ReLU) for x in flagged)
        assert int(m.group(1)) == n_linear - 1 and int(m.group(2) or 0) == n_relu, (line, n_linear, n_relu)
