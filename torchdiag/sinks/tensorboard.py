"""TensorBoard sink: per-layer scalars tagged ``<metric>/<layer>``."""

from __future__ import annotations

from typing import Any

from ..report import Report

# report attribute -> TensorBoard metric name
SCALARS = {
    "act_mean": "act_mean",
    "act_std": "act_std",
    "grad_std": "grad_std",
    "grad_norm": "grad_norm",
    "weight_std": "weight_std",
    "zero_fraction": "zero_frac",
    "gain": "gain",
}


def open_writer(logdir: str) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=logdir)


class TensorBoardSink:
    """Writes each report into a ``SummaryWriter``; closes it only if it opened it."""

    def __init__(self, writer: Any, owned: bool) -> None:
        self.writer = writer
        self.owned = owned

    def write(self, report: Report, warnings: list[str]) -> None:
        w = self.writer
        for layer in report.layers:
            name = layer.name or "(root)"
            for attr, metric in SCALARS.items():
                v = getattr(layer, attr)
                if v is not None:
                    w.add_scalar(f"{metric}/{name}", v, report.step)
        for msg in warnings:
            w.add_text("torchdiag/warnings", msg, report.step)

    def close(self) -> None:
        if self.owned:
            self.writer.close()
        else:
            self.writer.flush()
