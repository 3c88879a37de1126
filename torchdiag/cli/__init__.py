"""Command line: ``torchdiag demo``, ``summarize LOGDIR`` and ``check MODULE:FACTORY``."""

from ._main import main

__all__ = ["main"]
