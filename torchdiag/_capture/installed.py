"""What a watch adds to the process beyond its recorder, and its removal in one place: when the watch is left, and
when a ``Watcher`` is garbage-collected inside it (a ``weakref.finalize`` calls ``abandon``, which holds no
reference to the Watcher); ``WeakCall`` lets hooks call back into a Watcher without keeping it alive."""

from __future__ import annotations

import os
import weakref
from typing import Any

from . import capture


class WeakCall:
    """``getattr(obj, name)()`` without keeping ``obj`` alive (the optimizer's hooks and the recorder hold this)."""

    def __init__(self, obj: Any, name: str) -> None:
        self._ref = weakref.ref(obj)
        self._name = name

    def __call__(self) -> None:
        obj = self._ref()
        if obj is not None:
            getattr(obj, self._name)()


class Installed:
    """What a watch adds to the process beyond its recorder: the module hooks' registrations (``module_refs``) and
    parts with a ``remove()`` (the rescale hook's handle, the optimizer monitor, the sentinel), removed in the order
    they were added, when the watch is left and when a Watcher is garbage-collected inside it (``abandon``)."""

    def __init__(self) -> None:
        self.module_refs: list[weakref.ref] = []
        self._parts: list[Any] = []

    def add(self, part: Any) -> Any:
        self._parts.append(part)
        return part

    def remove(self) -> None:
        parts, self._parts = self._parts, []
        for part in parts:
            part.remove()
        capture.detach(self.module_refs)
        self.module_refs = []


def abandon(installed: Installed, tb: Any, capture_id: int, pid: int | None = None) -> None:
    """A Watcher garbage-collected inside its watch (entered, never exited): remove what it added. In a process
    forked from ``pid``, the one that entered it, its TensorBoard writer is not closed (its thread is not there)."""
    try:
        capture.forget(capture_id)
        installed.remove()
        if tb is not None and (pid is None or os.getpid() == pid):
            tb.close()
    except Exception:  # noqa: BLE001, S110 - called by the garbage collector: nothing to raise into
        pass
