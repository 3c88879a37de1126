"""``NonfiniteOrigin``: where a run's first NaN/Inf was produced (plain data, a leaf)."""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class NonfiniteOrigin:
    """Where the first NaN/Inf of a run (or of a replayed batch) was produced.

    Attributes:
        phase: ``"forward"``, ``"backward"`` or ``"optimizer"``.
        module: qualified name of the innermost module (a watched layer, or a container around layers) during
            whose forward or backward it was produced; ``None`` outside every submodule (in the loss, or in the
            model's own forward body).
        op: the operator that turned finite inputs into a non-finite output (``"aten.log"``, ``"aten.sqrt"``
            for its backward); ``None`` for ``"optimizer"`` and where it could not be replayed.
        parameter: for ``"optimizer"``, the parameter the update made non-finite; for ``"forward"``, a
            parameter that already was non-finite when the forward read it.
        step: the step it was produced at (``None`` from ``locate_nonfinite``).
        source: the user's ``file:line`` of the operator's call, where it is known.
        value: ``"NaN"`` or ``"Inf"`` (the first non-finite value's kind).
        note: how it was found, or why it could not be narrowed down further.
    """

    phase: str
    module: str | None = None
    op: str | None = None
    parameter: str | None = None
    step: int | None = None
    source: str | None = None
    value: str = "NaN"
    note: str | None = None

    def __str__(self) -> str:
        """One line: "NaN first produced by `aten.log` in 'encoder.2.act' (forward, step 41), at train.py:88"."""
        if self.phase == "optimizer":
            head = f"{self.value} first produced by the optimizer's update of '{self.parameter}'"
        elif self.op is not None:
            head = f"{self.value} first produced by `{self.op}`"
            if self.phase == "backward":
                head += "'s backward"
        elif self.parameter is not None:
            head = f"{self.value} already in parameter '{self.parameter}'"
        else:
            head = f"{self.value} first seen"
        where = f" in '{self.module}'" if self.module else ("" if self.phase == "optimizer" else " outside any module")
        when = self.phase if self.step is None else f"{self.phase}, step {self.step}"
        line = f"{head}{where} ({when})"
        if self.source:
            line += f", at {self.source}"
        return line

    def as_dict(self) -> dict[str, str | int | None]:
        """Every field as a plain value (JSON-ready)."""
        return {"phase": self.phase, "module": self.module, "op": self.op, "parameter": self.parameter,
                "step": self.step, "source": self.source, "value": self.value, "note": self.note}
