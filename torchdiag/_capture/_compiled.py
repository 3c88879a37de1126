"""The compiled path: under ``torch.compile`` the hooks are traced into the graph, with no graph break.

While Dynamo traces a model, the global module hooks (``capture``) come here instead of running eagerly. The
code below is written for Dynamo to trace: a lookup of the module in a plain dict keyed by ``id(module)``
(``_PLANS``: Dynamo guards on that one key, so an unwatched model's graph does not depend on any watch), a
read of the watch's ``Gate.on`` (a guard Dynamo specialises on: at most two graphs per model, recorded and
not, and no recompilation per step; a later watch of the same modules with the same plans takes the same gate
back, so its graphs are re-used and the number of graphs stays bounded over any number of watches), and torch
ops whose results are added in place into ``Gate.acc``, a float64 tensor the watch owns (the graph mutates it;
inductor fuses the reductions with each other and, where it can, with the kernel that produced the tensor).
Gradients: each watched output goes through ``_Tap``, an identity whose backward returns the gradient's row as
the gradient of ``Gate.probe``; autograd sums the rows of every backward into ``probe.grad`` (nothing is
mutated in a backward graph: see ``Gate``).

Rows are power sums, so that every call of a step adds to them (microbatches, shared modules): per call
the float32 sums about the tensor's first element ``r`` (no cancellation), turned into sums about zero in
float64 before they are added. ``acc[slot, kind]`` holds ``[calls, n, sum(x), sum(x^2), nonzero count,
saturated count, -min, max]``. At the end of a recorded step the recorder hands ``acc + probe.grad`` to the
step buffer (the same one host copy as eager rows) and starts new ones.

What the compiled path does not trace (the eager hooks do): which recorded output a layer reads (so no
functional activation is inferred between layers and ``feeds_norm`` is not learned under compile), modules
inside a higher-order op's body (activation checkpointing re-runs it in backward), ``torch.func`` transforms,
histograms, gradients taken with ``torch.autograd.grad`` (they never reach ``probe.grad``), outputs other than
a tensor or a tuple/list of tensors (no gradient row). Under ``model.compile()`` or a compiled step function no
hook runs eagerly, so a step ends at ``diag.step()`` or ``opt.step()`` (``optimizer=``) only (said once);
``torch.compile(model)`` keeps auto-steps (its wrapper's hooks run eagerly).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .._stats.stepbuffer import COMPILED_COLS, COMPILED_KINDS
from .._vocab import Row
from .runtime import iter_float_tensors

if TYPE_CHECKING:
    import weakref

    from .._layers.taxonomy import Slot
    from .capture import Capture

# the compiled accumulator's layout (``stepbuffer.COMPILED_KINDS``, ``COMPILED_COLS``): the place of each row kind
ACT, GRAD, INPUT, ROOT_IN, ROOT_GRAD = (COMPILED_KINDS.index(k) for k in (Row.ACT, Row.GRAD, Row.INPUT, Row.ROOT_IN,
                                                                          Row.ROOT_GRAD))
KINDS, COLS = len(COMPILED_KINDS), COMPILED_COLS

_F32, _F64 = torch.float32, torch.float64


class Plan(NamedTuple):
    """What the traced hook needs to know of a watched module: constants Dynamo guards on (one dict key)."""

    gate: int  # key of its watch's Gate in _GATES
    slot: int
    is_layer: bool
    is_root: bool
    weighted: bool
    zeros: bool  # count exact zeros of its output (ReLU family)
    saturation: bool  # count elements with |x - sat_centre| > sat_half (tanh/sigmoid); never NaN: a guard
    sat_centre: float
    sat_half: float


class Gate:
    """One watch's state as the compiled graphs see it: ``on`` (its current step is recorded), the
    accumulators the graphs add to, and what tracing learnt (which slots are in a recorded graph, in order).

    Forward rows are added in place into ``acc``. Gradient rows never are: a backward graph keeps what it
    mutates from its forward as a saved tensor, version-checked, so two invocations of a graph before one
    backward (summed microbatches), or a module shared across two graphs, would raise in the user's backward.
    Instead each tapped output's gradient row comes back as the gradient of ``probe`` (a leaf that requires
    grad and that nothing else reads): autograd sums those rows into ``probe.grad`` over every backward."""

    def __init__(self, key: int, slots: int, device: torch.device, record_eval: bool) -> None:
        self.key = key
        self.on = False
        self.record_eval = record_eval
        self.slots = slots
        self.device = device
        self.dtype = _F32 if device.type == "mps" else _F64  # (MPS has no float64)
        self.probe = torch.zeros((slots, KINDS, COLS), dtype=self.dtype, device=device, requires_grad=True)
        self.acc = self.probe.detach()  # (replaced by reset)
        self.traced: dict[int, int] = {}  # slot -> position in trace order, of layers in a recorded graph
        self.reset()
        self.capture: weakref.ref[Capture] | None = None  # the watch's Capture (read while Dynamo traces)
        self.said_no_auto_step = False
        self.plans: tuple[Plan, ...] = ()  # its modules' plans: a later watch with the same ones re-uses the gate
        self.lease = 0  # of the watch holding it: a finalizer of an earlier watch leaves a later one's gate alone

    def reset(self) -> None:
        """A new step: a new forward accumulator (nothing edits the old one in place) and no gradient rows."""
        acc = torch.zeros((self.slots, KINDS, COLS), dtype=self.dtype, device=self.device)
        acc[..., 6:] = -math.inf
        self.acc = acc
        self.probe.grad = None

    def block(self) -> torch.Tensor:
        """This step's rows, forward and backward: ``[slots, kinds, cols]``."""
        g = self.probe.grad
        return self.acc if g is None else self.acc + g


_PLANS: dict[int, Plan] = {}  # id(module) -> Plan, for modules of open watches
_GATES: dict[int, Gate] = {}
_KEYS = itertools.count(1)
_WRAPPED: set[int] = set()  # gate keys whose root is being called through an OptimizedModule right now


_POOL: dict[tuple[int, ...], Gate] = {}  # the ids of a watch's modules -> its gate, kept for a later watch
_LEASES = itertools.count(1)


def new_gate(modules: tuple[int, ...], infos: Sequence[Slot], device: torch.device, record_eval: bool) -> Gate:
    """The gate of a watch of ``modules`` (their ids, in slot order; ``infos`` their slots), with its ``plans``.
    A gate is keyed by the modules, not by the watch: Dynamo guards on its key (in the plans), so a new key per
    watch would compile new graphs at every watch of a compiled model, until its recompile limit left the model
    running eagerly for the rest of the process. A closed watch's gate is taken back when its plans, device and
    ``record_eval`` are this watch's: its graphs, and what they traced (``traced``), hold as they are."""
    g = g0 = _POOL.get(modules)
    if g is not None and _free(g) and g.device == device and g.record_eval == record_eval \
            and g.plans == tuple(plan_for(i, info, g) for i, info in enumerate(infos)):
        g.on = False
        g.capture = None
        g.reset()
        g.lease = next(_LEASES)
        return g
    g = Gate(next(_KEYS), len(infos), device, record_eval)
    g.plans = tuple(plan_for(i, info, g) for i, info in enumerate(infos))
    g.lease = next(_LEASES)
    _GATES[g.key] = g
    if modules and (g0 is None or _free(g0)):
        if g0 is not None:  # (replaced: its graphs' guards fail from now on)
            _GATES.pop(g0.key, None)
        _POOL[modules] = g
    return g


def _free(gate: Gate) -> bool:
    """No open watch holds ``gate``."""
    cap = gate.capture() if gate.capture is not None else None
    return cap is None or bool(getattr(cap, "closed", False))


def register(module_id: int, plan: Plan) -> None:
    _PLANS[module_id] = plan


def plan_for(slot: int, info: Slot, gate: Gate) -> Plan:
    sat = info.saturation
    return Plan(gate=gate.key, slot=slot, is_layer=info.is_layer, is_root=info.is_root,
                weighted=info.kind == "weighted", zeros=bool(info.relu_family or info.count_zeros),
                saturation=sat is not None, sat_centre=0.0 if sat is None else float(sat[0]),
                sat_half=0.0 if sat is None else float(sat[1]))


# ------------------------------------------------------------------ trace-time notes (not traced)
def _constant(fn: Any) -> Any:
    """``torch._dynamo.assume_constant_result`` without importing Dynamo (seconds) into every watch: Dynamo
    calls such a function while it traces and puts its result in the graph as a constant."""
    fn._dynamo_marked_constant = True
    return fn


@_constant
def _traced(key: int, slot: int) -> int:
    """Called by Dynamo while it traces (never at run time): slot ``slot`` is in a recorded graph."""
    gate = _GATES.get(key)
    if gate is not None:
        gate.traced.setdefault(slot, len(gate.traced))
    return 0


@_constant
def _traced_root(key: int) -> int:
    """Called by Dynamo while it traces the root's forward. Outside torch.compile(model)'s wrapper
    (``model.compile()``, a compiled training step) no hook runs eagerly at the root's forward, so auto-steps
    cannot happen: said once."""
    gate = _GATES.get(key)
    cap = gate.capture() if gate is not None and gate.capture is not None else None
    if gate is not None and cap is not None and cap.auto_step and key not in _WRAPPED and not gate.said_no_auto_step:
        gate.said_no_auto_step = True
        from ..errors import warn_self

        warn_self("torchdiag: the watched model runs inside a compiled graph that no eager hook enters"
                  " (model.compile() or a compiled training step): its forward cannot end a step, so steps end"
                  " only at diag.step(), or at opt.step() with watch(..., optimizer=opt); torch.compile(model)"
                  " keeps automatic steps")
    return 0


@_constant
def _in_subgraph() -> bool:
    """Whether Dynamo is tracing the body of a higher-order op (activation checkpointing, ``torch.cond``...):
    the graph there may run again in backward (checkpointing re-runs it), so nothing is added from inside."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return tx is not None and tx.output.current_tracer.parent is not None
    except Exception:  # noqa: BLE001 - another Dynamo: assume the top-level graph
        return False


# ------------------------------------------------------------------ traced hooks
def _sums(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """sum(x) and sum(x^2) in float64, from float32 sums about the first element (one fused read). No reshape:
    the reductions take the tensor in its own layout (flattening a channels-last activation would copy it)."""
    f = x.detach()
    n = f.numel()
    r = f[(0,) * f.dim()].to(_F32)
    d = f.to(_F32) - r
    s = d.sum()
    q = (d * d).sum()
    r64, s64 = r.to(dtype), s.to(dtype)
    return s64 + n * r64, q.to(dtype) + 2.0 * r64 * s64 + n * r64 * r64, float(n)


def _add(acc: torch.Tensor, kind: int, x: torch.Tensor, calls: float, act: Plan | None) -> None:
    """Add ``x``'s row into ``acc[kind]`` (``acc``: one slot's [kinds, cols])."""
    dt = acc.dtype
    s, q, n = _sums(x, dt)
    one = torch.ones((), dtype=dt, device=x.device)
    nan = one * math.nan
    if act is None:
        row = torch.stack((one * calls, one * n, s, q, nan, nan))
    else:
        f = x.detach()
        nz = (f != 0).sum(dtype=dt) if act.zeros else nan
        if not act.saturation:
            sat = nan
        else:
            sat = ((f.to(_F32) - act.sat_centre).abs() > act.sat_half).sum(dtype=dt)
        row = torch.stack((one * calls, one * n, s, q, nz, sat))
        ext = torch.stack((-f.amin().to(dt), f.amax().to(dt))).to(acc.device)
        acc[kind, 6:] = torch.maximum(acc[kind, 6:], ext)
    acc[kind, :6] += row.to(acc.device)


class _Tap(torch.autograd.Function):
    """The identity on a module's output (a copy, so that in-place ops after it stay legal), whose backward
    returns the gradient's row ``[0, n, sum, sum of squares]`` at ``(slot, kind)`` as the gradient of the
    watch's probe. Traced by Dynamo into the forward and backward graphs; nothing is mutated in either."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, probe: torch.Tensor, slot: int, kinds: tuple) -> torch.Tensor:
        ctx.slot, ctx.kinds = slot, kinds
        ctx.probe_shape, ctx.probe_dtype, ctx.probe_device = probe.shape, probe.dtype, probe.device
        return t.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        s, q, n = _sums(g, ctx.probe_dtype)
        zero = torch.zeros((), dtype=ctx.probe_dtype, device=g.device)
        row = torch.stack((zero, zero + n, s, q)).to(ctx.probe_device)
        pg = torch.zeros(ctx.probe_shape, dtype=ctx.probe_dtype, device=ctx.probe_device)
        for k in ctx.kinds:
            pg[ctx.slot, k, :4] = row
        return g, pg, None, None


def _tap(output: Any, gate: Gate, slot: int, kinds: tuple) -> Any:
    """``output`` with each floating tensor that requires grad tapped (a tensor, or a tuple or list of them);
    None: leave the output as it is (nothing to tap, or a structure not rebuilt here)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point() and output.requires_grad and output.numel() > 0:
            return _Tap.apply(output, gate.probe, slot, kinds)
        return None
    if type(output) in (tuple, list):
        items = [_tap(o, gate, slot, kinds) for o in output]
        if all(i is None for i in items):
            return None
        return type(output)(o if i is None else i for o, i in zip(output, items))
    return None


def on_pre(module: Any, args: tuple) -> None:
    """The forward pre-hook while Dynamo traces: the model's input."""
    p = _PLANS.get(id(module))
    if p is None or not p.is_root:
        return
    gate = _GATES.get(p.gate)
    if gate is None or not gate.on or not torch.is_grad_enabled():
        return
    if not (module.training or gate.record_eval) or _in_subgraph():
        return
    _traced_root(p.gate)
    for x in iter_float_tensors(args):
        _add(gate.acc[p.slot], ROOT_IN, x, 0.0, None)


def on_forward(module: Any, args: tuple, output: Any) -> Any:
    """The forward hook while Dynamo traces: the output's row, a weighted layer's input, and the output
    tapped for its gradient's row (returned: the module's output from here on; None: unchanged)."""
    p = _PLANS.get(id(module))
    if p is None:
        return None  # not watched: the graph is the model's own
    gate = _GATES.get(p.gate)
    if gate is None or not gate.on or not torch.is_grad_enabled():
        return None
    if not (module.training or gate.record_eval) or _in_subgraph():
        return None
    acc = gate.acc
    kinds: tuple = ()
    if p.is_layer:
        _traced(p.gate, p.slot)
        calls = 1.0
        for t in iter_float_tensors(output):
            _add(acc[p.slot], ACT, t, calls, p)
            calls = 0.0
        if calls:  # no floating output: the call still counts
            acc[p.slot, ACT, 0] += 1.0
        if p.weighted:
            for x in iter_float_tensors(args):
                _add(acc[p.slot], INPUT, x, 0.0, None)
                break
        kinds = (GRAD,)
    if p.is_root:
        kinds = (*kinds, ROOT_GRAD)
    return _tap(output, gate, p.slot, kinds) if kinds else None


# ------------------------------------------------------------------ eager side
def wrapper_call(module: Any, entering: bool) -> int | None:
    """torch.compile(model)'s ``OptimizedModule``, seen by the global hooks eagerly: the gate key of the watched
    root it wraps (its forward starts a step), marked while the call runs."""
    inner = getattr(module, "_orig_mod", None)
    p = _PLANS.get(id(inner)) if inner is not None else None
    if p is None or not p.is_root:
        return None
    if entering:
        _WRAPPED.add(p.gate)
    else:
        _WRAPPED.discard(p.gate)
    return p.gate


def is_wrapped(key: int) -> bool:
    return key in _WRAPPED


def forget_module(module_id: int) -> None:
    _PLANS.pop(module_id, None)


def release_gate(key: int, lease: int) -> None:
    """The watch that held gate ``key`` under ``lease`` is gone: the gate stays for a later watch of its modules,
    off (unless a later watch holds it already)."""
    gate = _GATES.get(key)
    if gate is not None and gate.lease == lease:
        gate.on = False
        _WRAPPED.discard(key)


def drop_gate(key: int, modules: tuple[int, ...]) -> None:
    """Its modules are gone: so is the gate."""
    gate = _GATES.pop(key, None)
    if gate is not None:
        gate.on = False
        if _POOL.get(modules) is gate:
            del _POOL[modules]
    _WRAPPED.discard(key)
