"""Console sink: one ``DiagnosticWarning`` per problem, at most once per watch."""

from __future__ import annotations

import warnings

from ..errors import DiagnosticWarning
from ..report import Report


class ConsoleSink:
    """Emits the findings of each report as warnings, deduplicated for the life of a watch.

    Drift findings are emitted for the first layer of each repeated structure that drifts
    (the message counts the others); dead, saturated and the first non-finite layer each get
    their own warning.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, str | None]] = set()

    def write(self, report: Report) -> list[str]:
        emitted = []
        drift_seen: set[tuple[str, str | None, str]] = set()
        for layer in report.flagged:
            for f in layer.findings:
                if f.direction is not None:  # drift: once per structure, problem and direction
                    group = (layer.module_type, f.direction, f.problem)
                    if group in drift_seen:
                        continue
                    drift_seen.add(group)
                    key = (layer.module_type, f.problem, f.direction)
                else:
                    key = (layer.name, f.problem, None)
                if key in self._seen:
                    continue
                self._seen.add(key)
                warnings.warn(f"torchdiag (step {report.step}): {f.message}", DiagnosticWarning, stacklevel=4)
                emitted.append(f.message)
        return emitted
