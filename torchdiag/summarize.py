"""``torchdiag summarize LOGDIR``: read a run's TensorBoard events back and say what was wrong.

The events are read with TensorBoard's own reader (``EventAccumulator``). For the latest
recorded step (or ``--step N``) it prints the per-layer table rebuilt from the scalars
``<metric>/<layer>`` and the flags ``flag/<problem>/<layer>`` (see ``sinks/tensorboard.py``),
the flagged layers, when each problem first appeared up to that step, and the warnings that
were written. Exit status: 0 nothing flagged, 1 something flagged (``fail_on`` restricts which
problems count), 2 no torchdiag events (missing or empty logdir, unknown step).

``LOGDIR`` may be one run or a folder of runs (``runs/`` with ``exp1/``, ``exp2/``...); each
run is summarised. Depth-profile sub-runs are not runs of their own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TextIO

from .report import STATUSES, LayerReport, Report, render, use_color
from .sinks.tensorboard import FLAGGED_TAG, LAYERS_TAG, PROFILE_DIR, SCALARS, TEXT_SUFFIX, WARNINGS_TAG

OK, FLAGGED, NO_DATA = 0, 1, 2
_METRIC_ATTR = {metric: attr for attr, metric in SCALARS.items()}
_LAYER_FIELDS = {f.name for f in fields(LayerReport)}


class SummarizeError(Exception):
    """The logdir cannot be summarised (missing, empty, unknown step); exit status 2."""


class NotATorchdiagRun(SummarizeError):
    """A run with TensorBoard events, none of them torchdiag's (skipped in a folder of runs)."""


@dataclass
class RunSummary:
    """What ``summarize`` found in one run."""

    run: str
    steps: list[int]  # every recorded step, ascending
    report: Report  # the selected step, rebuilt from the events (no findings, no suggestions)
    first_flagged: dict[tuple[str, str], int] = field(default_factory=dict)  # (problem, layer) -> step
    warnings: list[tuple[int, str]] = field(default_factory=list)  # (step, message) up to the selected step

    @property
    def step(self) -> int:
        return self.report.step

    def flagged_problems(self) -> set[str]:
        return {p for layer in self.report.layers for p in layer.status}


def find_runs(logdir: str) -> list[str]:
    """Directories under ``logdir`` (itself included) that hold event files, depth-profile sub-runs excepted."""
    from tensorboard.backend.event_processing import io_wrapper

    runs = []
    for d in io_wrapper.GetLogdirSubdirectories(logdir):
        rel = os.path.relpath(d, logdir)
        if PROFILE_DIR not in rel.split(os.sep):
            runs.append(d)
    return sorted(runs)


def _load(run: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(run, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 1,
                                                  ea.COMPRESSED_HISTOGRAMS: 1, ea.IMAGES: 1, ea.AUDIO: 1})
    acc.Reload()
    return acc


def _texts(acc, tag: str) -> list[tuple[int, str]]:
    full = tag + TEXT_SUFFIX
    if full not in acc.Tags().get("tensors", []):
        return []
    out = []
    for ev in acc.Tensors(full):
        vals = ev.tensor_proto.string_val
        if vals:
            out.append((ev.step, vals[0].decode("utf-8", "replace")))
    return out


def _md_cells(line: str) -> list[str]:
    """Cells of one markdown table row, honouring ``\\|`` and ``\\\\`` escapes."""
    cells, cur, i = [], [], 0
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            cur.append(line[i + 1])
            i += 2
            continue
        if c == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        cells.append("".join(cur).strip())
    return cells


def _parse_layers(text: str) -> list[tuple[int, str, str]]:
    rows = []
    for line in text.splitlines():
        cells = _md_cells(line)
        if len(cells) == 3 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], cells[2]))
    return rows


def summarize_run(run: str, step: int | None = None) -> RunSummary:
    """Rebuild the report of ``step`` (default: the latest recorded step) from one run's events."""
    acc = _load(run)
    scalar_tags = acc.Tags().get("scalars", [])
    if FLAGGED_TAG not in scalar_tags:
        raise NotATorchdiagRun(f"{run!r} holds TensorBoard events but none written by torchdiag")
    steps = sorted({e.step for e in acc.Scalars(FLAGGED_TAG)})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        near = sorted(steps, key=lambda s: (abs(s - step), s))[:3]
        raise SummarizeError(f"step {step} was not recorded in {run!r}; recorded steps are {_span(steps)}"
                             f" (nearest: {', '.join(map(str, sorted(near)))})")

    values: dict[str, dict[str, float]] = {}  # layer -> attr -> value at the step
    status: dict[str, set[str]] = {}
    first: dict[tuple[str, str], int] = {}
    order: list[str] = []  # layers in order of first appearance, the fallback order
    for tag in scalar_tags:
        head, _, rest = tag.partition("/")
        if head in _METRIC_ATTR and rest:
            for e in acc.Scalars(tag):
                if e.step == step:
                    values.setdefault(rest, {})[_METRIC_ATTR[head]] = e.value
            if rest not in order:
                order.append(rest)
        elif head == "flag" and "/" in rest:
            problem, _, layer = rest.partition("/")
            for e in acc.Scalars(tag):
                if e.value >= 0.5 and e.step <= step:
                    first.setdefault((problem, layer), e.step)
                    if e.step == step:
                        status.setdefault(layer, set()).add(problem)

    layer_rows = [t for s, t in _texts(acc, LAYERS_TAG) if s <= step] or [t for _, t in _texts(acc, LAYERS_TAG)]
    listed = _parse_layers(layer_rows[-1]) if layer_rows else []
    if not listed:
        listed = [(i, name, "?") for i, name in enumerate(order)]
    layers = []
    for index, name, module_type in listed:
        if name not in values and name not in status:
            continue  # not called at this step
        known = {k: v for k, v in values.get(name, {}).items() if k in _LAYER_FIELDS}
        row = LayerReport(name=name, module_type=module_type, index=index, calls=0, **known)
        row.status = status.get(name, set())
        layers.append(row)
    warnings = []
    for s, text in _texts(acc, WARNINGS_TAG):
        if s <= step:
            for item in text.split("\n\n"):
                item = item.strip()
                warnings.append((s, item[2:] if item.startswith("- ") else item))
    report = Report(layers=layers, step=step)
    return RunSummary(run=run, steps=steps, report=report, first_flagged=dict(sorted(first.items(),
                      key=lambda kv: (kv[1], kv[0]))), warnings=warnings)


def _span(steps: list[int]) -> str:
    if len(steps) == 1:
        return str(steps[0])
    return f"{steps[0]}..{steps[-1]} ({len(steps)} recorded)"


def _names(names: Iterable[str], limit: int = 8, quote: bool = True) -> str:
    names = [f"'{n}'" if quote else n for n in names]
    if len(names) > limit:
        return ", ".join(names[:limit]) + f" and {len(names) - limit} more"
    return ", ".join(names)


def format_summary(s: RunSummary, color: bool = False) -> str:
    lines = [f"run {s.run}: steps {_span(s.steps)}", render(s.report, color=color)]
    flagged = s.report.flagged
    if flagged:
        lines.append(f"flagged at step {s.step}: {len(flagged)} layer{'s' if len(flagged) != 1 else ''}")
        for problem in STATUSES:
            names = [layer.name for layer in flagged if problem in layer.status]
            if names:
                lines.append(f"  {problem:<10} {_names(names)}")
    if s.first_flagged:
        now = {(p, layer.name) for layer in s.report.layers for p in layer.status}
        lines.append(f"when each problem first appeared (up to step {s.step}):")
        for problem in STATUSES:
            by_step: dict[int, list[str]] = {}
            for (p, layer), st in s.first_flagged.items():
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
        for e in errors or foreign:
            print(f"torchdiag summarize: {e}", file=err)
        return NO_DATA
    status = OK
    color = use_color(out)  # only on a terminal, never with NO_COLOR
    lines = []
    for s in summaries:
        found = s.flagged_problems()
        hit = [p for p in STATUSES if p in found & fail]
        if hit:
            status = FLAGGED
            verdict = f"FAIL: {', '.join(hit)} flagged at step {s.step}"
        elif found:
            verdict = (f"OK: {', '.join(p for p in STATUSES if p in found)} flagged at step {s.step}, not in"
                       f" --fail-on ({', '.join(p for p in STATUSES if p in fail)})")
        else:
            verdict = f"OK: nothing flagged at step {s.step}"
        lines.append(format_summary(s, color=color) + "\n" + verdict)
    try:
        print("\n\n".join(lines), file=out)
        out.flush()
    except BrokenPipeError:  # `torchdiag summarize runs | head`: the exit status still tells
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status
