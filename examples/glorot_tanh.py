"""Glorot & Bengio (2010): 5 tanh layers, the "standard" init U(-1/sqrt(n), 1/sqrt(n)) vs normalised init.

The standard init has Var(W) = 1/(3n), so each layer multiplies the variance of a (near-linear) tanh
signal by n·Var(W) = 1/3: the activations shrink layer after layer, and the back-propagated gradient
shrinks towards the input. The normalised (Xavier) init U(-sqrt(6/(n_in+n_out)), +...) has Var(W) = 1/n
for a square layer and keeps the signal far better. torchdiag's suggestion follows the tanh gain 5/3
of torch.nn.init.calculate_gain, i.e. the target std (5/3)/sqrt(n):

* standard init, std 1/sqrt(3n):  suggested_scale = (5/3/sqrt(n)) / (1/sqrt(3n)) = 5/3·sqrt(3) ≈ 2.89
* normalised init, std 1/sqrt(n): suggested_scale = 5/3

Applying the suggestion (torchdiag.apply_suggestions) holds the tanh outputs at a steady std.

    python examples/glorot_tanh.py [--logdir runs/glorot_tanh]
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from torch import nn

import torchdiag

DEPTH, WIDTH = 5, 256


def tanh_net(init, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        lin = nn.Linear(WIDTH, WIDTH)
        init(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers)


def standard(w: torch.Tensor) -> None:
    bound = 1 / math.sqrt(w.shape[1])
    nn.init.uniform_(w, -bound, bound)


def watched_step(model: nn.Module, x: torch.Tensor, r: torch.Tensor, logdir: str) -> torchdiag.Report:
    """One watched forward and backward of the loss sum(out * r) (a fixed random projection)."""
    with warnings.catch_warnings(), torchdiag.watch(model, logdir=logdir) as diag:
        warnings.simplefilter("ignore", torchdiag.DiagnosticWarning)  # the report below says it all
        (model(x) * r).sum().backward()
        report = diag.step()
    model.zero_grad(set_to_none=True)
    return report


def profile(report: torchdiag.Report, kind: str, attr: str) -> list[float]:
    return [getattr(layer, attr) for layer in report.layers if layer.module_type == kind]


def show(title: str, report: torchdiag.Report) -> None:
    print(f"{title}\n{report}")
    print("   tanh output std by depth:   " + "  ".join(f"{v:.3f}" for v in profile(report, "Tanh", "act_std")))
    print("   grad std at Linear outputs: " + "  ".join(f"{v:.3g}" for v in profile(report, "Linear", "grad_std")))
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/glorot_tanh", help="TensorBoard log directory")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(512, WIDTH, generator=g), torch.randn(512, WIDTH, generator=g)
    tanh_gain = nn.init.calculate_gain("tanh")

    model = tanh_net(standard)
    report = watched_step(model, x, r, f"{args.logdir}/standard")
    show(f"1) standard init U(-1/sqrt(n), 1/sqrt(n)), n = {WIDTH}", report)
    stds = profile(report, "Tanh", "act_std")
    assert all(a > b for a, b in zip(stds, stds[1:])), f"activations must shrink with depth: {stds}"
    assert stds[-1] < 0.15 * stds[0], stds
    grads = profile(report, "Linear", "grad_std")
    assert all(a < b for a, b in zip(grads, grads[1:])), f"gradients must shrink towards the input: {grads}"
    want = tanh_gain * math.sqrt(3)
    for layer in report.layers:
        if layer.module_type == "Linear":
            assert layer.nonlinearity == "tanh", layer.nonlinearity
            assert math.isclose(layer.suggested_scale, want, rel_tol=0.02), (layer.name, layer.suggested_scale)
    print(f"   suggested_scale {profile(report, 'Linear', 'suggested_scale')[0]:.3f} = 5/3·sqrt(3) = {want:.3f}\n")

    xavier = tanh_net(nn.init.xavier_uniform_)
    report_x = watched_step(xavier, x, r, f"{args.logdir}/normalised")
    show("2) normalised init (Xavier-uniform, gain 1)", report_x)
    stds_x = profile(report_x, "Tanh", "act_std")
    assert stds_x[-1] / stds_x[0] > 2 * stds[-1] / stds[0], (stds_x, stds)
    for scale in profile(report_x, "Linear", "suggested_scale"):
        assert math.isclose(scale, tanh_gain, rel_tol=0.02), scale
    print(f"   suggested_scale {profile(report_x, 'Linear', 'suggested_scale')[0]:.3f} = 5/3\n")

    applied = torchdiag.apply_suggestions(model, report)
    report_f = watched_step(model, x, r, f"{args.logdir}/standard_x_suggested")
    show(f"3) the standard net after apply_suggestions (×{min(applied.values()):.3f} .. ×{max(applied.values()):.3f}):"
         " std (5/3)/sqrt(n)", report_f)
    stds_f = profile(report_f, "Tanh", "act_std")
    assert stds_f[-1] > 0.8 * stds_f[0] and report_f.flagged == [], stds_f
    print(f"TensorBoard logs: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
