"""``torchdiag summarize LOGDIR``: read a run's TensorBoard events back and say what was wrong.

The events are read with TensorBoard's own reader (``EventAccumulator``), in the schema the sink writes
(``sinks/tensorboard.py``): the layer list ``torchdiag/layer_index`` and the per-step flags and suggested
scales ``torchdiag/state`` (JSON tensors), the scalars ``<metric>/<layer>`` and the warnings. Logs of
earlier versions (per-layer ``flag/<problem>/<layer>`` scalars, a markdown layer list) are read too.

For the latest recorded step (or ``--step N``) it prints the per-layer table in execution order (with
the suggestion column of the live report), the flagged layers, when each problem first appeared up to
that step and the warnings; then the verdict of ``judge`` (the one place that decides what a run's
verdict is): by default the run's findings, the rule the live watch uses (``torchdiag.verdict``); with
``--step N`` what that step alone flags. ``LOGDIR`` may be one run or a folder of runs (``runs/`` with
``exp1/``, ``exp2/``...): each run is summarised and a table of all runs ends the output. Depth-profile
sub-runs of earlier versions are not runs of their own.

An event file that is cut off or corrupt part-way is read up to the last good record, and the summary
says so (which file, where, and the step it reached).

Exit status: 0 nothing found, 1 something found (``fail_on`` restricts which problems count),
2 no torchdiag events (missing or empty logdir, unknown step), or an event file that could not be read
to its end and nothing flagged in what could be read.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TextIO

from .config import Config
from .report import STATUSES, LayerReport, Report, render, use_color
from .sinks.tensorboard import (
    FLAGGED_TAG,
    LAYER_INDEX_TAG,
    LAYERS_TAG,
    PROFILE_DIR,
    SCALARS,
    STATE_TAG,
    TEXT_SUFFIX,
    WARNINGS_TAG,
)
from .verdict import RunFinding, RunVerdict

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
    report: Report  # the selected step, rebuilt from the events (statuses and suggestions, no findings)
    first_flagged: dict[tuple[str, str], int] = field(default_factory=dict)  # (problem, layer) -> step
    warnings: list[tuple[int, str]] = field(default_factory=list)  # (step, message) up to the selected step
    stopped_early: str | None = None  # why the events could not be read to their end, if they could not
    history: list[tuple[int, dict[str, list[str]]]] = field(default_factory=list)  # (step, layer -> problems)
    whole_run: bool = True  # judged on the run's findings; False: on the selected step alone (--step N)

    @property
    def step(self) -> int:
        return self.report.step

    def flagged_problems(self) -> set[str]:
        return {p for layer in self.report.layers for p in layer.status}


@dataclass
class Verdict:
    """The judgement of one run: exit status (``OK`` or ``FLAGGED``), one line, the layers it blames."""

    status: int
    line: str
    problems: list[str]  # the problems that count (in ``fail_on``), in ``STATUSES`` order
    layers: list[str]  # the layers flagged, in execution order


def judge(s: RunSummary, fail: set[str]) -> Verdict:
    """The whole-run judgement, in one place: the run's findings (``torchdiag.verdict``: flags raised at the first
    recorded step, non-finite values, flags that persisted), the same rule the live watch uses; with ``--step N``
    what that one step flags."""
    if not s.whole_run:
        found = s.flagged_problems()
        layers = [layer.name for layer in s.report.flagged]
        where = f"at step {s.step}"
    else:
        findings = run_findings(s)
        found = {f.problem for f in findings}
        layers = list(dict.fromkeys(f.layer for f in findings))
        where = f"in the run (steps {_span(s.steps)})"
    hit = [p for p in STATUSES if p in found & fail]
    if hit:
        return Verdict(FLAGGED, f"FAIL: {', '.join(hit)} found {where}", hit, layers)
    if found:
        return Verdict(OK, f"OK: {', '.join(p for p in STATUSES if p in found)} found {where}, not in"
                           f" --fail-on ({', '.join(p for p in STATUSES if p in fail)})", [], layers)
    return Verdict(OK, f"OK: nothing found {where}", [], [])


def run_findings(s: RunSummary, config: Config | None = None) -> list[RunFinding]:
    """The findings of the run, from its per-step flags as the events hold them."""
    order = {layer.name: (layer.index, layer.module_type) for layer in s.report.layers}
    v = RunVerdict.from_config(config or Config.defaults())
    for step, status in s.history:
        v.add_flags(step, ((name, order.get(name, (1 << 30, "?"))[1], order.get(name, (1 << 30, "?"))[0], p, None,
                            f"'{name}' {p}", None) for name, problems in status.items() for p in problems))
    return v.findings()


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


def _strings(acc, tag: str) -> list[tuple[int, str]]:
    """(step, text) of a string tensor tag (a text summary, a JSON record)."""
    if tag not in acc.Tags().get("tensors", []):
        return []
    out = []
    for ev in acc.Tensors(tag):
        vals = ev.tensor_proto.string_val
        if vals:
            out.append((ev.step, vals[0].decode("utf-8", "replace")))
    return out


def _texts(acc, tag: str) -> list[tuple[int, str]]:
    return _strings(acc, tag + TEXT_SUFFIX)


def _json(acc, tag: str) -> list[tuple[int, object]]:
    out = []
    for step, text in _strings(acc, tag):
        try:
            out.append((step, json.loads(text)))
        except ValueError:
            continue
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


def _latest_at(items: list[tuple[int, object]], step: int) -> object | None:
    """The last item written at or before ``step`` (else the first one written)."""
    before = [obj for s, obj in items if s <= step]
    return before[-1] if before else (items[0][1] if items else None)


# ------------------------------------------------------------------ event files read to their end?
def check_event_files(run: str, last_step: int | None) -> str | None:
    """Why the event files directly in ``run`` cannot be read to their end (a record cut off or failing its
    checksum, as TensorBoard's reader then silently stops there), or None when they can. The header of every
    record is checked (cheap); the data checksums too when a compiled CRC32C is installed
    (``google-crc32c``); else the step of the last record is compared with the last step the reader reached."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer import record_writer

    from .sinks.tensorboard import use_compiled_crc

    check_data = use_compiled_crc()
    crc = record_writer.masked_crc32c
    reached = "no step" if last_step is None else f"step {last_step}"
    for name in sorted(os.listdir(run)):
        path = os.path.join(run, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        last = b""
        with open(path, "rb") as f:
            pos = 0
            while pos < size:
                header = f.read(12)
                problem = None
                if len(header) < 12:
                    problem = "is cut off in a record header"
                else:
                    (length,), (hcrc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
                    if crc(header[:8]) != hcrc:
                        problem = "has a corrupt record header"
                    elif pos + 12 + length + 4 > size:
                        problem = "is cut off inside a record"
                    else:
                        data = f.read(length)
                        (dcrc,) = struct.unpack("<I", f.read(4))
                        if check_data and crc(data) != dcrc:
                            problem = "has a record that fails its checksum"
                        last = data
                if problem:
                    return (f"stopped early: {name} {problem} at byte {pos} of {size} (truncated, corrupt, or"
                            f" still being written); read up to {reached}")
                pos += 12 + length + 4
        if last and last_step is not None:
            try:
                final = Event.FromString(last).step
            except Exception:  # noqa: BLE001 - an unparseable last record: the reader stopped there too
                final = None
            if final is None or final > last_step:
                return (f"stopped early: {name} has records up to step {final} that TensorBoard's reader could"
                        f" not read (a corrupt record); read up to {reached}")
    return None


# ------------------------------------------------------------------ one run
def summarize_run(run: str, step: int | None = None) -> RunSummary:
    """Rebuild the report of ``step`` (default: the latest recorded step) from one run's events."""
    acc = _load(run)
    scalar_tags = acc.Tags().get("scalars", [])
    if FLAGGED_TAG not in scalar_tags:
        raise NotATorchdiagRun(f"{run!r} holds TensorBoard events but none written by torchdiag")
    steps = sorted({e.step for e in acc.Scalars(FLAGGED_TAG)})
    stopped = check_event_files(run, steps[-1] if steps else None)
    whole_run = step is None
    if step is None:
        step = steps[-1]
    elif step not in steps:
        near = sorted(steps, key=lambda s: (abs(s - step), s))[:3]
        raise SummarizeError(f"step {step} was not recorded in {run!r}; recorded steps are {_span(steps)}"
                             f" (nearest: {', '.join(map(str, sorted(near)))})")

    values: dict[str, dict[str, float]] = {}  # layer -> attr -> value at the step
    for tag in scalar_tags:
        head, _, rest = tag.partition("/")
        if head in _METRIC_ATTR and rest:
            for e in acc.Scalars(tag):
                if e.step == step:
                    values.setdefault(rest, {})[_METRIC_ATTR[head]] = e.value

    states = _json(acc, STATE_TAG)
    if states:
        status, suggest, first, history = _from_states(states, step)
    else:  # written by torchdiag < 0.2: per-layer 0/1 flag scalars
        status, suggest, first, history = _from_flag_scalars(acc, scalar_tags, step)

    index = _json(acc, LAYER_INDEX_TAG)
    listed: list[tuple[int, str, str]]
    if index:
        rows = _latest_at(index, step) or []
        listed = [(int(r["index"]), str(r["name"]), str(r["type"])) for r in rows if isinstance(r, dict)]
    else:
        layer_rows = [t for s, t in _texts(acc, LAYERS_TAG) if s <= step] or [t for _, t in _texts(acc, LAYERS_TAG)]
        listed = _parse_layers(layer_rows[-1]) if layer_rows else []
    if not listed:  # no layer list at all: the names in the order the scalars give, no index known
        listed = [(i, name, "?") for i, name in enumerate(sorted(values, key=_natural))]
    layers = []
    for idx, name, module_type in sorted(listed, key=lambda r: (r[0], _natural(r[1]))):
        if name not in values and name not in status:
            continue  # not called at this step
        known = {k: v for k, v in values.get(name, {}).items() if k in _LAYER_FIELDS}
        row = LayerReport(name=name, module_type=module_type, index=idx, calls=0, **known)
        row.status = set(status.get(name, ()))
        scale, nonlinearity, init = (list(suggest.get(name, ())) + [None, None, None])[:3]
        row.suggested_scale = None if scale is None else float(scale)
        row.nonlinearity, row.suggested_init = nonlinearity, init
        layers.append(row)
    warnings = []
    for s, text in _texts(acc, WARNINGS_TAG):
        if s <= step:
            for item in text.split("\n\n"):
                item = item.strip()
                warnings.append((s, item[2:] if item.startswith("- ") else item))
    report = Report(layers=layers, step=step)
    return RunSummary(run=run, steps=steps, report=report, first_flagged=dict(sorted(first.items(),
                      key=lambda kv: (kv[1], kv[0]))), warnings=warnings, stopped_early=stopped,
                      history=[(st, history.get(st, {})) for st in steps if st <= step], whole_run=whole_run)


def _natural(name: str) -> tuple:
    """'10' after '2': digit runs compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def _from_states(states: list[tuple[int, object]], step: int):
    status: dict[str, list[str]] = {}
    suggest: dict[str, list] = {}
    first: dict[tuple[str, str], int] = {}
    history: dict[int, dict[str, list[str]]] = {}
    for s, obj in states:
        if s > step or not isinstance(obj, dict):
            continue
        history[s] = {k: list(v) for k, v in (obj.get("status") or {}).items()}
        for layer, problems in history[s].items():
            for p in problems:
                first.setdefault((p, layer), s)
        if s == step:
            status = history[s]
            suggest = dict(obj.get("suggest") or {})
    return status, suggest, first, history


def _from_flag_scalars(acc, scalar_tags: list[str], step: int):
    status: dict[str, set[str]] = {}
    first: dict[tuple[str, str], int] = {}
    history: dict[int, dict[str, list[str]]] = {}
    for tag in scalar_tags:
        head, _, rest = tag.partition("/")
        if head == "flag" and "/" in rest:
            problem, _, layer = rest.partition("/")
            for e in acc.Scalars(tag):
                if e.value >= 0.5 and e.step <= step:
                    first.setdefault((problem, layer), e.step)
                    history.setdefault(e.step, {}).setdefault(layer, []).append(problem)
                    if e.step == step:
                        status.setdefault(layer, set()).add(problem)
    return status, {}, first, history


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
    lines = [f"run {s.run}: steps {_span(s.steps)}"]
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
                                                                                   _natural(kv[0][1]))):
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
        steps = _span(s.steps).replace(" recorded)", ")")
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
        for e in errors or foreign:
            print(f"torchdiag summarize: {e}", file=err)
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
