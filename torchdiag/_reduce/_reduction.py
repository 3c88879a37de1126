"""``reduce``: the accumulators of every rank combined, each field by the reduction it declares.

Packs each accumulator's fields (``accumulators.reductions``) into two fixed-shape float64 vectors: one
``all_reduce`` of ``MAX`` (maxima, minima as ``-min``) and one of ``SUM`` (counts, sums, and sums of squares
about a shift every rank knows after the ``MAX``). Knows nothing of what the accumulators measure, nor of
process groups: the group is anything with ``all_reduce(values, op)`` (``distributed.StepReducer``,
``OneRank`` in unit tests), or None in a single process (the identity). ``distributed.reduce`` is this.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import fields
from typing import Protocol, TypeVar

from .accumulators import MAX, MEAN, MIN, SUM, Accumulator, moment_sums, reductions, row_moments

__all__ = ["Collective", "OneRank", "reduce"]

K = TypeVar("K", bound=Hashable)  # an accumulator's key: the caller's, given back
A = TypeVar("A", bound=Accumulator)  # the accumulators' type: given back too


class Collective(Protocol):
    """A group ``reduce`` runs over: an all-reduce of a list of floats, ``op`` ``"max"`` or ``"sum"``."""

    def all_reduce(self, values: list[float], op: str) -> list[float]: ...


class OneRank:
    """A group of one rank: every collective returns what it was given (unit tests of ``reduce``)."""

    def all_reduce(self, values: list[float], op: str) -> list[float]:
        return list(values)


def reduce(accumulators: dict[K, A], group: Collective | None, layout: Sequence[tuple[K, type[A]]] | None = None
           ) -> dict[K, A]:
    """The accumulators of every rank of ``group`` combined, each field by its declared reduction
    (``accumulators.reductions``): the same keys and types, global numbers. ``group=None``: a single process,
    the accumulators as they are.

    ``group`` has ``all_reduce(values, op)`` with op ``"max"`` or ``"sum"`` over a list of floats (a
    ``StepReducer``'s collective, ``OneRank``). ``layout`` lists every key (and its accumulator type) that any
    rank may hold, in the same order on every rank, so that every rank packs the same shape whatever it ran;
    a key absent on a rank (or empty there) adds nothing. Two collectives: one ``MAX`` (maxima, minima as
    ``-min``), then one ``SUM`` (sums, presence, NaN flags, and pooled moments about the centre of the global
    range, which every rank knows after the ``MAX``: a constant tensor gives exactly zero variance).
    Knows nothing of what the accumulators measure.
    """
    if group is None:
        return accumulators
    if layout is None:
        layout = [(k, type(a)) for k, a in accumulators.items()]
    packed = []  # per key: (key, type, its reductions, the rank's accumulator or None)
    mx: list[float] = []
    for key, cls in layout:
        acc = accumulators.get(key)
        if acc is not None and acc.is_empty():
            acc = None
        ops = reductions(cls)
        packed.append((key, cls, ops, acc))
        for name, op in ops:
            if op in (MAX, MIN):
                v = getattr(acc, name) if acc is not None else math.nan  # absent, or NaN: adds nothing
                mx.append(_NEG if math.isnan(v) else (v if op == MAX else -v))
    gmx = group.all_reduce(mx, "max")
    sm: list[float] = []
    shifts, i = [], 0
    for _key, _cls, ops, acc in packed:
        extremes = {}
        for name, op in ops:
            if op in (MAX, MIN):
                extremes[name] = gmx[i] if op == MAX else -gmx[i]
                i += 1
        lo, hi = extremes.get("min", math.nan), extremes.get("max", math.nan)
        c = 0.5 * (lo + hi) if math.isfinite(lo) and math.isfinite(hi) else 0.0
        shifts.append((c, extremes))
        sm.append(1.0 if acc is not None else 0.0)
        for name, op in ops:
            if acc is None:
                sm.append(0.0)
            elif op in (SUM, MEAN):
                sm.append(float(getattr(acc, name)))
            elif op in (MAX, MIN):
                sm.append(1.0 if math.isnan(getattr(acc, name)) else 0.0)
            elif name == "mean":  # POOLED: sum(x - c) and sum((x - c)^2) about the common shift
                n, mean, m2 = (getattr(acc, f) for f in ("n", "mean", "m2"))  # by name, as every field here
                sm.extend(moment_sums(n, mean, m2, c))
            # (POOLED "m2", declared right after "mean": its slot took the second sum)
    gsm = group.all_reduce(sm, "sum")
    out: dict[K, A] = {}
    pos = 0
    for (key, cls, ops, _acc), (c, extremes) in zip(packed, shifts):
        present = gsm[pos]
        values = dict(zip((name for name, _ in ops), gsm[pos + 1:pos + 1 + len(ops)]))
        pos += 1 + len(ops)
        if present <= 0:
            continue
        kwargs: dict[str, float] = {}
        for f in fields(cls):
            op = f.metadata["reduce"]
            v = values[f.name]
            if op in (MAX, MIN):
                kwargs[f.name] = math.nan if v > 0 else extremes[f.name]
            elif op == MEAN:
                kwargs[f.name] = v / present
            elif op == SUM:
                kwargs[f.name] = int(v) if isinstance(f.default, int) else v
        if "mean" in values and values.get("n", 0) > 0:  # POOLED
            kwargs["mean"], kwargs["m2"] = row_moments(values["n"], c, values["mean"], values["m2"])
        acc = cls(**kwargs)
        if not acc.is_empty():
            out[key] = acc
    return out


_NEG = -math.inf
