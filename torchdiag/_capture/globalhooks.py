"""torchdiag's one pair of process-wide module hooks: a forward pre-hook and a forward hook, installed while anything
of torchdiag's needs them (a watch's capture, the signals, the NaN tripwire) and removed after. The capture's hooks
(``_registry``) are called first, then the callbacks kept here per module in weak tables.

On a step no watch records (``quiet``) only the pre-hook stays: it sees the root's forward, which ends a step. The
forward hook, which PyTorch calls with the kwargs and also when a forward raises, costs every module call more
than the pre-hook; it is put back when a recorded step begins, under the id it had (``stable_id``) and at its place
among the other process-wide forward hooks. Where no watch ends its steps at the root's forward (each calls
``step()`` or steps at ``opt.step()``), Dynamo can say when it starts a compile and has not during a watch (since
its last reset), the pre-hook comes off too (``silent``): such a step runs PyTorch's own call path, with no hook at
all (a compile that starts then puts the pre-hook back for good: ``compiling``). The callbacks kept here run on
recorded steps only, and in pairs: a module call's post-callbacks run where its pre-callbacks ran (``_Open``), and
the forward hook comes off only once no such call is open (a watched model run inside another's forward can end a
step there)."""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from .runtime import is_compiling, tracing

# the id each of torchdiag's process-wide hooks had when first registered, by name
_IDS: dict[str, int] = {}
# held while the hooks' state changes (re-entered: one change calls another): Dynamo's compile-start callback
# (``GlobalHooks.compiling``) runs on whichever thread compiles
_LOCK = threading.RLock()
# PyTorch's process-wide tables of each of torchdiag's hooks
_TABLES: dict[str, dict[int, Any]] = {"pre": _nn_module._global_forward_pre_hooks,
                                      "post": _nn_module._global_forward_hooks}


def stable_id(name: str, handle: Any) -> Any:
    """``handle`` (a process-wide module hook just registered) moved back to the id the same hook had when it was
    first registered. Dynamo guards on the ids of the global hooks, so a hook registered again by a later watch
    under a new id would make every compiled model recompile at each watch, until its recompile limit leaves it
    running eagerly for the rest of the process."""
    old = _IDS.setdefault(name, handle.id)
    new = handle.id
    tables: tuple[dict[int, Any], ...] = (_nn_module._global_forward_pre_hooks, _nn_module._global_forward_hooks,
              _nn_module._global_forward_hooks_with_kwargs, _nn_module._global_forward_hooks_always_called)
    if old == new or old in _nn_module._global_forward_pre_hooks or old in _nn_module._global_forward_hooks:
        return handle  # (the old id still in use: the new one stays)
    for t in tables:
        t.pop(old, None)  # (a with_kwargs flag that ``remove()`` leaves behind)
        if new in t:
            t[old] = t.pop(new)
    handle.id = old
    return handle


class GlobalHooks:
    """Module hooks kept out of the model: the two process-wide hooks look each module up here, so that a watched
    model still pickles, deep-copies (a copy is not recorded) and saves without torchdiag's callbacks in it.
    ``torch.compile`` traces past the per-module callbacks (they return at once while compiling); the capture's
    own pair (``capture``, set by ``_registry`` while a module is watched) takes the compiled path itself."""

    pre: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> [fn(module, args)]
    post: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> [fn(module, args, kwargs, output)]
    pre_handle: Any = None
    post_handle: Any = None
    ids: set[int] = set()  # id() of the modules in either table: every other module call returns at once
    # the registry's (pre(module, args), post(module, args, output) -> replacement output or None), while any module
    # is watched
    capture: tuple[Callable[..., None], Callable[..., Any]] | None = None
    # no watch records the step in progress: the callbacks do not run, and the forward hook is off (``set_quiet``)
    quiet = False
    # a quiet step on which the pre-hook is off too: no watch ends a step at its root's forward (``set_quiet``)
    silent = False
    # a watched model ran through torch.compile(model)'s wrapper: the forward hook stays on at every step (it sees
    # the wrapper's exit), until the hooks are removed
    pinned = False
    # Dynamo started a compile while a watch was open (its compile-start callback): the pre-hook stays on at every
    # step, in this watch and the later ones, until a watch finds Dynamo reset (``_watch_compiles``). A graph traced
    # through it guards on what it read (whether the step is recorded) and is traced again when that changes; one
    # traced with no hook at all has no such guard and would run on recorded steps unrecorded. (Taken off in a later
    # watch, the pre-hook would fail the guards of the graphs traced with it: one more graph per watch, up to
    # Dynamo's recompile limit.)
    traced = False
    active = False  # the hooks are wanted (``installed``), whichever of them a quiet step leaves on
    # the process-wide hooks that stood before torchdiag's when it came off, by "pre"/"post": it goes back after them
    _before: dict[str, frozenset[int]] = {}
    _compile_callback: Any = None  # Dynamo's compile-start callback, registered while the hooks are wanted

    @classmethod
    def _install(cls) -> None:
        """Put on what the step in progress has on (both hooks, the pre-hook alone on a quiet step, neither on a
        silent one) and is not installed."""
        with _LOCK:
            cls.active = True
            if cls.pre_handle is None and not cls.silent:
                cls._put_on("pre", lambda: _nn_module.register_module_forward_pre_hook(_global_pre))
            if cls.post_handle is None and not cls.quiet:
                cls._put_on("post", lambda: _nn_module.register_module_forward_hook(
                    _global_post, with_kwargs=True, always_call=True))

    @classmethod
    def _put_on(cls, which: str, register: Callable[[], Any]) -> None:
        """Register the pre-hook or the forward hook (``which``: "pre" or "post") under the id it first had and at
        the place it had when it came off (``_take_off``)."""
        handle = stable_id("torchdiag." + which, register())
        setattr(cls, which + "_handle", handle)
        _put_back(_TABLES[which], handle.id, cls._before.pop(which, None))

    @classmethod
    def _take_off(cls, which: str) -> None:
        """Remove the pre-hook or the forward hook (``which``: "pre" or "post"), noting its place."""
        name = which + "_handle"
        with _LOCK:
            handle = getattr(cls, name)
            if handle is not None:
                setattr(cls, name, None)
                cls._before[which] = frozenset(itertools.takewhile(lambda k: k != handle.id, _TABLES[which]))
                handle.remove()

    @classmethod
    def _release(cls) -> None:
        with _LOCK:
            if cls.pre or cls.post or cls.capture is not None:
                return
            cls.quiet = cls.silent = cls.pinned = cls.active = False  # (``traced`` stays: Dynamo's graphs do)
            _Open.calls().clear()
            _watch_compiles(False)
            cls._take_off("post")
            cls._take_off("pre")
            cls._before = {}

    @classmethod
    def set_capture(cls, pre: Callable[..., None], post: Callable[..., Any]) -> None:
        cls.capture = (pre, post)
        cls._install()

    @classmethod
    def clear_capture(cls) -> None:
        cls.capture = None
        cls.set_quiet(False)  # (callbacks still kept run at every forward again, and their forward hook)
        cls._release()

    @classmethod
    def set_quiet(cls, quiet: bool, silent: bool = False) -> None:
        """No watch records the step that begins (``quiet``): the callbacks stop and the forward hook comes off
        (once no module call whose callbacks ran is open) until a watch records again. Never once a watched model
        ran through torch.compile(model)'s wrapper (``pin``). ``silent``: no watch needs to see its root's forward
        either (none ends its steps there): the pre-hook comes off too, unless Dynamo has started a compile during a
        watch since its last reset (``traced``) or cannot say when it does (``_watch_compiles``)."""
        with _LOCK:
            cls.quiet = quiet = quiet and not cls.pinned and cls.capture is not None
            # (first ``_watch_compiles``: a Dynamo reset it finds clears ``traced``)
            cls.silent = silent = quiet and silent and _watch_compiles(True) and not cls.traced
            off = not cls.active
            if (cls.pre_handle is None) is (silent or off) and (cls.post_handle is None) is (quiet or off):
                return  # (each hook already as this step wants it: the step after a step alike)
            if quiet and not _Open.calls():  # (else at the end of the last open call: ``_global_post``)
                cls._take_off("post")
            if silent:
                cls._take_off("pre")
            if cls.active:
                cls._install()

    @classmethod
    def pin(cls) -> None:
        """Keep the forward hook on at every step from now on."""
        if not cls.pinned:
            cls.pinned = True
            cls.set_quiet(False)

    @classmethod
    def installed(cls) -> bool:
        """Whether torchdiag's hooks are wanted (a silent step has neither installed: ``set_quiet``)."""
        return cls.active

    @classmethod
    def compiling(cls) -> None:
        """Dynamo starts to compile (its compile-start callback, registered while the hooks are wanted): from now on
        the pre-hook stays on, and it is put back at once if this step is silent, so that the graph traced now
        reads it. (Called on whichever thread compiles.)"""
        with _LOCK:
            cls.traced = True
            if cls.silent:
                cls.silent = False
                cls._install()

    @classmethod
    def add(cls, module: nn.Module, pre: Callable[..., None] | None = None,
            post: Callable[..., None] | None = None) -> tuple[nn.Module, Any, Any]:
        if pre is not None:
            cls.pre.setdefault(module, []).append(pre)
        if post is not None:
            cls.post.setdefault(module, []).append(post)
        cls.ids.add(id(module))
        cls._install()
        return module, pre, post

    @classmethod
    def discard(cls, entry: tuple[nn.Module, Any, Any]) -> None:
        module, pre, post = entry
        for table, fn in ((cls.pre, pre), (cls.post, post)):
            fns = table.get(module)
            if fns is not None and fn in fns:
                fns.remove(fn)
                if not fns:
                    del table[module]
        if module not in cls.pre and module not in cls.post:
            cls.ids.discard(id(module))
        if not cls.pre and not cls.post:
            cls.ids.clear()  # (ids of modules dropped without a discard)
            cls._release()


def _global_pre(module: nn.Module, args: tuple) -> None:
    capture = GlobalHooks.capture
    if capture is not None:
        capture[0](module, args)  # (the root's: may end the step, and so start or end a quiet one)
        if GlobalHooks.quiet:
            return
    # torch.compile, torch.export, torch.jit.trace: nothing of the callbacks' in their graphs (Dynamo: before any
    # lookup, which it would guard on)
    if is_compiling() or id(module) not in GlobalHooks.ids or tracing():
        return
    _Open.calls().append(id(module))  # (its post-callbacks run, whatever the step is by then)
    fns = GlobalHooks.pre.get(module)
    if fns:
        for fn in list(fns):
            _guarded(fn, module, args)


def _global_post(module: nn.Module, args: tuple, *rest: Any) -> Any:
    """``(module, args, kwargs, output)`` after a forward; ``(module, args, None)`` when the forward raised
    (PyTorch calls an ``always_call`` hook so, without kwargs): then the callbacks run, to undo what their pre-hook
    entered (an attention stack), and the capture only to leave a compiled model's wrapper."""
    raised = len(rest) != 2
    kwargs, output = (None, None) if raised else rest
    result = None
    capture = GlobalHooks.capture
    if capture is not None and (not raised or module.__class__.__name__ == "OptimizedModule"):
        # (torch.compile(model)'s wrapper is left even when its forward raised: the capture unmarks it)
        if not is_compiling() and _function_modes():
            with FunctionModesLeft():
                result = capture[1](module, args, output)
        else:
            result = capture[1](module, args, output)
    if is_compiling() or id(module) not in GlobalHooks.ids or tracing() or not _Open.close(id(module)):
        return result
    fns = GlobalHooks.post.get(module)
    if fns:
        for fn in list(fns):
            _guarded(fn, module, args, kwargs, output)
    if GlobalHooks.quiet and not _Open.calls() and not raised:  # a quiet step began inside this call: the forward
        # hook off now (not on a forward that raised: PyTorch iterates its hooks live there; the next step takes it off)
        GlobalHooks._take_off("post")
    return result


class _Open:
    """The module calls in progress, on this thread, whose pre-callbacks ran (``id(module)``, innermost last)."""

    local = threading.local()

    @classmethod
    def calls(cls) -> list[int]:
        calls = getattr(cls.local, "calls", None)
        if calls is None:
            calls = cls.local.calls = []
        return calls

    @classmethod
    def close(cls, key: int) -> bool:
        """Whether a call of module ``key`` is open (its pre-callbacks ran): then it is closed, with any call left
        open above it (a forward a ``KeyboardInterrupt`` ended: PyTorch calls no forward hook then)."""
        calls = cls.calls()
        for i in range(len(calls) - 1, -1, -1):
            if calls[i] == key:
                del calls[i:]
                return True
        return False


def _watch_compiles(on: bool) -> bool:
    """Have Dynamo tell ``GlobalHooks`` when it starts to compile (``on``), or stop. True where it will: Dynamo is
    loaded (constructing a ``torch.optim`` optimizer loads it) and has compile-start callbacks
    (``torch.compiler.reset()`` clears them: registered again here, at the next step, and as the graphs traced
    with the pre-hook went with them, ``traced`` is cleared). Otherwise the pre-hook stays on: a compile that loads
    Dynamo mid-step would trace the model with no hook and no callback to say so."""
    dynamo = sys.modules.get("torch._dynamo")
    handler = getattr(sys.modules.get("torch._dynamo.callback"), "callback_handler", None)
    callbacks = getattr(handler, "start_callbacks", None)
    cb = GlobalHooks._compile_callback
    if not on:
        GlobalHooks._compile_callback = None
        if cb is not None and isinstance(callbacks, list) and cb in callbacks:
            callbacks.remove(cb)
        return False
    if dynamo is None:
        return False
    register = getattr(handler, "register_start_callback", None)
    if not isinstance(callbacks, list) or not callable(register):
        return False
    if cb is not None and cb not in callbacks:  # Dynamo was reset (torch.compiler.reset()): no graph of it is left
        GlobalHooks.traced = False
    if cb is None or cb not in callbacks:
        GlobalHooks._compile_callback = register(_compile_started)
    return True


def _compile_started(*args: Any) -> None:
    """Dynamo's compile-start callback (called with its arguments, or with none by older PyTorch)."""
    GlobalHooks.compiling()


def _put_back(table: dict[int, Any], key: int, before: frozenset[int] | None) -> None:
    """Move ``key`` (last in ``table``) to just after the last of the keys ``before`` still there: the place it had
    among the other process-wide hooks, so that a user's hook that replaces an output (or an input) runs after it on
    every recorded step alike. The table is rebuilt in place (PyTorch and Dynamo hold it)."""
    if before is None:
        return
    items = [(k, v) for k, v in table.items() if k != key]
    at = max((i + 1 for i, (k, _) in enumerate(items) if k in before), default=0)
    if at == len(items):
        return
    hook = table[key]
    table.clear()
    table.update([*items[:at], (key, hook), *items[at:]])


_function_modes = torch._C._len_torch_function_stack


class FunctionModesLeft:
    """The torch function modes in effect (the SDPA observer around an attention module's forward, a user's) taken
    off for the length of torchdiag's own work in a hook, and put back in their order: its reads of a module's
    output (its dtype, version, statistics, gradient hook) and its figures are not the modes' to see, and each would
    be a call into Python through every mode. Nothing inside may enter or leave a mode."""

    __slots__ = ("modes",)

    def __enter__(self) -> None:
        self.modes: list[Any] = []
        try:
            while _function_modes():
                self.modes.append(torch._C._pop_torch_function_stack())
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        modes, self.modes = self.modes, []
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


def _guarded(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - a failure of torchdiag's own hook is reported, never raised
        from ..errors import warn_self

        warn_self(f"torchdiag: a signal hook failed ({type(e).__name__}: {e}); training goes on")
