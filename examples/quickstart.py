"""Quick start: torchdiag.watch() around a plain PyTorch training loop.

A 6-layer ReLU MLP trains on generated data (Gaussian blobs, 10 classes). torchdiag records every
layer's activation and gradient statistics at each step, writes them to TensorBoard and prints the
report of the last step. The same net with a too-small init (N(0, 0.01²)) is flagged as vanishing at
once, with the gain that fixes it.

    python examples/quickstart.py [--logdir runs/quickstart] [--steps 40]
    tensorboard --logdir runs/quickstart
    torchdiag summarize runs/quickstart
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag

DIM, WIDTH, DEPTH, CLASSES = 32, 128, 6, 10


def make_model(init_std: float | None = None, seed: int = 0) -> nn.Sequential:
    """DEPTH Linear+ReLU layers and a linear head; Kaiming init, or N(0, init_std²) weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = DIM
    for _ in range(DEPTH):
        lin = nn.Linear(fan_in, WIDTH)
        if init_std is None:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        else:
            nn.init.normal_(lin.weight, std=init_std)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        fan_in = WIDTH
    layers.append(nn.Linear(WIDTH, CLASSES))
    return nn.Sequential(*layers)


def blobs(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=g) * 1.5
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, DIM, generator=g), y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logdir: str, steps: int) -> tuple[torchdiag.Report,
                                                                                                 list[float]]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    with torchdiag.watch(model, logdir=logdir) as diag:           # hooks on, TensorBoard writer open
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            diag.step()                                           # ends a step: statistics -> report, TensorBoard
            losses.append(loss.item())
    return diag.report(), losses                                  # the report of the last step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/quickstart", help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = blobs()

    print(f"1) a {DEPTH}-layer ReLU MLP with Kaiming init, {args.steps} Adam steps\n")
    report, losses = train(make_model(), x, y, f"{args.logdir}/kaiming", args.steps)
    print(report, "\n")
    print(f"   loss {losses[0]:.3f} -> {losses[-1]:.3f}\n")
    assert report.flagged == [], "a Kaiming ReLU MLP must be silent"
    assert losses[-1] < (0.5 if args.steps >= 10 else 1.0) * losses[0], losses  # it learns: half the loss in 10 steps

    print("2) the same net with N(0, 0.01²) weights: one checked step (torchdiag.check)\n")
    small = make_model(init_std=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchdiag.DiagnosticWarning)
        report = torchdiag.check(small, x[:256])
    print(report, "\n")
    vanishing = [layer.name for layer in report.flagged if "vanishing" in layer.status]
    assert vanishing, "a 0.01 init must vanish"
    print(f"   vanishing: {', '.join(vanishing)}; suggested scale of layer '2':"
          f" ×{report['2'].suggested_scale:.3g} ({report['2'].suggested_init})")
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
