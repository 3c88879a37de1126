"""Exceptions and warning categories raised by torchdiag."""

from __future__ import annotations


class TorchDiagError(Exception):
    """Base class of every error torchdiag raises about its own input."""


class ConfigError(TorchDiagError, ValueError):
    """A configuration key, value or file is invalid."""


class DiagnosticWarning(UserWarning):
    """A problem found in the watched model (exploding, vanishing, non-finite, dead, saturated)."""
