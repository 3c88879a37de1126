"""Console sink: one ``DiagnosticWarning`` per problem and cause, when it becomes a finding of the run."""

from __future__ import annotations

import warnings

from ..errors import DiagnosticWarning
from ..report import Report


class ConsoleSink:
    """Warns about the findings that each report adds to the run (``Report.new_findings``), once per watch.

    Findings that share a problem, a direction and a cause (the weighted layer whose weights to change, for
    drift; the layer type, for dead or saturated layers) give one warning: the cause's sentence, or the first
    layer's, with the count of the others.
    """

    def __init__(self) -> None:
        self._seen: set[tuple] = set()

    def write(self, report: Report) -> list[str]:
        groups: dict[tuple, list] = {}
        for f in report.new_findings:
            cause = f.cause if f.cause is not None else (f.module_type if f.problem != "nonfinite" else f.layer)
            groups.setdefault((f.problem, f.direction, cause), []).append(f)
        emitted = []
        for key, members in groups.items():
            if key in self._seen:
                continue
            self._seen.add(key)  # before warning: a filter that raises must not make it repeat
            lead = next((f for f in members if f.layer == f.cause), members[0])
            others = len(members) - 1
            text = lead.message + (f" (and {others} more layer{'s' if others > 1 else ''} of the same kind)"
                                   if others else "")
            emitted.append(text)
            warnings.warn(f"torchdiag (step {report.step}): {text}", DiagnosticWarning, stacklevel=4)
        return emitted
