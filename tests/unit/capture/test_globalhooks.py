"""The process-wide hook pair: on a quiet step (no watch records it) the pre-hook alone, the per-module callbacks
in pairs or not at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod

from tests.helpers.recording import hook_ids
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


def _ours(table: dict | None = None) -> set[int]:
    """The ids of torchdiag's hooks in one of PyTorch's process-wide hook tables (the forward hooks by default)."""
    return hook_ids(module_mod._global_forward_hooks if table is None else table)


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


def _ours_pre() -> set[int]:
    return _ours(module_mod._global_forward_pre_hooks)


def test_a_silent_step_runs_no_hook_and_both_go_back_to_their_places(no_compiled_graphs):
    """No watch ends a step at its root's forward: a quiet step is silent, with neither hook on. The next recorded
    step gets both back under their ids, each after the user's hooks that stood before it."""
    table = module_mod._global_forward_pre_hooks
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    seen: list[str] = []
    first = module_mod.register_module_forward_pre_hook(lambda m, a: None)
    GlobalHooks.set_capture(lambda m, a: seen.append("capture pre"), lambda m, a, o: seen.append("capture post"))
    try:
        (pre_id,), post_ids = _ours_pre(), _ours()
        after = module_mod.register_module_forward_pre_hook(lambda m, a: None)
        GlobalHooks.set_quiet(True, silent=True)
        assert GlobalHooks.silent and not _ours_pre() and not _ours() and GlobalHooks.installed()
        model(torch.randn(2, 4))
        assert seen == []
        later = module_mod.register_module_forward_pre_hook(lambda m, a: None)
        GlobalHooks.set_quiet(False)
        assert list(table)[-4:] == [first.id, pre_id, after.id, later.id] and _ours() == post_ids
        model(torch.randn(2, 4))
        assert seen.count("capture pre") == seen.count("capture post") == 3
    finally:
        GlobalHooks.clear_capture()
        for h in (first, after, later):
            h.remove()
    assert not GlobalHooks.installed() and not GlobalHooks.silent


def test_a_compile_on_a_silent_step_puts_the_pre_hook_back_for_good(no_compiled_graphs):
    """A graph Dynamo traces with no hook at all has no guard on the step being recorded, and would run unrecorded on
    recorded steps: a compile that starts on a silent step puts the pre-hook back before it traces, and from then
    on quiet steps keep it."""
    dynamo = pytest.importorskip("torch._dynamo")
    if not hasattr(getattr(dynamo, "callback", None), "callback_handler"):
        pytest.skip("this PyTorch has no compile-start callbacks: the pre-hook is never taken off")
    pres: list[int] = []
    GlobalHooks.set_capture(lambda m, a: pres.append(1), lambda m, a, o: None)
    try:
        GlobalHooks.set_quiet(True, silent=True)
        dynamo.reset()  # (torch.compiler.reset() between two steps clears Dynamo's callbacks: the next step's again)
        GlobalHooks.set_quiet(True, silent=True)
        assert not _ours_pre()
        torch.compile(nn.Linear(4, 4), backend="eager")(torch.randn(2, 4))
        assert _ours_pre() and GlobalHooks.traced and not GlobalHooks.silent
        GlobalHooks.set_quiet(True, silent=True)
        assert _ours_pre() and not _ours()  # quiet (the forward hook off), not silent
        GlobalHooks.clear_capture()  # the watch ends: the graph traced with the pre-hook stays in Dynamo's cache
        assert GlobalHooks._compile_callback is None and GlobalHooks.traced
        GlobalHooks.set_capture(lambda m, a: pres.append(1), lambda m, a, o: None)  # the next watch
        GlobalHooks.set_quiet(True, silent=True)
        assert _ours_pre() and not GlobalHooks.silent  # so the pre-hook stays on there
        dynamo.reset()  # (torch.compiler.reset(): the graph is gone)
        GlobalHooks.set_quiet(True, silent=True)
        assert not _ours_pre() and GlobalHooks.silent and not GlobalHooks.traced
    finally:
        GlobalHooks.clear_capture()
        dynamo.reset()
    assert not GlobalHooks.installed() and GlobalHooks._compile_callback is None


@pytest.mark.parametrize("args", [(), ("args",)], ids=["older-pytorch-no-argument", "callback-args"])
def test_the_compile_start_callback_takes_what_each_pytorch_passes(args, no_compiled_graphs):
    """Dynamo's compile-start callbacks get a CallbackArgs, or nothing in older PyTorch: either puts the pre-hook of
    a silent step back (a TypeError there would raise from the user's compiled call)."""
    pytest.importorskip("torch._dynamo")
    from torchdiag._capture.globalhooks import _compile_started

    GlobalHooks.set_capture(lambda m, a: None, lambda m, a, o: None)
    try:
        GlobalHooks.set_quiet(True, silent=True)
        if not GlobalHooks.silent:
            pytest.skip("this PyTorch has no compile-start callbacks: the pre-hook is never taken off")
        _compile_started(*args)
        assert _ours_pre() and GlobalHooks.traced and not GlobalHooks.silent
    finally:
        GlobalHooks.clear_capture()


def test_a_forward_that_raises_after_a_quiet_step_began_inside_it_raises_the_users_error():
    """PyTorch calls the always-called forward hooks of a forward that raised while it iterates its hook table: the
    forward hook must not come off there (a user's hook after it would make PyTorch raise "mutated during
    iteration" instead of the user's error); the next step takes it off."""

    class Boom(nn.Module):
        def forward(self, x):
            GlobalHooks.set_quiet(True)  # a step ended inside the forward (a step() or opt.step() called in it)
            raise ValueError("the user's own error")

    model = Boom()
    entry = GlobalHooks.add(model, pre=lambda m, a: None, post=lambda m, a, k, o: None)
    GlobalHooks.set_capture(lambda m, a: None, lambda m, a, o: None)
    user = module_mod.register_module_forward_hook(lambda m, a, o: None)  # a user's own, after torchdiag's
    try:
        with pytest.raises(ValueError, match="the user's own error"):
            model(torch.randn(2))
        assert _ours()  # still on: taken off at the next step
        GlobalHooks.set_quiet(True)
        assert not _ours()
    finally:
        GlobalHooks.clear_capture()
        GlobalHooks.discard(entry)
        user.remove()
