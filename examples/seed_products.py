"""100 products of randn(512, 512) (reference/002, "All you need is a good init"), as nn.Linear layers.

x -> W_100 ··· W_2 W_1 x with bias-free Linear(512, 512) layers:

* W = randn: each layer multiplies the std by sqrt(512) ≈ 22.6, so float32 (max 3.4e38) overflows
  after log(3.4e38) / log(22.6) ≈ 28 layers; torchdiag names the first layer whose output is Inf/NaN.
* W = 0.01 · randn: each layer multiplies the std by 0.01·sqrt(512) = 0.226: the signal vanishes;
  the suggested scale is the identity target 1/sqrt(512) over the std 0.01: 1/(0.01·sqrt(512)) ≈ 4.42.
* W = randn / sqrt(512): std 1/sqrt(fan_in) keeps the std at 1 through all 100 layers: no flag.

    python examples/seed_products.py [--logdir runs/seed_products]
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from torch import nn

import torchdiag

DEPTH, WIDTH = 100, 512


def products(scale: float, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(DEPTH)])
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(torch.randn(WIDTH, WIDTH) * scale)
    return model


def watched_step(model: nn.Module, x: torch.Tensor, r: torch.Tensor, logdir: str) -> tuple[torchdiag.Report, int]:
    """One watched forward and backward; returns the report and how many console warnings it raised."""
    with warnings.catch_warnings(record=True) as caught, torchdiag.watch(model, logdir=logdir) as diag:
        warnings.simplefilter("always", torchdiag.DiagnosticWarning)
        (model(x) * r).sum().backward()
        report = diag.step()
    model.zero_grad(set_to_none=True)
    return report, sum(issubclass(w.category, torchdiag.DiagnosticWarning) for w in caught)


def short(report: torchdiag.Report, keep: int = 4) -> str:
    lines = str(report).splitlines()
    n = len(report.layers)
    head, body, tail = lines[:2], lines[2:2 + n], lines[2 + n:]
    if len(body) > 2 * keep:
        body = body[:keep] + [f"   ... {len(body) - 2 * keep} more layers ..."] + body[-keep:]
    if len(tail) > 4:
        tail = tail[:4] + [f"   ... {len(tail) - 4} more lines"]
    return "\n".join(head + body + tail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/seed_products", help="TensorBoard log directory")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(16, WIDTH, generator=g), torch.randn(16, WIDTH, generator=g)

    report, n = watched_step(products(1.0), x, r, f"{args.logdir}/randn")
    print(f"1) W = randn(512, 512): {n} warning(s)\n{short(report)}\n")
    first = report.first_nonfinite
    expected = math.log(torch.finfo(torch.float32).max) / math.log(math.sqrt(WIDTH))
    print(f"   first non-finite output: layer '{first}' (0-based: layer {int(first) + 1} of {DEPTH}); float32"
          f" overflow predicted after {expected:.1f} layers\n")
    assert first is not None and 25 <= int(first) <= 30, first
    assert "nonfinite" in report[first].status

    report, n = watched_step(products(0.01), x, r, f"{args.logdir}/randn_x0.01")
    print(f"2) W = 0.01 * randn(512, 512): {n} warning(s)\n{short(report)}\n")
    want = 1 / (0.01 * math.sqrt(WIDTH))
    scales = [layer.suggested_scale for layer in report.layers]
    print(f"   suggested_scale {min(scales):.3f} .. {max(scales):.3f}; 1/(0.01·sqrt(512)) = {want:.3f}\n")
    assert report.first_nonfinite is None
    assert "vanishing" in report.layers[-1].status
    assert all(math.isclose(s, want, rel_tol=0.02) for s in scales), (min(scales), max(scales))

    report, n = watched_step(products(1 / math.sqrt(WIDTH)), x, r, f"{args.logdir}/randn_over_sqrt_n")
    print(f"3) W = randn(512, 512) / sqrt(512): {n} warning(s)\n{short(report)}\n")
    stds = [layer.act_std for layer in report.layers]
    print(f"   output std over the 100 layers: {min(stds):.3f} .. {max(stds):.3f}\n")
    assert report.flagged == [] and n == 0, [layer.name for layer in report.flagged]
    print(f"TensorBoard logs: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
