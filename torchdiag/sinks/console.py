"""Console sink: one ``DiagnosticWarning`` per problem and cause, when it becomes a finding of the run."""

from __future__ import annotations

import warnings

from ..errors import DiagnosticWarning, user_stacklevel
from ..report.render import one_story
from ..report.report import Report


class ConsoleSink:
    """Warns about the findings that each report adds to the run (``Report.new_findings``), once per watch.

    Findings that share a problem, a direction and a cause (the weighted layer whose weights to change, for
    drift; the layer type, for dead or saturated layers) give one warning: the cause's sentence, or the first
    layer's, with the count of the others.
    """

    def __init__(self) -> None:
        self._seen: set[tuple] = set()

    def write(self, report: Report) -> list[str]:
        """Warn (attributed to the user's line, ``errors.user_stacklevel``) and return the messages."""
        emitted = []
        fresh = []
        for f in report.new_findings:
            key = (f.problem, f.direction, f.cause if f.cause is not None else
                   (f.module_type if f.problem != "nonfinite" else f.layer))
            if key not in self._seen:
                fresh.append((key, f))
        groups: dict[tuple, list] = {}
        for key, f in fresh:
            groups.setdefault(key, []).append(f)
        for key, members in groups.items():
            self._seen.add(key)  # before warning: a filter that raises must not make it repeat
            cause = key[2]
            (text,) = one_story([(f.layer, f.problem, f.direction, cause, f.message) for f in members])
            emitted.append(text)
            warnings.warn(f"torchdiag (step {report.step}): {text}", DiagnosticWarning, stacklevel=user_stacklevel())
        return emitted
