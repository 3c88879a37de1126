"""Lightning: torchdiag as a callback, writing into the trainer's TensorBoardLogger.

    trainer = pl.Trainer(callbacks=[TorchDiagCallback()], logger=TensorBoardLogger("runs"))

A LightningModule (an 8-layer ReLU MLP, Kaiming init) trains for one epoch on generated data. The
callback starts the watch at fit start, ends a step after each optimizer step, and writes torchdiag's
panels into the same TensorBoard run as Lightning's own metrics (global rank 0 only). A second fit of
the same model with N(0, 0.01²) weights is flagged as vanishing at its first step, on the console and in
TensorBoard, where `torchdiag summarize` reads it back.

    pip install "torchdiag[lightning]"
    python examples/lightning_callback.py [--logdir runs/lightning_callback]
    tensorboard --logdir runs/lightning_callback
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the older package name
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

import torchdiag
from torchdiag.cli import main as torchdiag_cli
from torchdiag.integrations.lightning import TorchDiagCallback

DIM, WIDTH, DEPTH, CLASSES = 32, 64, 8, 4


class MLP(pl.LightningModule):
    def __init__(self, init: str = "kaiming") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        fan_in = DIM
        for _ in range(DEPTH):
            lin = nn.Linear(fan_in, WIDTH)
            if init == "kaiming":
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            else:  # too small: the signal shrinks by about 0.01 * sqrt(WIDTH / 2) = 0.057 per layer
                nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.ReLU()]
            fan_in = WIDTH
        layers.append(nn.Linear(WIDTH, CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data(n: int = 1024, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(centres[y] + 0.5 * torch.randn(n, DIM, generator=g), y)


def fit(init: str, logdir: str) -> tuple[TorchDiagCallback, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    callback = TorchDiagCallback()                    # any torchdiag.watch() keyword: every=, config=, ...
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[callback],
                         logger=TensorBoardLogger(logdir, name=init), log_every_n_steps=4,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(MLP(init), DataLoader(data(), batch_size=64, shuffle=True))
    return callback, trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/lightning_callback", help="TensorBoard log directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", module="lightning")  # Lightning's tips about workers and logging intervals
    warnings.filterwarnings("ignore", module="pytorch_lightning")

    print(f"1) {DEPTH} Linear+ReLU layers, Kaiming init: one epoch with TorchDiagCallback\n")
    callback, trainer = fit("kaiming", args.logdir)
    report = callback.report()                                     # the last step's report
    print(report, "\n")
    run_dir = trainer.logger.log_dir
    print(f"   {trainer.global_step} optimizer steps, {callback.watcher.step_count} torchdiag steps;"
          f" TensorBoard run: {run_dir}")
    assert callback.watcher.step_count == trainer.global_step == 16
    assert report.flagged == [], "a Kaiming ReLU MLP must be silent"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))

    print("\n2) the same net with N(0, 0.01²) weights\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torchdiag.DiagnosticWarning)
        callback, trainer = fit("small", args.logdir)
    found = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    print(f"   {len(found)} DiagnosticWarning(s) during the fit; the first:\n   {found[0] if found else None}\n")
    assert found and "vanishing" in found[0]
    run_dir = trainer.logger.log_dir
    print(f"   what TensorBoard holds for the first step (torchdiag summarize {run_dir} --step 0):\n")
    status = torchdiag_cli(["summarize", run_dir, "--step", "0", "--fail-on", "vanishing"])
    assert status == 1, "the first step must be flagged as vanishing in TensorBoard"
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
