"""Modules no hook can see (issue #28 item 18): a TorchScript model is said to be unrecordable once, at watch entry,
with what to do; an exported program's module reports no bogus ``_guards_fn`` layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchdiag


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _run(model: nn.Module, steps: int = 2) -> tuple[list[str], torchdiag.Report, list]:
    x = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=1) as diag:
            reports = []
            for _ in range(steps):
                model(x).square().mean().backward()
                reports.append(diag.step())
            final = diag.report()
    said = [str(w.message) for w in caught if "torchdiag" in str(w.message)]
    return said, final, reports


@pytest.mark.parametrize("make", [lambda m: torch.jit.script(m), lambda m: torch.jit.trace(m, torch.randn(8, 16))],
                         ids=["script", "trace"])
def test_watching_a_torchscript_model_says_once_at_entry_that_it_cannot_be_recorded(make):
    said, final, reports = _run(make(_net()))
    assert len(said) == 1  # once, at watch entry: not per step
    assert "TorchScript" in said[0] and "(Sequential)" in said[0]
    assert "watch the eager module and script it after the watch" in said[0].lower()
    assert "torch.compile" in said[0]
    assert reports == [None, None]
    assert final.layers == [] and final.notes == [said[0].removeprefix("torchdiag: ")]
    assert not any("grad enabled" in n for n in final.notes)  # not the misleading advice


def test_a_torchscript_submodule_is_left_out_and_named_and_the_eager_layers_are_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), torch.jit.script(nn.Sequential(nn.ReLU(), nn.Linear(32, 4))))
    said, final, _ = _run(model)
    assert len(said) == 1 and "TorchScript submodule '1' " in said[0]
    assert [r.name for r in final.layers] == ["0"]
    assert not any("never called" in n for n in final.notes)


def test_an_exported_programs_module_reports_no_guards_fn_layer_and_says_what_cannot_be_recorded():
    net = _net()
    module = torch.export.export(net, (torch.randn(8, 16),)).module()
    said, final, reports = _run(module)
    assert not any(r.name == "_guards_fn" for rep in reports if rep is not None for r in rep.layers)
    assert all(r.name != "_guards_fn" for r in final.layers)
    assert len(said) == 1 and "'0', '2'" in said[0] and "torch.export.unflatten" in said[0]
    assert final.layers == [] and "grad enabled" not in " ".join(final.notes)


def test_an_unflattened_exported_program_is_recorded_layer_by_layer():
    net = _net()
    module = torch.export.unflatten(torch.export.export(net, (torch.randn(8, 16),)))
    said, final, _ = _run(module)
    assert said == []
    assert [r.name for r in final.layers] == ["0", "1", "2"]
