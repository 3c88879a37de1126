"""Exceptions and warning categories raised by torchdiag."""

from __future__ import annotations


class TorchDiagError(Exception):
    """Base class of every error torchdiag raises about its own input."""


class ConfigError(TorchDiagError, ValueError):
    """A configuration key, value or file is invalid."""


class DiagnosticWarning(UserWarning):
    """A problem found in the watched model (exploding, vanishing, non-finite, dead, saturated)."""


def warn_self(message: str, stacklevel: int = 2, category: type[Warning] = DiagnosticWarning) -> None:
    """Warn about torchdiag itself (a recording, sink or collective that failed) without ever raising.

    These warnings are emitted from inside the user's step (forward hooks, ``opt.step()``, ``step()``).
    A warnings filter that turns them into errors (``python -W error``) must not stop training, so an
    exception from ``warnings.warn`` is caught and the message goes to stderr instead. No
    ``warnings.catch_warnings`` (which swaps the process-wide filters and is not thread-safe).
    """
    import sys
    import warnings

    try:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
    except Exception:  # noqa: BLE001 - a filter made it an error: say it, never raise it into the step
        try:
            sys.stderr.write(f"{category.__name__} (not raised: torchdiag never stops training): {message}\n")
        except Exception:  # noqa: BLE001, S110 - no stderr: nothing more to do
            pass
