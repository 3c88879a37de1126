"""Model families from timm and torchvision at their library's own init: healthy ones must stay silent.

tests/helpers/real_zoo.py covers Hugging Face transformers; this covers the vision families people train from
timm and torchvision (ResNet, NF-nets, MLP-Mixer, ResMLP, ConvNeXt, Swin, ViT/DeiT, EfficientNet,
MobileNet, RegNet, DenseNet, GhostNet, RepVGG, SqueezeNet, VGG), each built at random init with a small
``num_classes`` and a small image size, and two broken cases whose right answer is decided from first
principles (``BROKEN``). Only torchdiag's public API is used.

Run ``python -m tests.helpers.families`` for the table of what torchdiag concludes today (``--only NAME[,NAME]``,
``--all`` for every optimizer x optimizer= x input combination instead of the default AdamW + optimizer= on
smooth images).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag
from tests.helpers.thirdparty import import_torchvision

CLASSES = 10
BATCH = 4


def _timm() -> Any:
    import_torchvision()  # timm imports torchvision (feature extraction): load it beside the CPU torch first
    import timm

    return timm


def _tv_models() -> Any:
    import_torchvision()
    import torchvision.models

    return torchvision.models


def timm_model(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return _timm().create_model(name, pretrained=False, num_classes=CLASSES, **kw)

    build.__name__ = f"timm:{name}"
    return build


def tv_model(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(_tv_models(), name)(weights=None, num_classes=CLASSES, **kw)

    build.__name__ = f"torchvision:{name}"
    return build


def tv_small_densenet() -> nn.Module:
    """torchvision's DenseNet class (its own init: Kaiming normal convs, BN (1, 0), Linear bias 0), 4 blocks of 2."""
    from torchvision.models.densenet import DenseNet

    _tv_models()
    return DenseNet(growth_rate=12, block_config=(2, 2, 2, 2), num_init_features=24, bn_size=4, num_classes=CLASSES)


# ----------------------------------------------------------------------------- inputs
def white_images(g: torch.Generator, batch: int, size: int) -> torch.Tensor:
    """i.i.d. N(0, 1) pixels."""
    return torch.randn(batch, 3, size, size, generator=g)


def smooth_images(g: torch.Generator, batch: int, size: int) -> torch.Tensor:
    """Low-pass noise: 8x8 N(0, 1) up-sampled bicubically to ``size``, normalised to zero mean, unit std."""
    low = torch.randn(batch, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x - x.mean()) / x.std()


INPUTS = {"smooth": smooth_images, "white": white_images}


# ----------------------------------------------------------------------------- cases
@dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]
    size: int = 64  # image side
    why: str = ""
    healthy: bool = True
    lr: dict[str, float] = field(default_factory=lambda: {"adamw": 1e-3, "sgd": 0.01})
    expect: str = ""  # broken cases: the right answer, decided from first principles
    fused: bool = False  # AdamW(fused=True): the same update, ~3x faster on the 120M-weight VGG classifier

    def inputs(self, g: torch.Generator, kind: str = "smooth") -> tuple[torch.Tensor, torch.Tensor]:
        x = INPUTS[kind](g, BATCH, self.size)
        return x, torch.randint(0, CLASSES, (BATCH,), generator=g)


class SmallHeadVGG(nn.Module):
    """torchvision's VGG forward (features, avgpool, flatten, classifier) with a narrow classifier."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features, self.avgpool, self.classifier = features, nn.AdaptiveAvgPool2d(1), classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def tv_vgg11_bn_small_head() -> nn.Module:
    """torchvision VGG-11-BN features (``make_layers(cfgs["A"], batch_norm=True)``) with ``VGG.__init__``'s init
    (Kaiming normal fan_out convs, bias 0; BN (1, 0); Linear N(0, 0.01), bias 0), the classifier narrowed for the
    CPU budget: 1x1 pooling, 512 -> 512 -> 512 -> classes instead of 25,088 -> 4,096 -> 4,096 -> classes (the full
    one costs seconds a step here; ``check`` runs it, and so does the broken case ``tv_vgg11_bn_adamw_lr1e-3``)."""
    _tv_models()
    from torchvision.models.vgg import cfgs, make_layers

    classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True),
                               nn.Dropout(), nn.Linear(512, CLASSES))
    model = SmallHeadVGG(make_layers(cfgs["A"], batch_norm=True), classifier)
    for m in model.modules():  # VGG.__init__'s loop
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return model


FULL_VGG = Family("tv_vgg11_bn", tv_model("vgg11_bn"), why="torchvision VGG-11-BN with its 25,088-wide classifier"
                  " (Linear N(0, 0.01)): healthy at init (check); training it is the broken case below")

HEALTHY = [
    Family("tv_resnet18", tv_model("resnet18"), why="torchvision ResNet-18: Kaiming fan_out convs, BN (1, 0)"),
    Family("tv_resnet18_zero_init_residual", tv_model("resnet18", zero_init_residual=True),
           why="torchvision ResNet-18 with each block's last BN weight 0 (Goyal et al. 2017)"),
    Family("timm_resnet18", timm_model("resnet18"), why="timm ResNet-18: zero_init_last (each block's last BN 0)"),
    Family("timm_resnet26", timm_model("resnet26"), why="timm ResNet-26: bottlenecks, zero_init_last"),
    Family("timm_nf_resnet26", timm_model("nf_resnet26"), why="NF-ResNet: scaled weight standardisation, no norm,"
           " residual branches scaled by alpha, skipinit gain 0"),
    Family("timm_nf_regnet_b0", timm_model("nf_regnet_b0"), why="NF-RegNet-B0: weight-standardised grouped convs, SE,"
           " no norm"),
    Family("timm_mixer_s16", timm_model("mixer_s16_224", img_size=64), why="MLP-Mixer S/16 at 64x64: 16 tokens,"
           " 8 blocks of token- and channel-MLPs, pre-LN"),
    Family("timm_resmlp_12", timm_model("resmlp_12_224", img_size=64), why="ResMLP-12: Affine norms, LayerScale 0.1"),
    Family("timm_convnext_atto", timm_model("convnext_atto"), why="ConvNeXt-atto: depthwise 7x7, LayerScale 1e-6"),
    Family("timm_swin_tiny_custom", timm_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4,
           embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
           why="Swin-T shape at 64x64: window 4, embed 32, 2 blocks per stage"),
    Family("timm_vit_tiny", timm_model("vit_tiny_patch16_224", img_size=64), why="ViT-Ti/16 at 64x64: 16 patches"
           " + CLS, 12 pre-LN blocks, trunc N(0, 0.02)"),
    Family("timm_deit_tiny", timm_model("deit_tiny_patch16_224", img_size=64), why="DeiT-Ti/16 at 64x64"),
    Family("timm_efficientnet_b0", timm_model("efficientnet_b0"), why="EfficientNet-B0: MBConv, SiLU, SE"),
    Family("tv_efficientnet_b0", tv_model("efficientnet_b0"), why="torchvision EfficientNet-B0, stochastic depth"),
    Family("timm_mobilenetv2_050", timm_model("mobilenetv2_050"), why="MobileNetV2 x0.5: inverted residuals, ReLU6"),
    Family("tv_mobilenet_v3_small", tv_model("mobilenet_v3_small"), why="torchvision MobileNetV3-small: hardswish,"
           " SE with hardsigmoid"),
    Family("timm_regnetx_002", timm_model("regnetx_002"), why="RegNetX-200MF: grouped convs, zero_init_last"),
    Family("tv_regnet_y_400mf", tv_model("regnet_y_400mf"), why="torchvision RegNetY-400MF: grouped convs, SE"),
    Family("tv_densenet_small", tv_small_densenet, why="torchvision DenseNet, growth 12, blocks (2, 2, 2, 2):"
           " concatenation, BN-ReLU-conv"),
    Family("timm_ghostnet_100", timm_model("ghostnet_100"), why="GhostNet: cheap depthwise 'ghost' features, SE"),
    Family("timm_repvgg_a0", timm_model("repvgg_a0"), why="RepVGG-A0 (training form): 3x3 + 1x1 + identity-BN"
           " branches summed"),
    Family("tv_squeezenet1_1", tv_model("squeezenet1_1"), why="SqueezeNet 1.1: fire modules, no norm, conv head"
           " N(0, 0.01)"),
    Family("tv_vgg11_bn_small_head", tv_vgg11_bn_small_head, size=32,
           why="torchvision VGG-11-BN features and init, classifier narrowed to 512 wide (CPU budget)"),
]


def resnet26_conv_x50() -> nn.Module:
    """timm ResNet-26 with one middle-stage conv (``layer3.0.conv2``, the 3x3 of the stage's first bottleneck)
    multiplied by 50."""
    model = timm_model("resnet26")()
    with torch.no_grad():
        model.layer3[0].conv2.weight.mul_(50.0)
    return model


BROKEN = [
    Family("timm_resnet26_conv_x50", resnet26_conv_x50, healthy=False,
           why="one 3x3 conv of stage 3 has weights 50x its Kaiming scale. The BN after it divides by its output"
           " std, so the forward signal elsewhere is unchanged, but its own output rms is 50x that of its peers"
           " and the gradient reaching it is 1/50: under SGD its relative update is 1/2500 of its peers' (it stops"
           " learning), under Adam 1/50. Nothing else is wrong",
           expect="that one layer, layer3.0.conv2, named alone, fix x1/50 (0.02); no chain-wide flag"),
    Family("tv_vgg11_bn_adamw_lr1e-3", tv_model("vgg11_bn"), healthy=False, lr={"adamw": 1e-3, "sgd": 0.01}, fused=True,
           why="Adam's first step moves every weight by ~lr = 1e-3 with the sign of its gradient; the first classifier"
           " Linear (25,088 inputs, N(0, 0.01)) reads ReLU outputs (all >= 0) and its weight gradient's sign is"
           " sign(delta_i) sign(x_j), so each output moves by ~lr * sum_j x_j, coherently: many times its rms"
           " (0.01 * sqrt(25088) * rms(x)); the loss jumps from ~2.3 to far above it after one step",
           expect="a flag on classifier.0 at step 1 blamed on the optimisation (learning rate / warm-up), not"
           " the init"),
]


# ----------------------------------------------------------------------------- running
def make_optimizer(name: str, model: nn.Module, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(name)


@dataclass
class Outcome:
    warnings: list[str]  # DiagnosticWarning messages
    findings: list  # Watcher.findings at the end
    flags: dict[str, tuple[str, int]]  # flag -> (first layer, step) over every report
    losses: list[float]
    reports: list = field(default_factory=list)


def train(case: Family, optimizer: str = "adamw", pass_optimizer: bool = True, kind: str = "smooth",
          steps: int = 4, seed: int = 0, keep_reports: bool = False) -> Outcome:
    """``steps`` training steps of cross-entropy on random labels under ``torchdiag.watch(every=1)``."""
    torch.manual_seed(seed)
    model = case.build()
    model.train()
    opt = make_optimizer(optimizer, model, case.lr[optimizer], case.fused)
    g = torch.Generator().manual_seed(seed + 1)
    flags: dict[str, tuple[str, int]] = {}
    losses: list[float] = []
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, optimizer=opt if pass_optimizer else None, every=1) as diag:
            for _ in range(steps):
                x, y = case.inputs(g, kind)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                report = diag.step()
                losses.append(float(loss))
                if report is None:
                    continue
                if keep_reports:
                    reports.append(report)
                for layer in report.layers:
                    for flag in sorted(layer.status):
                        flags.setdefault(flag, (layer.name, report.step))
            findings = list(diag.findings)
    msgs = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    return Outcome(msgs, findings, flags, losses, reports)


def check(case: Family, kind: str = "smooth", seed: int = 0) -> tuple[Any, list[str]]:
    """``torchdiag.check`` on the freshly built model (one pass); returns the report and its DiagnosticWarnings."""
    torch.manual_seed(seed)
    model = case.build()
    model.train()
    x, y = case.inputs(torch.Generator().manual_seed(seed + 1), kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = torchdiag.check(model, x, loss_fn=lambda out: F.cross_entropy(out, y))
    return report, [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]


def describe(findings: list) -> str:
    """One line per finding: problem (direction) @ layer, first step, cause, message."""
    out = []
    for f in findings:
        d = f" ({f.direction})" if f.direction else ""
        cause = f", cause {f.cause}" if f.cause else ""
        out.append(f"{f.problem}{d} @ {f.layer} step {f.first_step}{cause}: {f.message}")
    return " || ".join(out) or "none"


CASES = HEALTHY + BROKEN
COMBOS = [(o, p, k) for o in ("adamw", "sgd") for p in (True, False) for k in ("smooth", "white")]


def table(cases: list[Family], combos=None, steps: int = 4, out=sys.stdout) -> None:
    combos = combos or [("adamw", True, "smooth")]
    print("| case | optimizer | optimizer= | input | loss first->last | findings | warnings | s |", file=out)
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", file=out)
    for case in cases:
        for opt, passed, kind in combos:
            t0 = time.perf_counter()
            res = train(case, opt, passed, kind, steps)
            dt = time.perf_counter() - t0
            loss = f"{res.losses[0]:.3g}->{res.losses[-1]:.3g}"
            print(f"| {case.name} | {opt} | {'yes' if passed else 'no'} | {kind} | {loss} | {describe(res.findings)}"
                  f" | {' || '.join(res.warnings) or 'none'} | {dt:.1f} |", file=out, flush=True)
        t0 = time.perf_counter()
        report, msgs = check(case)
        flagged = [(layer.name, sorted(layer.status)) for layer in report.flagged]
        print(f"| {case.name} | check() | - | smooth | - | {flagged or 'none'} | {' || '.join(msgs) or 'none'} |"
              f" {time.perf_counter() - t0:.1f} |", file=out, flush=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--all", action="store_true", help="every optimizer x optimizer= x input combination")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = CASES
    if args.only:
        names = set(args.only.split(","))
        cases = [c for c in CASES if c.name in names]
    table(cases, COMBOS if args.all else None, args.steps)


if __name__ == "__main__":
    main()
