"""Exceptions and warning categories raised by torchdiag."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType


class TorchDiagError(Exception):
    """Base class of every error torchdiag raises about its own input."""


class ConfigError(TorchDiagError, ValueError):
    """A configuration key, value or file is invalid."""


class DiagnosticWarning(UserWarning):
    """A problem found in the watched model (exploding, vanishing, non-finite, dead, saturated)."""


def _internal_dirs() -> tuple[str, ...]:
    """torchdiag's own files and torch's (the hook and optimizer machinery that calls into torchdiag)."""
    dirs = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    if torch_file:
        dirs.append(os.path.dirname(os.path.abspath(torch_file)) + os.sep)
    return tuple(dirs)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller of this function point at the first
    frame outside torchdiag and torch: the user's line (``diag.step()``, ``model(x)`` that auto-stepped,
    ``opt.step()``, the end of the ``with``), so that ``filterwarnings(module=...)`` and jump-to-source work."""
    internal = _internal_dirs()
    frame: FrameType | None = sys._getframe(1)  # the caller: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1


def warn_self(message: str, category: type[Warning] = DiagnosticWarning) -> None:
    """Warn about torchdiag itself (a recording, sink or collective that failed) without ever raising,
    attributed to the user's line (``user_stacklevel``).

    These warnings are emitted from inside the user's step (forward hooks, ``opt.step()``, ``step()``).
    A warnings filter that turns them into errors (``python -W error``) must not stop training, so an
    exception from ``warnings.warn`` is caught and the message goes to stderr instead. No
    ``warnings.catch_warnings`` (which swaps the process-wide filters and is not thread-safe).
    """
    import warnings

    try:
        warnings.warn(message, category, stacklevel=user_stacklevel())
    except Exception:  # noqa: BLE001 - a filter made it an error: say it, never raise it into the step
        try:
            sys.stderr.write(f"{category.__name__} (not raised: torchdiag never stops training): {message}\n")
        except Exception:  # noqa: BLE001, S110 - no stderr: nothing more to do
            pass
