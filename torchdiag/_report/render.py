"""The report as text: the per-layer table within a width (names elided in the middle, columns giving way in
order), colour only on a terminal, the findings told once per cause, the run's findings."""

from __future__ import annotations

import math
import os
import sys
import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._diagnose.verdict import RunFinding
    from .report import LayerReport, Report


_COLUMNS = ("#", "layer", "type", "act mean", "act std", "grad std", "gain", "status", "suggestion")
_LEFT = (1, 2, 7, 8)  # left-aligned text columns; the others are right-aligned numbers
# (column, narrowest width) in the order columns give way when the table is wider than asked
# (the type first: a class name cut at 11 still says what it is, a qualified name needs more to be found)
# (the type column last: a class name cut is a guess)
_SHRINK = ((1, 24), (8, 16), (1, 12), (8, 10), (7, 6), (1, 6), (2, 11), (2, 8))
_RED, _GREEN, _RESET = "\033[1;31m", "\033[32m", "\033[0m"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def common_prefix(names: list[str]) -> str:
    """The dotted prefix every name shares (``'transformer.'`` for GPT-2's layers), or ''. Dropped from a table's
    name column first: it tells no layer from another."""
    parts = [n.split(".") for n in names if n]
    if len(parts) < 2:
        return ""
    shared = []
    for comps in zip(*(p[:-1] for p in parts)):  # never a whole name
        if len(set(comps)) != 1:
            break
        shared.append(comps[0])
    return ".".join(shared) + "." if shared else ""


def elide_name(s: str, width: int) -> str:
    """A qualified name cut to ``width`` characters: whole components between the first and the last are replaced
    by '…', names before block indices (``h.6``), which tell layers apart, last; if that is not enough, the
    characters in the middle."""
    if len(s) <= width:
        return s
    comps = s.split(".")
    # the order in which components give way: plain names in the middle first (nearest the middle first), then
    # the ones that carry a block index
    middle = [i for i in range(1, len(comps) - 1) if not comps[i].isdigit()]  # never a block index
    middle.sort(key=lambda i: (comps[i].isdigit(), i + 1 < len(comps) and comps[i + 1].isdigit(),
                               abs(i - len(comps) / 2)))
    dropped: set[int] = set()
    for i in middle:
        dropped.add(i)
        kept, prev = [], False
        for j, c in enumerate(comps):
            if j in dropped:
                if not prev:
                    kept.append("…")
                prev = True
            else:
                kept.append(c)
                prev = False
        out = ".".join(kept)
        if len(out) <= width:
            return out
    return _elide(s, width)


def shorten_names(names: list[str], width: int) -> list[str]:
    """Names (the common prefix already dropped) shortened together towards ``width`` characters without losing
    what tells rows apart: whole components in the middle give way to '…', the most common ones (the least
    informative: ``attn``, ``downsample``) first, names before a block index last; the last component, the first
    (unless most rows share it) and every component with a digit in it (``h.3``, ``layer2``) are kept. Rows whose
    short names would read the same get their components back until they differ. A name may stay longer than
    ``width``: the caller widens its column or, if nothing else gives way, cuts it (``elide_name``)."""
    comps = [n.split(".") for n in names]
    freq: dict[str, int] = {}
    for cs in comps:
        for c in set(cs[:-1]):
            freq[c] = freq.get(c, 0) + 1
    half = len(names) / 2

    def droppable(cs: list[str]) -> list[int]:
        # the first component too when most rows share it (GPT2LMHeadModel's 'transformer', beside its lm_head)
        first = 0 if len(cs) > 2 and freq.get(cs[0], 0) > half else 1
        idx = [i for i in range(first, len(cs) - 1) if not any(ch.isdigit() for ch in cs[i]) and len(cs[i]) > 1]
        idx.sort(key=lambda i: (i + 1 < len(cs) and cs[i + 1].isdigit(), -freq.get(cs[i], 0),
                                abs(i - len(cs) / 2)))
        return idx

    def show(cs: list[str], dropped: set[int]) -> str:
        kept: list[str] = []
        for j, c in enumerate(cs):
            if j not in dropped:
                kept.append(c)
            elif not kept or kept[-1] != "…":
                kept.append("…")
        return ".".join(kept)

    drops: list[set[int]] = []
    for cs in comps:
        dropped: set[int] = set()
        for i in droppable(cs):
            if len(show(cs, dropped)) <= width:
                break
            dropped.add(i)
        drops.append(dropped)
    for _ in range(max((len(cs) for cs in comps), default=0)):  # each round gives one component back per clash
        shown = [show(cs, d) for cs, d in zip(comps, drops)]
        seen: dict[str, list[int]] = {}
        for k, text in enumerate(shown):
            seen.setdefault(text, []).append(k)
        clashes = [ks for ks in seen.values() if len(ks) > 1]
        if not clashes:
            break
        for ks in clashes:
            for k in ks:
                if drops[k]:  # the rarest (most telling) component back first
                    cs = comps[k]
                    drops[k].discard(min(drops[k], key=lambda i: (freq.get(cs[i], 0), -i)))  # noqa: B023
    return [show(cs, d) for cs, d in zip(comps, drops)]


def name_column(names: list[str], columns: tuple[str, ...], rows: list[list[str]], width: int,
                shrink: tuple[tuple[int, int], ...]) -> tuple[list[str], list[int]]:
    """The name column (column 1) of a table and the column widths: the names shortened together
    (``shorten_names``) to the width the column got; if they need more, the other columns give way for them, and
    only if that is not enough are they cut (``elide_name``)."""
    widths = fit_widths(columns, rows, width, shrink)
    short = shorten_names(names, widths[1])
    need = max((len(s) for s in short), default=0)
    if need > widths[1]:
        rows = [[c if i != 1 else s for i, c in enumerate(r)] for r, s in zip(rows, short)]
        widths = fit_widths(columns, rows, width, tuple((c, max(n, need) if c == 1 else n) for c, n in shrink))
        over = sum(widths) + 2 * (len(widths) - 1) - width
        if over > 0:
            widths[1] = max(widths[1] - over, 6)
    return [s if len(s) <= widths[1] else elide_name(s, widths[1]) for s in short], widths


def _elide(s: str, width: int) -> str:
    """``s`` cut to ``width`` characters with '…' inside: a third of the kept characters from the start, two
    thirds from the end."""
    if len(s) <= width:
        return s
    if width <= 1:
        return s[:width]
    keep = width - 1
    head = keep // 3
    return s[:head] + "…" + s[len(s) - (keep - head):]


def _cut(s: str, width: int) -> str:
    """``s`` cut to ``width`` characters with '…' at the end (type names, statuses, suggestions)."""
    if len(s) <= width:
        return s
    return s[: max(width - 1, 0)] + "…" if width >= 1 else ""


def suggestion_text(layer: LayerReport) -> str:
    """Only where applying it helps: a flagged layer whose problem its weights' scale fixes."""
    # (a row rebuilt from a logdir has no findings: the sink wrote its suggestion only where the live one showed)
    shown = layer.init_fixes or (not layer.findings and layer.status and layer.suggested_scale is not None)
    return f"×{layer.suggested_scale:.3g} ({layer.nonlinearity})" if shown else ""


def use_color(stream: object = None) -> bool:
    """Colour only on a TTY and never when NO_COLOR is set (https://no-color.org: any value, even empty)."""
    stream = sys.stdout if stream is None else stream
    if "NO_COLOR" in os.environ:
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(callable(isatty) and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def fit_widths(columns: tuple[str, ...], rows: list[list[str]], width: int,
               shrink: tuple[tuple[int, int], ...]) -> list[int]:
    """Column widths that fit ``width`` (with two spaces between columns): each column as wide as its widest
    cell, then the columns in ``shrink`` give way, in that order, down to their narrowest."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    gaps = 2 * (len(widths) - 1)
    for col, narrowest in shrink:
        over = sum(widths) + gaps - width
        if over <= 0:
            break
        widths[col] = max(min(widths[col], narrowest), widths[col] - over)
    return widths


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    """``text`` filled to ``width`` columns, prefixed (each paragraph of it)."""
    out: list[str] = []
    for i, para in enumerate(text.splitlines() or [""]):
        out.extend(textwrap.wrap(para, width=width, initial_indent=first if i == 0 else rest,
                                 subsequent_indent=rest, break_on_hyphens=False) or [first if i == 0 else rest])
    return out


def render(report: Report, *, color: bool = False, width: int = 100) -> str:
    """The report as an aligned table, every line at most ``width`` columns; problems marked with '!'.

    The prefix every layer name shares is dropped first (the title names it); a name still too long loses whole
    components from the middle (``encoder.layers.3.…out_proj``), never a block index; type names are in full;
    statuses and suggestions are cut at the end. Below the table one sentence per problem and cause (not one per
    layer), the notes and the run's findings, each wrapped. ``color`` marks flagged
    rows and findings in red (ANSI escapes; see ``use_color``).
    """
    width = max(int(width), 40)
    prefix = common_prefix([layer.name for layer in report.layers])
    rows = []
    for layer in report.layers:
        rows.append([
            str(layer.index), layer.name[len(prefix):] or "(root)", layer.module_type, _fmt(layer.act_mean),
            _fmt(layer.act_std), _fmt(layer.grad_std), _fmt(layer.gain), ",".join(sorted(layer.status)) or "ok",
            suggestion_text(layer),
        ])
    names, widths = name_column([r[1] for r in rows], _COLUMNS, rows, width, _SHRINK)
    for r, n in zip(rows, names):
        r[1] = n

    def paint(text: str, code: str) -> str:
        return code + text + _RESET if color else text

    def line(cells: list[str], flagged: bool = False) -> str:
        out = "  ".join((c if i == 1 else _cut(c, w)).ljust(w) if i in _LEFT else c.rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths)))
        out = out.rstrip()[:width]
        return paint(out, _RED) if flagged else out

    title = f"torchdiag report, step {report.step}" + (" (gradient rescale ON)" if report.rescale_grads else "")
    if prefix:
        title += f"; layers under '{elide_name(prefix[:-1], max(width - len(title) - 16, 12))}'"
    lines = [title[:width]]
    if report.cadence:
        lines.extend(_wrap(report.cadence, width, "recorded: ", "  "))
    lines.append(line(list(_COLUMNS)))
    for layer, cells in zip(report.layers, rows):
        lines.append(line(cells, bool(layer.status)))
    if report.first_nonfinite:
        lines.extend(paint(x, _RED) for x in _wrap(f"first non-finite output: {report.first_nonfinite}", width,
                                                    "", "  "))
    if report.nonfinite_origin is not None:
        lines.extend(paint(x, _RED) for x in _wrap(str(report.nonfinite_origin), width, "! ", "  "))
    for spike in report.loss_spikes:
        lines.extend(paint(x, _RED) for x in _wrap(spike.message, width, "! ", "  "))
    items = [(layer.name, f.problem, f.direction, f.cause, f.message)
             for layer in report.flagged for f in layer.findings]
    kinds = [layer.module_type for layer in report.flagged for _ in layer.findings]
    for text in one_story(items, kinds):
        lines.extend(paint(x, _RED) for x in _wrap(text, width, "! ", "  "))
    for note in report.notes:
        lines.extend(_wrap(note, width, "note: ", "  "))
    if report.run_findings:
        lines.extend(paint(x, _RED) for x in _wrap(run_lines(report.run_findings), width, "run: ", "  "))
    if not report.layers and not report.flagged:
        pass  # nothing recorded: the notes say so
    elif not report.flagged:
        lines.append(paint("no problems found" if not report.run_findings else
                           f"no problems at step {report.step} (the run's findings are above)", _GREEN))
    return "\n".join(lines)


def one_story(items: list[tuple[str, str, str | None, str | None, str]],
              types: list[str] | None = None) -> list[str]:
    """One sentence per problem and cause, from ``(layer, problem, direction, cause, message)`` items: the cause's
    own sentence (or the first layer's), with what it covers (``others``; ``types``: each item's module type)."""
    groups: dict[tuple, list] = {}
    kinds = types if types is not None else [""] * len(items)
    for (layer, problem, direction, cause, message), kind in zip(items, kinds):
        groups.setdefault((problem, direction, cause if cause is not None else layer), []).append(
            (layer, message, kind))
    out = []
    for (_, _, cause), members in groups.items():
        lead = next((m for m in members if m[0] == cause), members[0])
        rest = [kind for m in members if m is not lead for kind in [m[2]]]
        phrase = others(lead[2], rest)
        out.append(lead[1] + (f" ({phrase})" if phrase else ""))
    return out


def others(kind: str, kinds: list[str]) -> str:
    """What a finding covers besides its lead layer, counted by kind: 'and 24 more Linear layers, 24 ReLU'
    (``kind``: the lead's module type, ``kinds``: the others'); '' for none."""
    if not kinds:
        return ""
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    same = counts.pop(kind, 0)
    parts = [f"and {same} more {kind + ' ' if kind else ''}layer{'s' if same > 1 else ''}"] if same else []
    parts += [f"{n} {k or 'other'}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if not same:
        parts[0] = "and " + parts[0]
    return ", ".join(parts)


def run_lines(findings: list[RunFinding]) -> str:
    """The run's findings (``torchdiag._diagnose.verdict.RunFinding``), one line per problem and cause."""
    shown: dict[tuple, list] = {}
    for f in findings:
        shown.setdefault((f.problem, f.direction, f.cause or f.layer), []).append(f)
    lines = [f"{len(shown)} problem(s) on {len({f.layer for f in findings})} layer(s) during the run"]
    for (problem, direction, cause), fs in shown.items():
        first = min(f.first_step for f in fs)
        state = "recovered" if all(f.recovered for f in fs) else "persists"
        where = f" ({direction})" if direction else ""
        more = f" and {len(fs) - 1} more layers" if len(fs) > 1 else ""
        lines.append(f"{problem}{where} from step {first}, {state}: '{cause}'{more}")
    return "\n".join(lines)
