"""torchdiag: per-layer diagnostics of a PyTorch model while your own training loop runs."""

from __future__ import annotations

import sys as _sys
from typing import TYPE_CHECKING

from ._lazy import LazyPackage
from .errors import ConfigError, DiagnosticWarning, TorchDiagError

if TYPE_CHECKING:
    from ._checks.checking import check
    from ._checks.fix import apply_suggestions, fix_init
    from ._diagnose.verdict import RunFinding
    from ._origin.origin import NonfiniteOrigin, locate_nonfinite
    from ._report.report import Finding, LayerReport, Report
    from .config import Config
    from .watch import Watcher, watch

# the other public names are imported on first use (``_lazy.PUBLIC``): the command line parses its arguments, and
# answers --help, without importing torch
_sys.modules[__name__].__class__ = LazyPackage

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DiagnosticWarning",
    "Finding",
    "LayerReport",
    "NonfiniteOrigin",
    "Report",
    "RunFinding",
    "TorchDiagError",
    "Watcher",
    "__version__",
    "apply_suggestions",
    "check",
    "fix_init",
    "locate_nonfinite",
    "watch",
]
