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

Under torch.distributed (``distributed=True``) sharded parameters (FSDP2's DTensor) are read through
their local shard, so every figure is a sum over shards that the step's all_reduce completes; the
gradient sums of squares are written split into sharded and replicated parts (a replicated gradient
is the same on every rank). DDP averages gradients after autograd has accumulated them, so there the
pre-clip sum is taken at the very end of backward (a callback queued behind DDP's own), not per
parameter.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .._reduce.dtensor import is_sharded, local_tensor
from .._stats import stats
from .._vocab import Role

if TYPE_CHECKING:
    from .._layers.taxonomy import Slot
    from .._record.buffer import Recorder


def _sumsq_grad(g: torch.Tensor) -> torch.Tensor:
    g = local_tensor(g)
    if g.is_sparse:
        g = g.coalesce().values()
    return stats.sumsq(g)


_ENGINE = torch.autograd.Variable._execution_engine


class OptimizerMonitor:
    """Hooks on one optimizer and the parameters it steps; see the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer, recorder: Recorder,
                 layer_weights: list[tuple[int, torch.Tensor]], end_step: Callable[[], None],
                 scaler: torch.amp.GradScaler | None = None, distributed: bool = False) -> None:
        self._recorder = weakref.ref(recorder)
        self._distributed = distributed
        self._queued = False  # distributed: an end-of-backward measurement is queued
        self._pre_sums: tuple[torch.Tensor, torch.Tensor] | None = None  # distributed: (all, sharded) pre-clip
        self._layers = [(slot, weakref.ref(w)) for slot, w in layer_weights]
        self._end_step = end_step
        self._scaler = scaler
        self._params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._acc: dict[int, torch.Tensor] = {}
        self._prev: dict[int, torch.Tensor] = {}
        self.keep_all = False  # also snapshot the other parameters (the non-finite origin's replay needs them all)
        self._others: dict[int, torch.Tensor] = {}  # id(param) -> its value before the update
        self._pre_update: dict[int, torch.Tensor] = {}  # id(param) -> before the update, for the step ending now
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]
        if hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            for p in self._params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._accumulated))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._prev, self._acc, self._pre_sums = [], {}, {}, None
        self._others, self._pre_update = {}, {}

    def _recording(self) -> Recorder | None:
        rec = self._recorder()
        return rec if rec is not None and rec.recording and not rec.closed else None

    def _accumulated(self, p: torch.Tensor) -> None:
        if self._recording() is None or p.grad is None:
            return
        if not self._distributed:
            self._acc[id(p)] = _sumsq_grad(p.grad)  # the latest accumulation is the full gradient
        elif not self._queued:
            try:
                _ENGINE.queue_callback(self._after_backward)
                self._queued = True
            except RuntimeError:  # not inside the autograd engine: take the gradients as they are now
                self._measure_pre()

    def _after_backward(self) -> None:
        # the callbacks queued during backward (DDP's finalize, which writes the averaged gradients) run
        # before this one; queued from here, the measurement runs after all of them
        try:
            _ENGINE.queue_callback(self._after_callbacks)
        except RuntimeError:
            self._after_callbacks()

    def _after_callbacks(self) -> None:
        self._queued = False
        try:
            self._measure_pre()
        except Exception:  # noqa: BLE001 - never break the user's backward; the pre-clip norm is then the post
            self._pre_sums = None

    def _grad_sums(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum of squares of every gradient, of the sharded ones), this rank's shards only."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return None
        parts = [_sumsq_grad(g) for g in grads]
        device = parts[0].device
        total = torch.stack([x.to(device) for x in parts]).sum()
        sharded = [x.to(device) for x, g in zip(parts, grads) if is_sharded(g)]
        return total, torch.stack(sharded).sum() if sharded else total.new_zeros(())

    def _measure_pre(self) -> None:
        if self._recording() is not None:
            self._pre_sums = self._grad_sums()

    def _pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        rec = self._recording()
        if rec is None:
            return
        post = self._grad_sums()  # after the user's clipping: what the optimizer sees
        if post is not None:
            device = post[0].device
            if self._distributed:  # (all, sharded) taken after DDP averaged, before clipping
                pre = self._pre_sums if self._pre_sums is not None else post
                rec.write_step_value("clip", [pre[0].to(device), post[0], pre[1].to(device), post[1]], device)
            else:  # each parameter's latest accumulation, before clipping
                pre_total = torch.stack([a.to(device) for a in self._acc.values()]).sum() if self._acc else post[0]
                rec.write_step_value("clip", [pre_total, post[0]], device)
        self._pre_sums, self._queued, self._acc = None, False, {}
        for slot, ref in self._layers:
            w = ref()
            if w is not None:
                self._prev[slot] = local_tensor(w.detach()).clone()  # FSDP2: this rank's shard
        if self.keep_all and not self._distributed:
            layer_ids = {id(ref()) for _, ref in self._layers}
            self._others = {id(p): p.detach().clone() for p in self._params if id(p) not in layer_ids}

    def _post(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        rec = self._recording()
        if rec is not None:
            for slot, ref in self._layers:
                w, prev = ref(), self._prev.get(slot)
                if w is not None and prev is not None:
                    w = local_tensor(w.detach())
                    if w.numel() == 0:  # an empty shard
                        continue
                    rec.write_update(slot, w.numel(), w.device, [stats.sumsq(w - prev), stats.sumsq(prev)])
            if self.keep_all and not self._distributed:
                self._pre_update = dict(self._others)
                for slot, ref in self._layers:
                    w = ref()
                    if w is not None and slot in self._prev:
                        self._pre_update[id(w)] = self._prev[slot]
            self._prev, self._others = {}, {}
        try:
            self._end_step()
        finally:
            self._pre_update = {}

    def pre_update(self) -> dict[int, torch.Tensor]:
        """While the step that ``opt.step()`` ends is published: ``id(param) -> its value before the update``."""
        return self._pre_update


def watched_weights(optimizer: torch.optim.Optimizer, slots: list[Slot], modules: list[torch.nn.Module]
                    ) -> list[tuple[int, torch.Tensor]]:
    """``(slot, main weight)`` of the watched weighted and norm layers whose weight ``optimizer`` steps: another
    optimizer's layers get no update ratio."""
    weights = [(i, getattr(m, slot.weight_name)) for i, (slot, m) in enumerate(zip(slots, modules))
               if slot.is_layer and slot.role in (Role.WEIGHTED, Role.NORM) and slot.weight_name is not None]
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [(i, w) for i, w in weights if id(w) in owned]
