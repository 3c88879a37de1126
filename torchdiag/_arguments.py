"""Every argument of ``watch()`` checked up front, in one place: a message names the argument, what was
expected and what was received. Nothing is hooked before all of them pass."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from ._capture import capture
from ._reduce import distributed
from ._training import amp, rescale
from .config import Config, ConfigLike, resolve_config
from .errors import TorchDiagError


@dataclasses.dataclass
class WatchArguments:
    """What ``watch()`` goes on with: the model (unwrapped from DDP), its config, the logdir (created and
    writable on the rank that writes) and the process group to reduce over (None: a single process)."""

    model: nn.Module
    config: Config
    logdir: str | None
    group: distributed.Group | None


def check_watch_arguments(model: object, *, logdir: object, writer: object, config: ConfigLike, every: object,
                          rescale_grads: object, scaler: object, optimizer: object, process_group: object,
                          auto_step: object, config_keys: dict[str, object]) -> WatchArguments:
    """Check ``watch()``'s arguments; raise ``TypeError``, ``ValueError``, ``ConfigError`` or ``TorchDiagError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    model = distributed.unwrap(model)  # DDP: the user's model, names without 'module.'
    unknown = sorted(set(config_keys) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise TypeError(f"watch() got an unexpected keyword argument {unknown[0]!r}: besides its own arguments it"
                        f" takes any config key ({', '.join(f.name for f in dataclasses.fields(Config))}), which can"
                        " also go in config= (a dict, a YAML path or a torchdiag.Config)")
    cfg = resolve_config(config, every=every, **config_keys)
    if not isinstance(auto_step, bool):
        raise TypeError(f"watch(auto_step=...): expected True or False, got {auto_step!r} ({type(auto_step).__name__})")
    directory: str | None = None  # the logdir as a str (on every rank: the ones that do not write keep it too)
    if logdir is not None:
        if not isinstance(logdir, (str, bytes, os.PathLike)):
            raise TypeError(f"watch(logdir=...): expected a path (str, bytes or os.PathLike), got {logdir!r}"
                            f" ({type(logdir).__name__})")
        directory = os.fsdecode(logdir)  # a bytes path, as os.fsencode makes it, decoded; a str path as it is
        if "\0" in directory:
            raise ValueError(f"watch(logdir=...): the path holds a NUL byte, which no file system allows: {logdir!r}")
    if directory is not None and writer is not None:
        raise TorchDiagError("watch(): pass either logdir= or writer=, not both")
    if writer is not None and not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(f"watch(writer=...): expected a SummaryWriter (with add_scalar), got {type(writer).__name__}")
    group = distributed.resolve(process_group)
    if directory is not None and (group is None or group.is_writer):  # other ranks never create it
        directory = _check_logdir(directory)
    rescale.check_spec(rescale_grads)
    amp.check_scaler(scaler)
    if optimizer is not None and not callable(getattr(optimizer, "register_step_post_hook", None)):
        raise TypeError(f"watch(optimizer=...): expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if capture.is_watched(model):
        raise TorchDiagError(f"{type(model).__name__} is already being watched; nested watches of one model are not"
                             " supported: leave the first `with torchdiag.watch(...)` block first")
    return WatchArguments(model, cfg, directory, group)


def _check_logdir(logdir: str) -> str:
    path = Path(logdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TorchDiagError(f"watch(logdir=...): cannot create {str(path)!r}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise TorchDiagError(f"watch(logdir=...): {str(path)!r} is not writable")
    return str(path)
