"""The process-wide hook pair: on a quiet step (no watch records it) the pre-hook alone, the per-module callbacks
in pairs or not at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod

from torchdiag._capture.globalhooks import GlobalHooks


@pytest.fixture
def calls():
    """A model, a callback pair on its second layer and the capture's pair, every call noted; all removed after."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    seen: list[str] = []
    entry = GlobalHooks.add(model[1], pre=lambda m, a: seen.append("pre"),
                            post=lambda m, a, k, o: seen.append("post"))
    GlobalHooks.set_capture(lambda m, a: seen.append("capture pre"), lambda m, a, o: seen.append("capture post"))
    yield model, seen
    GlobalHooks.clear_capture()
    GlobalHooks.discard(entry)
    assert not GlobalHooks.installed() and not GlobalHooks.quiet and not GlobalHooks.pinned


def _ours() -> set[int]:
    """The ids of torchdiag's process-wide forward hooks."""
    hooks = module_mod._global_forward_hooks.items()
    return {i for i, h in hooks if getattr(h, "__module__", "").startswith("torchdiag")}


def test_a_quiet_step_runs_the_capture_pre_hook_alone(calls):
    model, seen = calls
    model(torch.randn(2, 4))
    # Sequential, Linear, Tanh in, and out in reverse: the capture's hook first, then the module's callback
    assert seen == ["capture pre", "capture pre", "capture post", "capture pre", "pre", "capture post", "post",
                    "capture post"]
    hook_ids = _ours()
    GlobalHooks.set_quiet(True)
    assert not _ours()
    seen.clear()
    model(torch.randn(2, 4))
    assert seen == ["capture pre"] * 3  # nothing of the callbacks, pre or post
    GlobalHooks.set_quiet(False)
    assert _ours() == hook_ids  # back, under the id it had
    seen.clear()
    model(torch.randn(2, 4))
    assert seen.count("pre") == seen.count("post") == 1


def test_callbacks_left_after_the_capture_run_in_pairs_again(calls):
    model, seen = calls
    GlobalHooks.set_quiet(True)
    GlobalHooks.clear_capture()  # (a watch leaving while its signals are still registered)
    seen.clear()
    model(torch.randn(2, 4))
    assert seen == ["pre", "post"]


def test_a_pinned_forward_hook_stays_on_quiet_steps(calls):
    model, seen = calls
    GlobalHooks.pin()
    GlobalHooks.set_quiet(True)
    assert _ours() and not GlobalHooks.quiet
    seen.clear()
    model(torch.randn(2, 4))
    assert seen.count("pre") == seen.count("post") == 1


def test_the_forward_hook_goes_back_to_its_place_among_the_other_global_hooks():
    """A user's process-wide forward hook that replaces an output must run after torchdiag's on every recorded step
    alike: the forward hook goes back after the hooks that stood before it, before the ones registered since."""
    table = module_mod._global_forward_hooks
    first = module_mod.register_module_forward_hook(lambda m, a, o: None)
    GlobalHooks.set_capture(lambda m, a: None, lambda m, a, o: None)
    try:
        (ours,) = _ours()
        after = module_mod.register_module_forward_hook(lambda m, a, o: None)
        GlobalHooks.set_quiet(True)
        later = module_mod.register_module_forward_hook(lambda m, a, o: None)
        assert list(table)[-3:] == [first.id, after.id, later.id]
        GlobalHooks.set_quiet(False)
        assert list(table)[-4:] == [first.id, ours, after.id, later.id]
    finally:
        GlobalHooks.clear_capture()
        for h in (first, after, later):
            h.remove()
    assert not GlobalHooks.installed()
