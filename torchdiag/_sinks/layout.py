"""The custom-scalars layout of a run: one chart per metric, one per repeated block, the step totals; only
charts whose tags exist."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .._report.tags import DEFICIT, FLAGGED_TAG, LOG10, PROBLEM_HEAD, SCALARS, STEP_TAGS, layer_tag


def block_of(name: str) -> str | None:
    """The repeated block a layer belongs to: its name up to the first block index (``encoder.layers.3``),
    else its top-level module (``stem`` of ``stem.conv``); None for a top-level layer (``0``, ``head``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else None


def custom_layout(layer_names: Iterable[str], metrics: Iterable[str], step_tags: Iterable[str] = (),
                  ) -> dict[str, dict[str, list]]:
    """The custom-scalars layout, with a chart only for tags that exist: one chart per metric written (all
    layers, one line each; the stds as their log10 tags, the attention entropy as its deficit), one per repeated
    block of two layers or more (its layers' log10 act_std and grad_std together), and the step totals (flagged
    layers in all and per problem, optimizer, AMP)."""
    metrics = set(metrics)
    per_metric = {}
    for m in SCALARS.values():
        if m in metrics:
            title, tag = (f"{m} (log10)", LOG10[m]) if m in LOG10 else \
                (f"{m}: log10(1 - {m})", DEFICIT[m]) if m in DEFICIT else (m, m)
            per_metric[title] = ["Multiline", [f"^{re.escape(tag)}/"]]
    groups: dict[str, int] = {}
    for name in layer_names:
        b = block_of(layer_tag(name))
        if b is not None:
            groups[b] = groups.get(b, 0) + 1
    blocks = {}
    if "act_std" in metrics or "grad_std" in metrics:
        wanted = [b for b, n in groups.items() if n >= 2]
        for b in wanted if len(wanted) <= 64 else []:
            esc = re.escape(b)
            blocks[f"{b}: log10 act_std (forward) and log10 grad_std (backward)"] = [
                "Multiline", [rf"^log10_act_std/{esc}(\.|$)", rf"^log10_grad_std/{esc}(\.|$)"]]
    step_tags = set(step_tags)
    flagged = [f"^{re.escape(FLAGGED_TAG)}$"]
    if any(t.startswith(PROBLEM_HEAD + "/") for t in step_tags):  # the per-problem counts, once there are any
        flagged.append(f"^{re.escape(PROBLEM_HEAD)}/")
    totals = {"flagged layers (count), in all and per problem": ["Multiline", flagged]}
    for tag in STEP_TAGS:
        if tag in step_tags:
            totals[tag] = ["Multiline", [f"^{re.escape(tag)}$"]]
    layout = {"torchdiag: one chart per metric, one line per layer": per_metric}
    if blocks:
        layout["torchdiag: repeated blocks, forward and backward (log10 std)"] = blocks
    layout["torchdiag: per step"] = totals
    return layout
