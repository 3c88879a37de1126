"""The pipeline's units wired by hand, without a Watcher: taxonomy -> capture -> step buffer -> recorder."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from torchdiag._capture import capture
from torchdiag._layers import taxonomy
from torchdiag._record.buffer import Recorder
from torchdiag.config import resolve_config


@contextlib.contextmanager
def recording(model: nn.Module, every: int = 1, histogram_every: int = 0) -> Iterator[Recorder]:
    """A recorder whose capture is attached to every module ``watch`` would select; no auto-step, no sinks."""
    cfg = resolve_config(None)
    chosen = taxonomy.select_modules(model, cfg)
    modules = [m for _, m in chosen]
    slots = [taxonomy.describe(n, m, is_layer=True, is_root=m is model, saturation_level=cfg.saturation_level)
             for n, m in chosen]
    if not any(m is model for m in modules):
        modules.append(model)
        slots.append(taxonomy.describe("", model, is_layer=False, is_root=True, saturation_level=cfg.saturation_level))
    rec = Recorder(slots, modules, every, on_auto_step=lambda: None, histogram_every=histogram_every)
    rec.capture.auto_step = False
    capture.attach(rec.capture, modules, roots=[i for i, s in enumerate(slots) if s.is_root])
    capture.set_recording(rec.capture, rec.recording)
    try:
        yield rec
    finally:
        rec.close()
        capture.detach([weakref.ref(m) for m in modules])


def spy(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Independent copies of each direct child's output and of the gradient at it (of its last call), by name:
    the plain tensors a test computes its expected statistics from."""
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            acts[name] = out.detach().clone()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))
        return hook

    for name, m in model.named_children():
        m.register_forward_hook(keep(name))
    return acts, grads


def hook_ids(table: dict) -> set[int]:
    """The ids of torchdiag's hooks in one of PyTorch's process-wide hook tables
    (``torch.nn.modules.module._global_forward_hooks``, ``_global_forward_pre_hooks``)."""
    return {i for i, h in table.items() if getattr(h, "__module__", "").startswith("torchdiag")}
