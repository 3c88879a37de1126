"""torchdiag: per-layer diagnostics of a PyTorch model while your own training loop runs."""

from __future__ import annotations

from .checks.checking import check
from .checks.fix import apply_suggestions, fix_init
from .config import Config
from .errors import ConfigError, DiagnosticWarning, TorchDiagError
from .origin.origin import NonfiniteOrigin, locate_nonfinite
from .report.report import LayerReport, Report
from .watch import Watcher, watch

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DiagnosticWarning",
    "LayerReport",
    "NonfiniteOrigin",
    "Report",
    "TorchDiagError",
    "Watcher",
    "__version__",
    "apply_suggestions",
    "check",
    "fix_init",
    "locate_nonfinite",
    "watch",
]
