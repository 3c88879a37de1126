"""A CNN with BatchNorm on generated images, watched while it trains.

Conv-BatchNorm-ReLU blocks (torchvision-style init: Kaiming fan_out for convs, BatchNorm weight 1)
learn to tell 4 kinds of generated 3x16x16 images apart (horizontal stripes, vertical stripes,
checkerboard, a centred blob; random phase, contrast and noise). torchdiag stays silent on this
healthy net (no false alarm: BatchNorm resets the scale, so the convs' absolute weight scale does not
matter), records every layer in TensorBoard, and the validation pass under torch.no_grad() does not
overwrite the training step. The same net without BatchNorm and with a too-small conv init is
flagged as vanishing.

    python examples/cnn_batchnorm.py [--logdir runs/cnn_batchnorm] [--steps 30]
    tensorboard --logdir runs/cnn_batchnorm
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag

SIZE, CLASSES = 16, 4


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n generated images (n, 3, SIZE, SIZE) and their class: stripes (2 orientations), checkerboard, blob."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    coords = torch.arange(SIZE, dtype=torch.float32)
    r, c = torch.meshgrid(coords, coords, indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    freq = 2 * math.pi / 4
    patterns = torch.stack([
        torch.sin(freq * r + phase),                                             # horizontal stripes
        torch.sin(freq * c + phase),                                             # vertical stripes
        torch.sin(freq * r + phase) * torch.sin(freq * c + phase),               # checkerboard
        torch.exp(-((r - SIZE / 2) ** 2 + (c - SIZE / 2) ** 2) / 12).expand(n, SIZE, SIZE) * 2 - 0.5,  # blob
    ], dim=1)                                                                    # (n, CLASSES, SIZE, SIZE)
    x = patterns[torch.arange(n), y]                                             # (n, SIZE, SIZE)
    contrast = 0.5 + torch.rand(n, 3, 1, 1, generator=g)
    x = x[:, None] * contrast + 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return x, y


def make_cnn(batchnorm: bool = True, conv_std: float | None = None, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = [3, 16, 16, 32, 32, 32, 32]
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)
        if conv_std is None:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's ResNet init
        else:
            nn.init.normal_(conv.weight, std=conv_std)
        layers.append(conv)
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        if i in (1, 3):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], CLASSES)]
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/cnn_batchnorm", help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y = images(1024)
    x_val, y_val = images(256, seed=1)

    model = make_cnn()
    print(f"1) {sum(isinstance(m, nn.Conv2d) for m in model)} Conv-BatchNorm-ReLU blocks, {args.steps} SGD steps"
          " (momentum 0.9, batch 64), validation every 10 steps under torch.no_grad()\n")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught, torchdiag.watch(model, logdir=args.logdir) as diag:
        warnings.simplefilter("always", torchdiag.DiagnosticWarning)
        for step in range(args.steps):
            model.train()
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            diag.step()
            if step % 10 == 9:
                model.eval()
                with torch.no_grad():                 # not recorded: it would overwrite the training statistics
                    acc = (model(x_val).argmax(1) == y_val).float().mean().item()
                print(f"   step {step + 1}: loss {loss.item():.3f}, validation accuracy {acc:.1%}")
    report = diag.report()
    print()
    print(report, "\n")
    ours = [w for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    assert report.flagged == [] and not ours, "a Conv-BatchNorm-ReLU net must be silent"
    # the latest recorded step (the time budget records the first steps, then as many as 3 % of the time allows):
    # one training forward per layer, the validation passes under no_grad not counted
    assert report.step < args.steps and report["0"].calls == 1, (report.step, report["0"].calls)
    assert acc > 0.5, f"the CNN must learn the 4 patterns (validation accuracy {acc:.1%})"

    print("2) without BatchNorm and with N(0, 0.01²) conv weights: one checked step (torchdiag.check)\n")
    report = torchdiag.check(make_cnn(batchnorm=False, conv_std=0.01), x[:64])
    print(report, "\n")
    vanishing = [layer.name for layer in report.flagged if "vanishing" in layer.status]
    assert vanishing, "a 0.01 conv init without BatchNorm must vanish"
    print(f"   vanishing: {', '.join(vanishing)}")
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
