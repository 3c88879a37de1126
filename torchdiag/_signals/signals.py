"""Signals that precede divergence: attention logits and entropy, the output logits' log Z, gradients near
Adam's epsilon, and the loss. Recorded on recorded steps only, on a bounded sample, as on-device 0-d tensors
read with the step (one ``tolist`` per step).

* attention: ``nn.MultiheadAttention`` (q and k rebuilt from its input projection) and every
  ``F.scaled_dot_product_attention`` call made inside a module whose class name says ``Attention`` (Hugging
  Face's sdpa path, most hand-written blocks); an eager Hugging Face attention that returns its probabilities
  gives their entropy. Per layer: the largest logit ``q.k * scale`` over the allowed keys and the mean over
  heads of the attention's normalised entropy (entropy / log of the number of allowed keys: 1 is uniform, 0 is
  one-hot), on up to ``attention_sample`` evenly spaced queries of the first two sequences;
* output logits: ``log Z = logsumexp`` over the last dimension of the model's output (or its ``.logits``),
  mean over up to 256 rows, and whether its gradient sums to zero along that dimension (what the gradient of
  any softmax cross-entropy does: ``p - y``), which says these are logits of a softmax loss;
* Adam's epsilon: at ``opt.step()`` of a recorded step, each watched weight's gradient rms (one fused norm per
  device; an embedding's over its non-zero entries: unused rows are not small gradients), with its group's ``eps``;
* the loss: ``Watcher.step(loss=...)`` keeps it (detached) until the next recorded step reads it.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, TypedDict, Union

import torch
from torch import nn

from .._capture.globalhooks import FunctionModesLeft, GlobalHooks
from .._capture.runtime import first_float_tensor, is_compiling
from .._reduce.accumulators import AttentionFigures, Figure, GradRms, Largest, MeanFigure
from .._vocab import StepSignals
from ._attention import SDPA, attention_figures, entropy_of_probs, mha_figures

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .._stats.stepbuffer import StepBuffer
    from ..config import Config

    _HookEntry = tuple[nn.Module, Callable[..., None] | None, Callable[..., None] | None]  # GlobalHooks.add's

_LOGIT_ROWS = 256

#: a step's loss as kept until a recorded step reads it: a detached 0-d tensor, or a number
Loss = Union[torch.Tensor, float]


class Measured(TypedDict):
    """What ``Signals.take`` gives for one step, still on the device: per attention layer its largest logit (None
    where only the probabilities were seen) and entropy, the output's log Z and softmax-test figure, per weight its
    mean squared gradient and Adam's eps, and the losses given to ``step(loss=)``."""

    attention: dict[str, tuple[torch.Tensor | None, torch.Tensor]]
    logz: torch.Tensor | None
    softmax: torch.Tensor | None
    adam: dict[str, tuple[torch.Tensor, float]]
    losses: list[tuple[int, Loss]]


class Signals:
    """The hooks of the divergence signals on one watched model; see the module docstring."""

    def __init__(self, model: nn.Module, layers: dict[nn.Module, str], config: Config,
                 recording: Callable[[], bool], optimizer: torch.optim.Optimizer | None = None) -> None:
        self._model = model
        self._names = {m: n for n, m in model.named_modules()}
        self._layers = layers  # watched module -> its name in reports
        self._cfg = config
        self._recording = recording
        self._optimizer = optimizer
        self._handles: list[_HookEntry] = []
        self._name_of: dict[nn.Module, str] = {}
        self._attention: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._sdpa_seen: set[str] = set()
        self._logz: torch.Tensor | None = None
        self._softmax: torch.Tensor | None = None
        self._losses: list[tuple[int, Loss]] = []
        self._adam_meter = AdamGradients({}, set(), recording)
        # on SDPA's stack of running attention modules: a weak reference (an entry left by a forward that never
        # returned, a KeyboardInterrupt, holds nothing of this watch's model)
        self._ref = weakref.ref(self)
        self.attention_layers: list[str] = []  # the names attention figures can have (a fixed cross-rank layout)

    # ------------------------------------------------------------------ wiring
    def install(self) -> None:
        cfg = self._cfg
        if cfg.attention_rules:
            for m in self._model.modules():
                if isinstance(m, nn.MultiheadAttention):
                    self._handles.append(GlobalHooks.add(m, self._mha_pre, self._mha_post))
                elif "attention" in type(m).__name__.lower() and any(True for _ in m.parameters()):
                    self._handles.append(GlobalHooks.add(m, self._attn_pre, self._attn_post))
                else:
                    continue
                self.attention_layers.append(self._name(m))
        if cfg.output_logits_rule:
            self._handles.append(GlobalHooks.add(self._model, post=self._root_post))
        self._opt_handle: RemovableHandle | None = None
        if cfg.adam_epsilon_rule and self._optimizer is not None and _adam_like(self._optimizer):
            self._opt_handle = self._optimizer.register_step_pre_hook(self._adam_meter.pre_step)

    def remove(self) -> None:
        for h in self._handles:
            GlobalHooks.discard(h)
        self._handles = []
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
        SDPA.forget(self._ref)

    def _name(self, m: nn.Module) -> str:
        """The report's name for a module: its own, or its first watched descendant's (a container's q/k/v)."""
        name = self._name_of.get(m)
        if name is None:
            name = self._name_of[m] = self._find_name(m)
        return name

    def _find_name(self, m: nn.Module) -> str:
        if m in self._layers:
            return self._layers[m]
        watched = [sub for sub in m.modules() if sub in self._layers]
        weighted = [sub for sub in watched if any(p.dim() >= 2 for p in sub.parameters(recurse=False))]
        if weighted or watched:  # the q (or qkv) projection, not a dropout registered before it (ALBERT)
            return self._layers[(weighted or watched)[0]]
        return self._names.get(m, type(m).__name__)

    def _on(self) -> bool:
        return not is_compiling() and torch.is_grad_enabled() and self._recording()

    # ------------------------------------------------------------------ attention
    def _mha_pre(self, m: nn.Module, args: tuple) -> None:
        SDPA.enter(self._ref, None)  # its own SDPA call is not counted

    def _mha_post(self, m: nn.MultiheadAttention, args: tuple, kwargs: dict, output: object) -> None:
        SDPA.leave()
        if not self._on():
            return
        try:
            with FunctionModesLeft():
                figs = mha_figures(m, args, kwargs, self._cfg.attention_sample)
        except Exception:  # noqa: BLE001 - an input layout this cannot read: no attention figures for it
            figs = None
        if figs is not None:
            self._attention[self._name(m)] = figs

    def _attn_pre(self, m: nn.Module, args: tuple) -> None:
        SDPA.enter(self._ref, self._name(m) if self._on() else None)  # recorded: its SDPA calls are observed

    def _attn_post(self, m: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        entry = SDPA.leave()
        if entry is not None:
            owner, name = entry
            if owner is self._ref and name is not None and name not in self._sdpa_seen \
                    and isinstance(output, tuple) and len(output) > 1:
                probs = output[1]
                if isinstance(probs, torch.Tensor) and probs.dim() == 4 and probs.is_floating_point():
                    try:  # eager attention returned its probabilities: their entropy (no logits to read)
                        with FunctionModesLeft():
                            figs = (None, entropy_of_probs(probs, self._cfg.attention_sample))
                        self._attention[name] = figs
                    except Exception:  # noqa: BLE001, S110 - not probabilities after all
                        pass

    def on_sdpa(self, name: str, q: object, k: object, mask: object, causal: bool, scale: float | None) -> None:
        with FunctionModesLeft():  # (the observer's own mode is off here; a user's below it too)
            self._sdpa_figures(name, q, k, mask, causal, scale)

    def _sdpa_figures(self, name: str, q: object, k: object, mask: object, causal: bool, scale: float | None) -> None:
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4):
            return
        allowed = additive = None
        if isinstance(mask, torch.Tensor):
            allowed, additive = (mask, None) if mask.dtype == torch.bool else (None, mask)
        try:
            with torch.no_grad():
                figs = attention_figures(q, k, scale=scale, allowed=allowed, additive=additive, causal=causal,
                                         max_queries=self._cfg.attention_sample)
        except Exception:  # noqa: BLE001 - a layout this cannot read
            return
        prev = self._attention.get(name)
        if prev is not None and prev[0] is not None and name in self._sdpa_seen:  # called again: the larger logit
            figs = (torch.maximum(prev[0], figs[0]), torch.minimum(prev[1], figs[1]))
        self._attention[name] = figs
        self._sdpa_seen.add(name)

    # ------------------------------------------------------------------ output logits
    def _root_post(self, m: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self._on():
            return
        with FunctionModesLeft():
            self._logits(output)

    def _logits(self, output: object) -> None:
        """The output logits' mean log-sum-exp over a sample of rows, and a hook for their gradient's figure."""
        t = getattr(output, "logits", None)
        if not isinstance(t, torch.Tensor):
            t = first_float_tensor((output,))
        if t is None or t.dim() < 2 or t.shape[-1] < 2 or t.grad_fn is None:  # (a leaf: a hook would stay on it)
            return
        with torch.no_grad():
            rows = t.detach().reshape(-1, t.shape[-1])
            step = max(1, rows.shape[0] // _LOGIT_ROWS)
            self._logz = torch.logsumexp(rows[::step][:_LOGIT_ROWS].float(), dim=-1).mean()
        try:
            t.register_hook(self._logits_grad)
        except RuntimeError:  # a leaf or a tensor that cannot take hooks
            pass

    def _logits_grad(self, g: torch.Tensor) -> None:
        with torch.no_grad():
            rows = g.detach().reshape(-1, g.shape[-1])
            rows = rows[:: max(1, rows.shape[0] // _LOGIT_ROWS)][:_LOGIT_ROWS].float()
            self._softmax = rows.sum(-1).abs().sum() / rows.abs().sum().clamp(min=1e-30)

    # ------------------------------------------------------------------ Adam's epsilon
    def watch_weights(self, weights: dict[int, str], lookups: AbstractSet[int] = frozenset()) -> None:
        """``id(weight) -> layer name`` of the watched weights Adam's epsilon is compared with; ``lookups``: the ids
        of embedding tables, whose gradient rms is over the rows a batch used."""
        self._adam_meter = AdamGradients(weights, set(lookups), self._recording)

    # ------------------------------------------------------------------ loss
    def add_loss(self, step: int, loss: object) -> None:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise TypeError(f"step(loss=...): expected a scalar loss, got a tensor of shape {tuple(loss.shape)}")
            self._losses.append((step, loss.detach().reshape(())))
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):  # Python and NumPy numbers
            self._losses.append((step, float(loss)))
        else:
            raise TypeError(f"step(loss=...): expected a float or a 0-d tensor, got {type(loss).__name__}")

    # ------------------------------------------------------------------ the step
    def take(self) -> Measured:
        """What this step measured, still on the device (no copy), and start the next step."""
        raw: Measured = {"attention": self._attention, "logz": self._logz, "softmax": self._softmax,
                         "adam": self._adam_meter.take(), "losses": self._losses}
        self._attention, self._sdpa_seen, self._losses = {}, set(), []
        self._logz = self._softmax = None
        return raw


class AdamGradients:
    """At ``opt.step()`` of a recorded step, each watched weight's gradient rms as an Adam-family optimizer sees it
    (unscaled, one fused norm per device), with its group's ``eps``: what ``adam_epsilon`` is judged on."""

    def __init__(self, weights: dict[int, str], lookups: set[int], recording: Callable[[], bool]) -> None:
        self._weights, self._lookups, self._recording = weights, lookups, recording
        self._ms: dict[str, tuple[torch.Tensor, float]] = {}  # weight -> (mean squared gradient, eps)

    def take(self) -> dict[str, tuple[torch.Tensor, float]]:
        ms, self._ms = self._ms, {}
        return ms

    def pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            self._adam_rms(optimizer, kwargs)
        except Exception as e:  # noqa: BLE001 - inside the user's opt.step(): reported, never raised
            from ..errors import warn_self

            warn_self(f"torchdiag: reading the gradients for Adam's epsilon failed ({type(e).__name__}: {e})")

    def _adam_rms(self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> None:
        if not self._recording():
            return
        # a fused optimizer under a GradScaler gets the scale and unscales inside its kernel: divide by it here
        scale = (kwargs or {}).get("grad_scale", getattr(optimizer, "grad_scale", None))
        names, grads, lookups, eps = [], [], [], []
        for group in optimizer.param_groups:
            e = group.get("eps")
            if not isinstance(e, (int, float)) or e <= 0:
                continue
            for p in group["params"]:
                name = self._weights.get(id(p))
                if name is None or p.grad is None or p.grad.is_sparse:
                    continue
                names.append(name)
                grads.append(p.grad.detach())
                lookups.append(id(p) in self._lookups)
                eps.append(float(e))
        if not grads:
            return
        with torch.no_grad():
            by_device: dict[torch.device, list[int]] = {}
            for i, g in enumerate(grads):
                by_device.setdefault(g.device, []).append(i)
            for idx in by_device.values():  # one fused norm per device; a lookup's unused rows are not counted
                norms = torch._foreach_norm([grads[i] for i in idx]) if hasattr(torch, "_foreach_norm") \
                    else [torch.linalg.vector_norm(grads[i]) for i in idx]
                for i, norm in zip(idx, norms):
                    n = torch.count_nonzero(grads[i]).clamp(min=1) if lookups[i] else grads[i].numel()
                    ms = norm.float().square() / n  # the mean square
                    if isinstance(scale, torch.Tensor):
                        ms = ms / scale.to(ms.device).float().reshape(()).square()
                    self._ms[names[i]] = (ms, eps[i])


def layout(attention: Sequence[str], weights: Sequence[str]) -> list[tuple[tuple, type]]:
    """The signal figures a step may hold on any rank (``Recorder.reduce_also``), each with the accumulator that
    declares how it combines: the largest attention logit and the mean entropy over the ranks that measured them,
    the mean log Z, the largest softmax-test figure (the test passes on every rank), each weight's gradient rms over
    every rank's gradient. Losses are not in it: each rank's own."""
    return ([(("attention", n), AttentionFigures) for n in sorted(set(attention))]
            + [(("logz", None), MeanFigure), (("softmax", None), Largest)]
            + [(("adam", w), GradRms) for w in sorted(set(weights))])


def stage(raw: Measured, losses: Sequence[tuple[int, Loss]], buffer: StepBuffer) -> None:
    """Put what ``Signals.take`` gave, with ``losses`` of earlier unrecorded steps, into the step's buffer
    (``StepBuffer.write_signal``): each figure as the accumulator that reduces it (``layout``), its measured fields
    still on the device, to travel to the host in the step's one copy and come back in ``StepStats.signals``
    (``read``)."""
    for name, (top, ent) in raw["attention"].items():
        fields: dict[str, torch.Tensor | float] = {"entropy": ent, "n": 1.0}
        if top is not None:  # (an eager attention's probabilities give the entropy alone)
            fields["top"] = top
        buffer.write_signal(("attention", name), AttentionFigures, fields)
    if raw["logz"] is not None:
        buffer.write_signal(("logz", None), MeanFigure, {"total": raw["logz"], "n": 1.0})
    if raw["softmax"] is not None:
        buffer.write_signal(("softmax", None), Largest, {"value": raw["softmax"]})
    for name, (ms, eps) in raw["adam"].items():
        buffer.write_signal(("adam", name), GradRms, {"sq": ms, "n": 1.0, "eps": eps})
    for i, (step, loss) in enumerate([*losses, *raw["losses"]]):
        buffer.write_signal(("loss", (step, i)), Figure, {"value": loss})


def read(figures: Mapping[tuple, object]) -> StepSignals:
    """The step's signals as plain floats, from the accumulators its step buffer brought back (``StepStats.signals``,
    reduced across ranks where the step was)."""
    out = StepSignals()
    losses = []
    for key, acc in figures.items():
        kind, name = key
        # each kind's figure is the accumulator ``stage`` wrote it as (and ``layout`` reduces it as): the asserts say
        # which
        if kind == "attention":
            assert isinstance(acc, AttentionFigures)
            out.attention[name] = (acc.top if math.isfinite(acc.top) else math.nan,
                                   acc.entropy / acc.n if acc.n else math.nan)
        elif kind == "logz":
            assert isinstance(acc, MeanFigure)
            if acc.n:
                out.logz = acc.total / acc.n
        elif kind == "softmax":
            assert isinstance(acc, Largest)
            out.softmax_output = acc.value < _SOFTMAX_TOLERANCE
        elif kind == "adam":
            assert isinstance(acc, GradRms)
            if acc.n:
                out.adam[name] = (math.sqrt(acc.sq / acc.n), acc.eps / acc.n)
        elif kind == "loss":
            assert isinstance(acc, Figure)
            losses.append((name, acc.value))
    out.losses = [(step, v) for (step, _i), v in sorted(losses, key=lambda kv: kv[0])]
    return out


_SOFTMAX_TOLERANCE = 1e-3  # |sum of the output gradient| / sum of |it| under which the output is a softmax's


def _adam_like(optimizer: torch.optim.Optimizer) -> bool:
    """An optimizer whose update divides by sqrt(v) + eps: every group has ``eps`` and ``betas``."""
    groups = getattr(optimizer, "param_groups", None) or []
    return bool(groups) and all("eps" in g and "betas" in g for g in groups)


