"""What the console shows: one story per problem and cause, names that still tell layers apart."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import torchdiag
from tests.helpers.thirdparty import import_torchvision
from torchdiag._checks.check_table import ShapeRecorder, render_check
from torchdiag._report.report import common_prefix, elide_name, render


def test_the_common_prefix_goes_first_and_block_indices_are_never_dropped():
    names = [f"transformer.h.{i}.attn.resid_dropout" for i in range(12)] + ["transformer.ln_f"]
    assert common_prefix(names) == "transformer."
    short = [elide_name(n[len("transformer."):], 14) for n in names[:12]]
    assert len(set(short)) == 12  # rows 6 and 15 of GPT-2 no longer read the same
    assert all(f".{i}." in s or s.startswith(f"h.{i}") for i, s in enumerate(short)), short
    cut = elide_name("encoder.layers.3.self_attn.out_proj", 26)
    assert len(cut) <= 26 and ".3." in cut and cut.endswith("out_proj")


def test_a_sigmoid_stack_tells_one_story_on_the_console():
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(64, 64), nn.Sigmoid())], nn.Linear(64, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model) as diag:
            for _ in range(3):
                model(torch.randn(16, 64)).sum().backward()
                diag.step()
    ours = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    # one warning per problem and cause: backward vanishing, caused by the first Linear, covering the others
    assert len(ours) == 1, ours
    assert "'0' (Linear)" in ours[0] and "vanishing (backward)" in ours[0] and "more Linear layers" in ours[0]
    text = render(diag.report())
    sentences = [line for line in text.splitlines() if line.startswith("! ")]
    assert len(sentences) == 1  # the table's findings: the same one story, not one line per layer
    assert "no problems found" not in text


def test_report_before_any_recorded_step_says_so():
    model = nn.Sequential(nn.Linear(4, 4))
    with torchdiag.watch(model) as diag:
        text = str(diag.report())
    assert "no problems found" not in text and "no step was recorded" in text


def _gpt2_and_input():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config), torch.randint(0, 64, (2, 12))


def _resnet_and_input():
    import_torchvision()
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("build", [_gpt2_and_input, _resnet_and_input], ids=["gpt2-4-blocks", "timm-resnet18"])
def test_shortened_names_stay_distinct_and_keep_their_block_indices(build):
    model, x = build()
    with ShapeRecorder(model) as rec:
        report = torchdiag.check(model, x)
    names = [layer.name for layer in report.layers]
    for text in (render(report, width=100), render_check(report, model, rec.shapes, width=100)):
        lines = text.splitlines()
        rows = [next(line for line in lines if line.split()[:1] == [str(layer.index)]) for layer in report.layers]
        shown = [row.split()[1] for row in rows]
        assert len(set(shown)) == len(shown), [s for s in shown if shown.count(s) > 1]
        for name, cell in zip(names, shown):
            # every number of the qualified name (h.3, layer2.1, conv2), in order: what tells blocks apart
            assert re.findall(r"\d+", cell) == re.findall(r"\d+", name), (cell, name)
            assert name.endswith(cell.split("…")[-1].lstrip(".")), (cell, name)
        assert all(len(line) <= 100 for line in lines[1:])
