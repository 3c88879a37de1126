"""Console sink: one ``DiagnosticWarning`` per problem and cause, when it becomes a finding of the run.

Its first line says the problem, the layer, the cause and the fix (within ``HEADLINE`` characters); the evidence
(the figures and thresholds, the whole fix, the other layers) is on the lines below."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .._report.render import elide_name, others
from ..errors import DiagnosticWarning, user_stacklevel

if TYPE_CHECKING:
    from .._diagnose.verdict import RunFinding
    from .._report.report import Report

#: the most characters of a warning's first line
HEADLINE = 160


class ConsoleSink:
    """Warns about the findings that each report adds to the run (``Report.new_findings``), once per watch.

    Findings that share a problem, a direction and a cause (the weighted layer whose weights to change, for
    drift; the layer type, for dead or saturated layers) give one warning: the cause's, or the first layer's,
    with the count of the others by kind.
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
            prefix = f"torchdiag (step {report.step}): "
            text = warning_text(members, key[2], HEADLINE - len(prefix))
            emitted.append(text)  # as TensorBoard's text shows it, without the prefix
            warnings.warn(prefix + text, DiagnosticWarning, stacklevel=user_stacklevel())
        return emitted


def split_fix(message: str) -> tuple[str, str]:
    """A finding's sentence -> (the evidence, the fix): the text before and after its " Fix: "."""
    evidence, sep, fix = message.partition(" Fix: ")
    return (evidence.strip(), fix.strip()) if sep else (message.strip(), "")


def first_clause(fix: str) -> str:
    """The fix's first clause: up to its first parenthesis, semicolon, ' or ' or sentence end."""
    cut = len(fix)
    for mark in (" (", "; ", " or ", ". ", ", or "):
        at = fix.find(mark)
        if at > 0:
            cut = min(cut, at)
    return fix[:cut].rstrip(" .,:")


def warning_text(members: list[RunFinding], cause: str | None, width: int = HEADLINE) -> str:
    """One warning for the findings (``RunFinding``) of one problem and cause: a first line (at most ``width``
    characters) with the problem, the layer, the cause and the fix; the evidence below."""
    lead = next((f for f in members if f.layer == cause), members[0])
    rest = [f for f in members if f is not lead]
    problem = lead.problem + (f" ({lead.direction})" if lead.direction else "")
    layer = f"'{elide_name(lead.layer, 40)}' ({lead.module_type})"
    same = sum(f.module_type == lead.module_type for f in rest)
    covers = others(lead.module_type, [lead.module_type] * same)  # the first line counts the lead's kind only
    evidence, fix = split_fix(lead.message)
    blame = lead.cause if lead.cause is not None and lead.cause != lead.layer else None
    named = f"'{elide_name(blame, 30)}'" if blame else ""
    # the cause: what it is blamed on (init, optimisation...) and the layer to change, where they are known
    cause_text = "; cause: " + " ".join(filter(None, [lead.reason, f"({named})" if lead.reason and named else named]))
    if not (lead.reason or named):
        cause_text = ""
    short_fix = first_clause(fix) if fix else "see below"
    head = f"{problem} at {layer}" + (f" {covers}" if covers else "")
    line = f"{head}{cause_text}. Fix: {short_fix}"
    if len(line) > width and covers:  # the count moves below
        line = f"{problem} at {layer}{cause_text}. Fix: {short_fix}"
    if len(line) > width:
        line = line[:width - 1] + "…"
    below = [f"  {evidence}"]
    if fix and fix != short_fix:
        below.append(f"  fix: {fix}")
    by_kind: dict[str, list[str]] = {}
    for f in rest:
        by_kind.setdefault(f.module_type, []).append(f.layer)
    for kind, names in sorted(by_kind.items(), key=lambda kv: kv[0] != lead.module_type):
        shown = ", ".join(f"'{n}'" for n in names[:6]) + (f", … ({len(names) - 6} more)" if len(names) > 6 else "")
        what = f"{len(names)} more" if kind == lead.module_type else str(len(names))
        below.append(f"  also {what} {kind} layer{'s' if len(names) > 1 else ''}: {shown}")
    return "\n".join([line, *below])
