"""He et al. (2015), "Delving deep into rectifiers": 30 ReLU layers, Xavier vs Kaiming init.

Xavier (Glorot) init keeps the variance of a *linear* layer, but a ReLU halves the second moment,
so through 30 Linear+ReLU pairs the signal shrinks by 1/sqrt(2) per pair, forward and backward:
2^-15 at the top. torchdiag flags it as vanishing and suggests multiplying the weights by sqrt(2)
(Kaiming's gain for ReLU); the Kaiming net is silent. torchdiag.fix_init then rescales the Xavier
net layer by layer on a sample batch (LSUV), and it trains with Adam (the Xavier net as it was
barely moves in the same number of steps).

    python examples/he2015_depth.py [--logdir runs/he2015_depth]
    tensorboard --logdir runs/he2015_depth
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag

DEPTH, WIDTH, CLASSES = 30, 256, 10


def relu_mlp(init, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        lin = nn.Linear(WIDTH, WIDTH)
        init(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    layers.append(nn.Linear(WIDTH, CLASSES))
    return nn.Sequential(*layers)


def blobs(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: one random centre per class in WIDTH dimensions, unit noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, WIDTH, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, WIDTH, generator=g), y


def short(report: torchdiag.Report, keep: int = 5) -> str:
    """The report table with the middle rows of a long net elided."""
    lines = str(report).splitlines()
    n = len(report.layers)
    head, body, tail = lines[:2], lines[2:2 + n], lines[2 + n:]
    if len(body) > 2 * keep:
        body = body[:keep] + [f"   ... {len(body) - 2 * keep} more layers ..."] + body[-keep:]
    if len(tail) > 4:
        tail = tail[:4] + [f"   ... {len(tail) - 4} more lines"]
    return "\n".join(head + body + tail)


def first_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logdir: str) -> torchdiag.Report:
    """One watched training-mode forward and backward; the console warnings are counted, not printed."""
    with warnings.catch_warnings(record=True) as caught, torchdiag.watch(model, logdir=logdir) as diag:
        warnings.simplefilter("always", torchdiag.DiagnosticWarning)
        F.cross_entropy(model(x), y).backward()
        report = diag.step()
    model.zero_grad(set_to_none=True)
    found = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    print(f"{len(found)} DiagnosticWarning(s)" + (f", the first: {found[0]}" if found else ""))
    return report


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logdir: str, steps: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(1)
    losses = []
    with warnings.catch_warnings(), torchdiag.watch(model, logdir=logdir, every=5) as diag:
        warnings.simplefilter("ignore", torchdiag.DiagnosticWarning)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            diag.step()
            losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/he2015_depth", help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps of each training run")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = blobs()
    batch = x[:256], y[:256]

    print(f"1) {DEPTH} Linear+ReLU layers of width {WIDTH}, Xavier-normal init (gain 1)\n")
    xavier = relu_mlp(nn.init.xavier_normal_)
    report = first_step(xavier, *batch, f"{args.logdir}/xavier")
    print(short(report), "\n")
    body = [layer for layer in report.layers[2:-1] if layer.module_type == "Linear"]  # square hidden layers
    assert any("vanishing" in layer.status for layer in report.layers), "Xavier before ReLU must vanish"
    for layer in body:
        assert layer.nonlinearity == "relu" and math.isclose(layer.suggested_scale, math.sqrt(2), rel_tol=0.05), (
            layer.name, layer.suggested_scale)
    scales = [layer.suggested_scale for layer in body]
    print(f"   suggested_scale of the hidden Linear layers: {min(scales):.3f} .. {max(scales):.3f}"
          f" (sqrt(2) = {math.sqrt(2):.3f}): {body[0].suggested_init}\n")

    print("2) the same net with Kaiming-normal init (fan_in, gain sqrt(2))\n")
    kaiming = relu_mlp(lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    report = first_step(kaiming, *batch, f"{args.logdir}/kaiming")
    print(short(report), "\n")
    assert report.flagged == [], "the Kaiming net must be silent"

    print("3) torchdiag.fix_init on the Xavier net (LSUV on a sample batch of 256)\n")
    report = torchdiag.fix_init(xavier, batch[0])
    print(short(report), "\n")
    assert report.flagged == [], "fix_init must leave no flag"

    print(f"4) {args.steps} Adam steps (lr 3e-4, batch 128), Xavier as it was vs Xavier after fix_init\n")
    runs = {"xavier": relu_mlp(nn.init.xavier_normal_), "xavier_fix_init": xavier}
    final = {}
    for name, model in runs.items():
        losses = train(model, x, y, f"{args.logdir}/train_{name}", args.steps)
        final[name] = sum(losses[-10:]) / 10
        print(f"   {name:16s} loss every 10 steps: " + ", ".join(f"{v:.3f}" for v in losses[::10])
              + f"; mean of the last 10: {final[name]:.3f}")
        if name == "xavier_fix_init":
            assert final[name] < 0.25 * losses[0], f"the fixed net must train: {losses[0]:.3f} -> {final[name]:.3f}"
    assert final["xavier_fix_init"] < final["xavier"], final
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
