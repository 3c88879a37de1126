"""Lightning callback: ``trainer = Trainer(callbacks=[TorchDiagCallback()])``.

The watch starts at fit start on the ``LightningModule``, a step ends after each optimizer step
(``on_train_batch_end`` once ``on_before_optimizer_step`` has run, so the micro-batches of gradient
accumulation are one step), and the watch ends with training (or with the exception that stops it).

TensorBoard: with no ``logdir=``/``writer=`` given, torchdiag writes into the trainer's
``TensorBoardLogger`` (its ``SummaryWriter``, ``trainer.logger.experiment``), which Lightning keeps and
closes; with no TensorBoard logger either, only console warnings and ``callback.report()``.
Every rank captures; only global rank 0 writes and warns. An fp16 AMP ``GradScaler`` of the trainer's
precision plugin is passed to ``watch(scaler=...)`` so gradient statistics are unscaled.

Works with ``lightning`` (``import lightning.pytorch as pl``) and the older ``pytorch_lightning``
package: when both are installed the callback is a ``Callback`` of both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._report.report import Report
from ..watch import Watcher
from . import _common

if TYPE_CHECKING:
    import torch
    from torch import nn

_BASES: list[type] = []
try:
    import lightning.pytorch as _pl

    _BASES.append(_pl.Callback)
except ImportError:  # pragma: no cover - depends on what is installed
    pass
try:
    import pytorch_lightning as _ptl

    if _ptl.Callback not in _BASES:
        _BASES.append(_ptl.Callback)
except ImportError:  # pragma: no cover
    pass
if not _BASES:  # pragma: no cover
    raise ImportError("torchdiag.integrations.lightning needs Lightning: pip install \"torchdiag[lightning]\""
                      " (or pip install lightning)")


class TorchDiagCallback(*_BASES):  # type: ignore[misc]
    """Watch the ``LightningModule`` during ``trainer.fit``.

    Args:
        **watch_kwargs: any keyword of ``torchdiag.watch`` (``logdir``, ``writer``, ``config``, ``every``,
            ``rescale_grads``...). Unknown keywords and bad config keys raise here.

    Attributes:
        watcher: the ``Watcher`` of the latest fit (``None`` before it); it can still give ``report()``
            after the fit.

    Example:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> diag = TorchDiagCallback(every=10)  # doctest: +SKIP
        >>> pl.Trainer(callbacks=[diag]).fit(model, loader)  # doctest: +SKIP
        >>> print(diag.report())  # doctest: +SKIP
    """

    def __init__(self, **watch_kwargs: Any) -> None:
        super().__init__()
        self.watch_kwargs = _common.check_watch_kwargs(watch_kwargs, "TorchDiagCallback")
        self.watcher: Watcher | None = None
        self._open = False
        self._optimizer_stepped = False

    # ------------------------------------------------------------ fit
    def on_fit_start(self, trainer: object, pl_module: nn.Module) -> None:
        self._stop()  # a previous fit that ended without on_train_end
        is_zero = bool(getattr(trainer, "is_global_zero", True))
        kwargs = dict(self.watch_kwargs)
        if is_zero and kwargs.get("logdir") is None and kwargs.get("writer") is None:
            writer = _tensorboard_writer(trainer)
            if writer is not None:
                kwargs["writer"] = writer
        kwargs = _common.for_rank(kwargs, is_zero)
        self.watcher = _common.start_watch(pl_module, kwargs, scaler=_scaler(trainer))
        self._open = True
        self._optimizer_stepped = False

    def on_before_optimizer_step(self, trainer: object, pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer_stepped = True

    def on_train_batch_end(self, trainer: object, pl_module: nn.Module, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if self._optimizer_stepped and self._open and self.watcher is not None:
            self._optimizer_stepped = False
            self.watcher.step()

    def on_train_end(self, trainer: object, pl_module: nn.Module) -> None:
        self._stop()  # before Lightning finalises its loggers (and closes their writers)

    def on_fit_end(self, trainer: object, pl_module: nn.Module) -> None:
        self._stop()

    def on_exception(self, trainer: object, pl_module: nn.Module, exception: BaseException) -> None:
        self._stop(exception)

    # ------------------------------------------------------------ results
    def report(self) -> Report:
        """The diagnosis of the latest recorded step (see ``Watcher.report``)."""
        if self.watcher is None:
            raise RuntimeError("TorchDiagCallback.report(): no fit has started yet")
        return self.watcher.report()

    def _stop(self, exc: BaseException | None = None) -> None:
        if self._open:
            self._open = False
            _common.stop_watch(self.watcher, exc)


def _tensorboard_writer(trainer: object) -> object:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or None."""
    for logger in getattr(trainer, "loggers", None) or []:
        if not any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__):  # lightning's or pl's
            continue
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_scalar", None)):
            return experiment
    return None


def _scaler(trainer: object) -> torch.amp.GradScaler | None:
    """The precision plugin's AMP ``GradScaler`` (fp16 mixed precision), or None."""
    plugin = getattr(trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None)
