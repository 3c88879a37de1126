"""Issue #15: a DiagnosticWarning points at the user's line, wherever the step ended."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchdiag


def nan_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


def _diagnostic(caught: list) -> list:
    found = [w for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    assert found, [str(w.message) for w in caught]
    return found


def test_a_warning_of_diag_step_points_at_that_line():
    model, x = nan_net(), torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model) as diag:
            model(x).sum().backward()
            line = _line_after()
            diag.step()
    for w in _diagnostic(caught):
        assert (w.filename, w.lineno) == (__file__, line), (w.filename, w.lineno)


def test_a_warning_of_an_auto_step_points_at_the_forward_that_started_the_next_step():
    model, x = nan_net(), torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model):
            model(x).sum().backward()
            line = _line_after()
            model(x).sum().backward()  # ends step 0 in the forward pre-hook
            n = len(caught)
    assert n and all((w.filename, w.lineno) == (__file__, line) for w in _diagnostic(caught[:n]))


def test_a_warning_of_opt_step_points_at_opt_step():
    model, x = nan_net(), torch.randn(4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, optimizer=opt):
            model(x).sum().backward()
            line = _line_after()
            opt.step()
            n = len(caught)
    assert n and all((w.filename, w.lineno) == (__file__, line) for w in _diagnostic(caught[:n]))


def test_a_filter_on_the_users_module_silences_them():
    model, x = nan_net(), torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=torchdiag.DiagnosticWarning, module=__name__.replace(".", r"\."))
        with torchdiag.watch(model) as diag:
            model(x).sum().backward()
            diag.step()
    assert not [w for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]


def _line_after() -> int:
    """The line after the caller's."""
    import sys

    return sys._getframe(1).f_lineno + 1


@pytest.fixture(autouse=True)
def _no_leftover_watch():
    yield
    from torchdiag._capture import capture

    assert not capture.global_hooks_installed()
