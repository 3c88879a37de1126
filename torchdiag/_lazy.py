"""The package's public names, imported on first use (PEP 562), so that ``torchdiag --help`` and argument errors
answer before torch is imported."""

from __future__ import annotations

import importlib
import types
from typing import Any

#: public name -> the module (relative to the package) that defines it
PUBLIC = {
    "check": "._checks.checking", "apply_suggestions": "._checks.fix", "fix_init": "._checks.fix",
    "Config": ".config", "NonfiniteOrigin": "._origin.origin", "locate_nonfinite": "._origin.origin",
    "LayerReport": "._report.report", "Report": "._report.report", "Finding": "._report.report",
    "RunFinding": "._diagnose.verdict", "Watcher": ".watch", "watch": ".watch",
}


class LazyPackage(types.ModuleType):
    """The ``torchdiag`` module: a public name is imported the first time it is read."""

    def __getattr__(self, name: str) -> Any:  # only for names not already in the module: a function or class
        where = PUBLIC.get(name)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where, self.__name__), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: object) -> None:
        if name in PUBLIC and isinstance(value, types.ModuleType) and not isinstance(self.__dict__.get(name),
                                                                                    types.ModuleType):
            return  # importing the submodule torchdiag.watch never hides the function torchdiag.watch
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(PUBLIC))
