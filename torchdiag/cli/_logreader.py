"""Reading a run back: a logdir's TensorBoard events, read with TensorBoard's own ``EventAccumulator`` and mapped
back through the tag schema (``tags``), into the ``RunSummary`` that ``summarize`` reports and judges.

For the latest recorded step (or a given one) it rebuilds the per-layer rows (metrics, flags, suggestions),
the history of flags up to that step, when each problem first appeared and the warnings. Logs of earlier
versions (per-layer ``flag/<problem>/<layer>`` scalars, a markdown layer list) are read too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from .._report import tags
from .._report.report import SCALAR_FIELDS, LayerReport, Report
from .._sinks.eventfiles import check_event_files, offer_crc32c
from .._stats import library

offer_crc32c(library.crc32c)  # the data checksums are checked where a compiled CRC-32C is at hand

_FLOAT_FIELDS = frozenset(SCALAR_FIELDS)


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
    reasons: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)  # step -> layer -> problem -> reason

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
        if tags.PROFILE_DIR not in rel.split(os.sep):
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
    """The texts of ``tag``, or of its older name (``tags.OLD_TEXT_TAGS``) in logs written before it."""
    found = _strings(acc, tag + tags.TEXT_SUFFIX)
    old = tags.OLD_TEXT_TAGS.get(tag)
    return found or (_strings(acc, old + tags.TEXT_SUFFIX) if old else [])


def _json(acc, tag: str) -> list[tuple[int, object]]:
    out = []
    for step, text in _strings(acc, tag):
        try:
            out.append((step, json.loads(text)))
        except ValueError:
            continue
    return out


def _latest_at(items: list[tuple[int, object]], step: int) -> object | None:
    """The last item written at or before ``step`` (else the first one written)."""
    before = [obj for s, obj in items if s <= step]
    return before[-1] if before else (items[0][1] if items else None)


def summarize_run(run: str, step: int | None = None) -> RunSummary:
    """Rebuild the report of ``step`` (default: the latest recorded step) from one run's events."""
    acc = _load(run)
    scalar_tags = acc.Tags().get("scalars", [])
    flagged_tag = next((t for t in (tags.FLAGGED_TAG, tags.OLD_SCALAR_TAGS[tags.FLAGGED_TAG]) if t in scalar_tags),
                       None)  # its name in logs written before too
    if flagged_tag is None:
        raise NotATorchdiagRun(f"{run!r} holds TensorBoard events but none written by torchdiag")
    steps = sorted({e.step for e in acc.Scalars(flagged_tag)})
    stopped = check_event_files(run, steps[-1] if steps else None)
    whole_run = step is None
    if step is None:
        step = steps[-1]
    elif step not in steps:
        near = sorted(steps, key=lambda s: (abs(s - step), s))[:3]
        raise SummarizeError(f"step {step} was not recorded in {run!r}; recorded steps are {span(steps)}"
                             f" (nearest: {', '.join(map(str, sorted(near)))})")

    values: dict[str, dict[str, float]] = {}  # layer -> attr -> value at the step
    logged: dict[str, dict[str, float]] = {}  # from the log10 and deficit twins (config layer_scalars: core)
    for tag in scalar_tags:
        parsed, twin, deficit = tags.parse_scalar_tag(tag), tags.parse_log10_tag(tag), tags.parse_deficit_tag(tag)
        either = parsed or twin or deficit  # (attribute, layer): a non-empty tuple, so the first of them not None
        if either is not None:
            attr, layer = either
            for e in acc.Scalars(tag):
                if e.step == step:
                    if parsed is not None:
                        values.setdefault(layer, {})[attr] = e.value
                    elif twin is not None:
                        logged.setdefault(layer, {})[attr] = 10.0 ** e.value
                    else:
                        logged.setdefault(layer, {})[attr] = 1.0 - 10.0 ** e.value
    for layer, stds in logged.items():  # a step without the full set: what its twins hold
        for attr, v in stds.items():
            values.setdefault(layer, {}).setdefault(attr, v)

    states = _json(acc, tags.STATE_TAG)
    if states:
        status, suggest, first, history = _from_states(states, step)
    else:  # written by torchdiag < 0.2: per-layer 0/1 flag scalars
        status, suggest, first, history = _from_flag_scalars(acc, scalar_tags, step)

    index = _json(acc, tags.LAYER_INDEX_TAG)
    listed: list[tuple[int, str, str]]
    if index:
        listed = tags.parse_layer_index(_latest_at(index, step))
    else:  # torchdiag < 0.2: the markdown layer list alone
        texts = _texts(acc, tags.LAYERS_TAG)
        layer_rows = [t for s, t in texts if s <= step] or [t for _, t in texts]
        listed = tags.parse_layers_markdown(layer_rows[-1]) if layer_rows else []
    if not listed:  # no layer list at all: the names in the order the scalars give, no index known
        listed = [(i, name, "?") for i, name in enumerate(sorted(values, key=natural))]
    layers = []
    for idx, name, module_type in sorted(listed, key=lambda r: (r[0], natural(r[1]))):
        if name not in values and name not in status:
            continue  # not called at this step
        row = LayerReport(name=name, module_type=module_type, index=idx, calls=0)
        for attr, v in values.get(name, {}).items():
            if attr in _FLOAT_FIELDS:  # what the scalar tags hold: its measured float fields, named at run time
                setattr(row, attr, v)
        row.status = set(status.get(name, ()))
        scale, nonlinearity, init = (list(suggest.get(name, ())) + [None, None, None])[:3]
        row.suggested_scale = None if scale is None else float(scale)
        row.nonlinearity, row.suggested_init = nonlinearity, init
        layers.append(row)
    warnings = []
    for s, text in _texts(acc, tags.WARNINGS_TAG):
        if s <= step:
            for item in text.split("\n\n"):
                item = item.strip()
                warnings.append((s, item[2:] if item.startswith("- ") else item))
    report = Report(layers=layers, step=step)
    return RunSummary(run=run, steps=steps, report=report, first_flagged=dict(sorted(first.items(),
                      key=lambda kv: (kv[1], kv[0]))), warnings=warnings, stopped_early=stopped,
                      history=[(st, history.get(st, {})) for st in steps if st <= step], whole_run=whole_run,
                      reasons=_reasons(states or [], step))


def natural(name: str) -> tuple:
    """'10' after '2': digit runs compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def _reasons(states: list[tuple[int, object]], step: int) -> dict[int, dict[str, dict[str, str]]]:
    """step -> layer -> problem -> what the live diagnosis blamed it on (absent in logs written without it)."""
    return {s: {k: dict(v) for k, v in obj["reasons"].items() if isinstance(v, dict)}
            for s, obj in states if s <= step and isinstance(obj, dict) and isinstance(obj.get("reasons"), dict)}


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
        parsed = tags.parse_flag_tag(tag)
        if parsed is not None:
            problem, layer = parsed
            for e in acc.Scalars(tag):
                if e.value >= 0.5 and e.step <= step:
                    first.setdefault((problem, layer), e.step)
                    history.setdefault(e.step, {}).setdefault(layer, []).append(problem)
                    if e.step == step:
                        status.setdefault(layer, set()).add(problem)
    return status, {}, first, history


def span(steps: list[int]) -> str:
    if len(steps) == 1:
        return str(steps[0])
    return f"{steps[0]}..{steps[-1]} ({len(steps)} recorded)"
