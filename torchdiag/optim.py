"""Optimizer hooks: update-to-weight ratio, pre-clip gradient norm, GradScaler's scale.

With ``watch(..., optimizer=opt)`` a step is an optimizer step. On recorded steps:

* each parameter's gradient sum of squares is taken when autograd finishes accumulating it
  (``register_post_accumulate_grad_hook``), i.e. before any clipping the user does later;
* the optimizer's step pre-hook takes the same sum after the user's clipping (so clipping is
  seen without touching the user's code) and snapshots the watched weights;
* the post-hook takes ``||w_new - w_old||^2`` and ``||w_old||^2`` per watched layer, releases
  the snapshot, and ends the watcher's step.

All of it is on-device 0-d tensors written into the step buffer; the host reads them with
the rest of the step, once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import stats


def _sumsq_grad(g: torch.Tensor) -> torch.Tensor:
    if g.is_sparse:
        g = g.coalesce().values()
    return stats.sumsq(g)


class OptimizerMonitor:
    """Hooks on one optimizer and the parameters it steps; see the module docstring."""

    def __init__(self, optimizer: Any, recorder: Any, layer_weights: list[tuple[int, torch.Tensor]],
                 end_step: Callable[[], None], scaler: Any = None) -> None:
        self._recorder = weakref.ref(recorder)
        self._layers = [(slot, weakref.ref(w)) for slot, w in layer_weights]
        self._end_step = end_step
        self._scaler = scaler
        self._params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._acc: dict[int, torch.Tensor] = {}
        self._prev: dict[int, torch.Tensor] = {}
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]
        if hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            for p in self._params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._accumulated))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._prev, self._acc = [], {}, {}

    def _recording(self) -> Any:
        rec = self._recorder()
        return rec if rec is not None and rec.recording and not rec.closed else None

    def _accumulated(self, p: torch.Tensor) -> None:
        if self._recording() is not None and p.grad is not None:
            self._acc[id(p)] = _sumsq_grad(p.grad)  # the latest accumulation is the full gradient

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        rec = self._recording()
        if rec is None:
            return
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            post = torch.stack([_sumsq_grad(g) for g in grads]).sum()
            pre = torch.stack(list(self._acc.values())).sum() if self._acc else post
            rec.write_step_value("clip", [pre.to(post.device), post], grads[0].device)
        self._acc = {}
        for slot, ref in self._layers:
            w = ref()
            if w is not None:
                self._prev[slot] = w.detach().clone()

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        rec = self._recording()
        if rec is not None:
            for slot, ref in self._layers:
                w, prev = ref(), self._prev.get(slot)
                if w is not None and prev is not None:
                    d = (w.detach() - prev).reshape(-1).float()
                    rec.write_update(slot, w.numel(), w.device, [torch.dot(d, d), stats.sumsq(prev)])
            self._prev = {}
        self._end_step()
