"""Hugging Face ``Trainer`` callback: ``Trainer(..., callbacks=[TorchDiagCallback()])``.

The watch starts at ``on_train_begin`` on the trainer's model, a step ends at each ``on_step_end``
(one optimizer step: the micro-batches of gradient accumulation are one step) and the watch ends at
``on_train_end``. TensorBoard events go to ``logdir`` (default: ``<logging dir>/torchdiag``, where the
logging dir is ``args.logging_dir`` when the installed transformers has it, else ``$TENSORBOARD_LOGGING_DIR``,
else ``<output_dir>/runs``), or into ``writer=`` (a ``SummaryWriter`` of yours, left open);
``logdir=None`` writes none. Every process captures; only the world process zero writes and warns.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("torchdiag.integrations.transformers needs transformers: pip install"
                      " \"torchdiag[transformers]\" (or pip install transformers accelerate)") from e

from .._report.report import Report
from ..watch import Watcher
from . import _common

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainerControl, TrainerState, TrainingArguments

AUTO = "auto"


class TorchDiagCallback(TrainerCallback):
    """Watch the model during ``Trainer.train()``.

    Args:
        logdir: where torchdiag writes TensorBoard events; ``"auto"`` (default) for ``<logging dir>/torchdiag``,
            ``None`` for none.
        **watch_kwargs: any other keyword of ``torchdiag.watch`` (``writer``, ``config``, ``every``,
            ``rescale_grads``...). Unknown keywords and bad config keys raise here.

    Attributes:
        watcher: the ``Watcher`` of the latest training run (``None`` before it); it can still give
            ``report()`` after training.

    If ``train()`` raises, the Trainer calls no callback: call ``callback.close()`` (or let the process end)
    to remove torchdiag's hooks.

    Example:
        >>> diag = TorchDiagCallback(every=10)  # doctest: +SKIP
        >>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[diag]).train()  # doctest: +SKIP
        >>> print(diag.report())  # doctest: +SKIP
    """

    def __init__(self, logdir: str | os.PathLike | None = AUTO, **watch_kwargs: Any) -> None:
        if logdir is not None and logdir != AUTO and watch_kwargs.get("writer") is not None:
            raise TypeError("TorchDiagCallback: pass either logdir= or writer=, not both")
        self.logdir = logdir
        self.watch_kwargs = _common.check_watch_kwargs(watch_kwargs, "TorchDiagCallback")
        self.watcher: Watcher | None = None
        self._open = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: object) -> None:
        self.close()  # a previous train() that raised
        if model is None:
            raise RuntimeError("TorchDiagCallback: the Trainer passed no model to on_train_begin")
        is_zero = bool(getattr(state, "is_world_process_zero", True))
        watch_kwargs = dict(self.watch_kwargs)
        if watch_kwargs.get("writer") is None and self.logdir is not None:
            watch_kwargs["logdir"] = default_logdir(args) if self.logdir == AUTO else self.logdir
        watch_kwargs = _common.for_rank(watch_kwargs, is_zero)
        # TODO(AMP): the Trainer's GradScaler lives in trainer.accelerator, which callbacks are not given; under
        # fp16 the gradient statistics are those of the scaled loss (ratios between layers are unaffected).
        self.watcher = _common.start_watch(model, watch_kwargs)
        self._open = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: object) -> None:
        if self._open and self.watcher is not None:
            self.watcher.step()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave the watch (idempotent): every hook removed, the writer flushed (closed if torchdiag opened it)."""
        if self._open:
            self._open = False
            _common.stop_watch(self.watcher)

    def report(self) -> Report:
        """The diagnosis of the latest recorded step (see ``Watcher.report``)."""
        if self.watcher is None:
            raise RuntimeError("TorchDiagCallback.report(): training has not started yet")
        return self.watcher.report()


def default_logdir(args: TrainingArguments) -> str:
    """``<logging dir>/torchdiag``: ``args.logging_dir`` (transformers < 5), ``$TENSORBOARD_LOGGING_DIR``, or
    ``<output_dir>/runs``."""
    base = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    if not base:
        base = os.path.join(getattr(args, "output_dir", None) or ".", "runs")
    return os.path.join(os.path.expanduser(str(base)), "torchdiag")
