"""``torchdiag summarize LOGDIR``: read a run's TensorBoard events back and say what was wrong.

The events are read with TensorBoard's own reader (``EventAccumulator``) and mapped back through the tag
schema the sink writes with (``tags``: the layer list ``torchdiag/layer_index`` and the per-step flags and
suggested scales ``torchdiag/state`` as JSON tensors, the scalars ``<metric>/<layer>`` and the warnings), by
``logreader``. Logs of earlier versions (per-layer ``flag/<problem>/<layer>`` scalars, a markdown layer
list) are read too.

For the latest recorded step (or ``--step N``) it prints the per-layer table in execution order (with
the suggestion column of the live report), the flagged layers, when each problem first appeared up to
that step and the warnings; then the verdict of ``judge`` (the one place that decides what a run's
verdict is, through ``verdict.decide`` as ``torchdiag check`` does): by default the run's findings, the
rule the live watch uses (``torchdiag._diagnose.verdict``); with ``--step N`` what that step alone flags. ``LOGDIR``
may be one run or a folder of runs (``runs/`` with ``exp1/``, ``exp2/``...): each run is summarised and a
table of all runs ends the output. Depth-profile
sub-runs of earlier versions are not runs of their own.

An event file that is cut off or corrupt part-way is read up to the last good record, and the summary
says so (which file, where, and the step it reached).

Exit status: 0 nothing found, 1 something found (``fail_on`` restricts which problems count),
2 no torchdiag events (missing or empty logdir, unknown step), or an event file that could not be read
to its end and nothing flagged in what could be read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TextIO

from .._diagnose.verdict import ERROR, FLAGGED, OK, RunFinding, RunVerdict, Verdict, decide
from .._report.render import render, use_color
from .._report.report import STATUSES
from ..config import Config
from ._logreader import NotATorchdiagRun, RunSummary, SummarizeError, find_runs, natural, span, summarize_run

NO_DATA = ERROR  # exit status 2: nothing could be judged
__all__ = ["FLAGGED", "NO_DATA", "OK", "NotATorchdiagRun", "RunSummary", "SummarizeError", "Verdict", "find_runs",
           "format_summary", "judge", "overview", "run_findings", "summarize", "summarize_run"]


def judge(s: RunSummary, fail: set[str]) -> Verdict:
    """The whole-run judgement, in one place: the run's findings (``torchdiag._diagnose.verdict``: flags raised at
    the first recorded step, non-finite values, flags that persisted), the same rule the live watch uses; with
    ``--step N`` what that one step flags."""
    if not s.whole_run:
        return decide(s.flagged_problems(), fail, verb="found", where=f"at step {s.step}",
                      layers=[layer.name for layer in s.report.flagged])
    findings = run_findings(s)
    return decide({f.problem for f in findings}, fail, verb="found", where=f"in the run (steps {span(s.steps)})",
                  layers=dict.fromkeys(f.layer for f in findings))


def run_findings(s: RunSummary, config: Config | None = None) -> list[RunFinding]:
    """The findings of the run, from its per-step flags as the events hold them."""
    order = {layer.name: (layer.index, layer.module_type) for layer in s.report.layers}
    v = RunVerdict.from_config(config or Config.defaults())
    for step, status in s.history:
        blamed = s.reasons.get(step, {})
        v.add_flags(step, ((name, order.get(name, (1 << 30, "?"))[1], order.get(name, (1 << 30, "?"))[0], p, None,
                            f"'{name}' {p}", None, blamed.get(name, {}).get(p))
                           for name, problems in status.items() for p in problems))
    return v.findings()


def _names(names: Iterable[str], limit: int = 8, quote: bool = True) -> str:
    names = [f"'{n}'" if quote else n for n in names]
    if len(names) > limit:
        return ", ".join(names[:limit]) + f" and {len(names) - limit} more"
    return ", ".join(names)


def format_summary(s: RunSummary, color: bool = False) -> str:
    lines = [f"run {s.run}: steps {span(s.steps)}"]
    if s.stopped_early:
        lines.append(s.stopped_early)
    lines.append(render(s.report, color=color))
    flagged = s.report.flagged
    if flagged:
        lines.append(f"flagged at step {s.step}: {len(flagged)} layer{'s' if len(flagged) != 1 else ''}")
        for problem in STATUSES:
            names = [layer.name for layer in flagged if problem in layer.status]
            if names:
                lines.append(f"  {problem:<10} {_names(names)}")
    if s.first_flagged:
        now = {(p, layer.name) for layer in s.report.layers for p in layer.status}
        order = {layer.name: layer.index for layer in s.report.layers}
        lines.append(f"when each problem first appeared (up to step {s.step}):")
        for problem in STATUSES:
            by_step: dict[int, list[str]] = {}
            for (p, layer), st in sorted(s.first_flagged.items(), key=lambda kv: (order.get(kv[0][1], 1 << 30),
                                                                                   natural(kv[0][1]))):
                if p == problem:
                    note = "" if (p, layer) in now else " (since recovered)"
                    by_step.setdefault(st, []).append(f"'{layer}'{note}")
            for i, (st, names) in enumerate(sorted(by_step.items())):
                label = problem if i == 0 else ""
                lines.append(f"  {label:<10} step {st}: {_names(names, quote=False)}")
    if s.warnings:
        lines.append(f"warnings (up to step {s.step}):")
        lines.extend(f"  step {st}: {msg}" for st, msg in s.warnings)
    return "\n".join(lines)


def overview(logdir: str, rows: list[tuple[RunSummary, Verdict]], width: int = 100) -> str:
    """One table of all runs: run, steps, verdict, flagged layers (each line at most ``width`` columns)."""
    def cut(text: str, w: int) -> str:
        return text if len(text) <= w else text[: max(w - 1, 0)] + "…"

    cells = []
    for s, v in rows:
        run = os.path.relpath(s.run, logdir) if os.path.abspath(s.run) != os.path.abspath(logdir) else "."
        steps = span(s.steps).replace(" recorded)", ")")
        verdict = v.line.split(":", 1)[0] + (": " + ", ".join(v.problems) if v.problems else "")
        if s.stopped_early:
            verdict += f" (stopped early at step {s.steps[-1]})"
        layers = f"{len(v.layers)}: {_names(v.layers, limit=4)}" if v.layers else "-"
        cells.append([run, steps, verdict, layers])
    head = ["run", "steps", "verdict", "flagged layers"]
    widths = [min(max(len(c[i]) for c in [head, *cells]), cap) for i, cap in enumerate((24, 16, 34, 100))]
    widths[3] = max(14, width - sum(widths[:3]) - 6)
    lines = [f"overview of {len(rows)} runs under {logdir}:"]
    for c in [head, *cells]:
        lines.append("  ".join(cut(x, w).ljust(w) for x, w in zip(c, widths)).rstrip()[:width])
    return "\n".join(lines)


def summarize(logdir: str, *, step: int | None = None, fail_on: Iterable[str] | None = None,
              out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the summary of every run under ``logdir``; return the exit status (0, 1 or 2)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    fail = set(STATUSES) if fail_on is None else set(fail_on)
    unknown = fail - set(STATUSES)
    if unknown:
        print(f"torchdiag summarize: unknown problem(s) {sorted(unknown)} in --fail-on; allowed:"
              f" {', '.join(STATUSES)}", file=err)
        return NO_DATA
    if not os.path.isdir(logdir):
        what = "is not a directory" if os.path.exists(logdir) else "does not exist"
        print(f"torchdiag summarize: {logdir!r} {what}", file=err)
        return NO_DATA
    runs = find_runs(logdir)
    if not runs:
        print(f"torchdiag summarize: no TensorBoard event files under {logdir!r}: write some with"
              f" torchdiag.watch(model, logdir={logdir!r})", file=err)
        return NO_DATA
    summaries, errors, foreign = [], [], []
    for run in runs:
        try:
            summaries.append(summarize_run(run, step))
        except NotATorchdiagRun as e:
            foreign.append(str(e))
        except SummarizeError as e:
            errors.append(str(e))
    if errors or not summaries:
        for message in errors or foreign:
            print(f"torchdiag summarize: {message}", file=err)
        return NO_DATA
    status = OK
    color = use_color(out)  # only on a terminal, never with NO_COLOR
    lines, judged = [], []
    for s in summaries:
        verdict = judge(s, fail)
        judged.append((s, verdict))
        status = max(status, verdict.status)
        lines.append(format_summary(s, color=color) + "\n" + verdict.line)
    incomplete = [s for s in summaries if s.stopped_early]
    if incomplete and status == OK:
        status = NO_DATA  # nothing flagged in what could be read is not a clean run
    if len(summaries) > 1:
        lines.append(overview(logdir, judged))
    try:
        print("\n\n".join(lines), file=out)
        out.flush()
    except BrokenPipeError:  # `torchdiag summarize runs | head`: the exit status still tells
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for s in incomplete:
        print(f"torchdiag summarize: {s.run}: {s.stopped_early}", file=err)
    return status
