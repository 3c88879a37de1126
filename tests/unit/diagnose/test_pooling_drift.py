"""Backward drift across an average pooling is the architecture's, not the init's (issue #24, timm's nf_regnet_b0).

An average pooling's transpose spreads each gradient evenly over its window, so it halves the norm of every
gradient through a 2x2 pool, whatever the input and the weights: a stack of stages that each downsample by average
pooling (NF-nets, ResNet-D shortcuts) has a gradient norm that halves per stage towards the input at a
variance-preserving init, and no init undoes that without breaking the forward rms the pooling keeps. The same
halving made by weights at half their textbook scale (a strided stack, where the stride keeps the norm) is the
init's, and is flagged. The figures are computed here with plain autograd, independently of torchdiag.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag

STAGES, WIDTH, SIZE, BATCH = 5, 16, 64, 4


class Stage(nn.Module):
    """ReLU on the incoming signal, then 2x downsampling: a 2x2 average pooling and a 1x1 conv, or a 1x1 stride-2
    conv."""

    def __init__(self, pool: bool, weight_scale: float) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()
        self.conv = nn.Conv2d(WIDTH, WIDTH, 1, stride=1 if pool else 2, bias=False)
        nn.init.normal_(self.conv.weight, std=weight_scale * math.sqrt(2 / WIDTH))  # Kaiming (fan_in, ReLU) x scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(self.act(x)))


class Net(nn.Module):
    def __init__(self, pool: bool, weight_scale: float) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 3, padding=1, bias=False)
        nn.init.normal_(self.stem.weight, std=math.sqrt(1 / 27))
        self.stages = nn.Sequential(*[Stage(pool, weight_scale) for _ in range(STAGES)])
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _gradients(model: Net) -> tuple[list[float], list[float], list[int]]:
    """Plain autograd: the gradient norm at each stage's ReLU output, the factor each stage's pool applies to the
    gradient norm (its input's over its output's), and the ReLU outputs' sizes."""
    x, y = _data()
    outs, pooled = [], []
    hooks = [s.act.register_forward_hook(lambda m, i, o: (o.retain_grad(), outs.append(o)) and None)
             for s in model.stages]
    hooks += [s.pool.register_forward_hook(lambda m, i, o: (o.retain_grad(), pooled.append(o)) and None)
              for s in model.stages]
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    norms = [o.grad.norm().item() for o in outs]
    # the pool's input is the ReLU's output: the pool's own backward factor, whatever the weights
    pool_factor = [o.grad.norm().item() / p.grad.norm().item() for o, p in zip(outs, pooled)]
    return norms, pool_factor, [o.numel() for o in outs]


def _check(model: Net):
    x, y = _data()
    return torchdiag.check(model, x, loss_fn=lambda out: F.cross_entropy(out, y))


def test_a_stack_downsampling_by_average_pooling_is_not_vanishing():
    torch.manual_seed(0)
    model = Net(pool=True, weight_scale=1.0)
    norms, pool_factor, sizes = _gradients(model)
    assert all(abs(f - 0.5) < 1e-5 for f in pool_factor), pool_factor  # a 2x2 pool halves any gradient's norm
    per_stage = [a / b for a, b in zip(norms, norms[1:])]
    assert all(0.35 < r < 0.7 for r in per_stage), per_stage  # towards the input: ~1/2 per stage
    assert norms[0] / norms[-1] < 0.1  # the raw gradient norm falls past vanishing_ratio over the chain ...
    kept = [n * math.sqrt(s) for n, s in zip(norms, sizes)]  # ... its norm times sqrt(size) is what a pool keeps
    assert 0.1 < kept[0] / kept[-1] < 10, kept
    report = _check(model)
    assert [(r.name, sorted(r.status)) for r in report.flagged] == []


def test_the_same_decay_made_by_half_scale_weights_is_vanishing():
    torch.manual_seed(0)
    model = Net(pool=False, weight_scale=0.5)  # a stride keeps the gradient's norm: the weights halve it
    norms, _, _ = _gradients(model)
    per_stage = [a / b for a, b in zip(norms, norms[1:])]
    assert all(0.35 < r < 0.7 for r in per_stage), per_stage  # the same ~1/2 per stage as the pooled stack
    assert norms[0] / norms[-1] < 0.1
    report = _check(model)
    backward = [f for r in report.layers if r.name.startswith("stages.") for f in r.findings
                if (f.problem, f.direction) == ("vanishing", "backward")]
    assert backward, [(r.name, sorted(r.status)) for r in report.flagged]
    lead = next(f for f in backward if f.covers > 1)
    assert lead.key == "vanishing_ratio" and lead.value < 0.1
