"""Third-party model code that ships offline, imported so that it loads beside the CPU build of torch.

PyPI's torchvision is a CUDA build whose C operators (``torchvision::nms`` and friends) do not load
beside the CPU torch; importing it registers fake kernels for those operators and fails. The models
never call them, so the registration of ``torchvision::`` fake kernels is skipped while torchvision is
imported (and only then). Lightning and torchmetrics import torchvision when it is installed, so this
runs before any test module is collected (``conftest.py``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch.library


def import_torchvision() -> ModuleType | None:
    """torchvision, importable beside a CPU torch; None when it is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    real = torch.library.register_fake

    def register_fake(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda fn=None, *_a, **_k: fn if fn is not None else (lambda f: f)
        return real(op, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        return importlib.import_module("torchvision")
    finally:
        torch.library.register_fake = real
