"""Calibration zoo: healthy models must stay silent, broken ones must be flagged right.

Every model is built in code (no downloads). Each case says what it is, why it is healthy or
broken, and for broken ones which flag must fire and on which layer first.
Run ``python -m tests.helpers.zoo`` for the table of every model against every flag (it is in docs/diagnosis.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag

FLAGS = ("exploding", "vanishing", "nonfinite", "dead", "saturated", "large_updates", "small_updates")


# ----------------------------------------------------------------------------- models
def kaiming_mlp(depth: int = 24, width: int = 128) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def zero_head_mlp(depth: int = 12, width: int = 128) -> nn.Module:
    model = kaiming_mlp(depth, width)
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    return model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet-18-shaped (2 blocks per stage) at CIFAR scale, torchvision's init."""

    def __init__(self, widths=(16, 32, 64), blocks: int = 2, classes: int = 10, zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else w, w, 2 if (b == 0 and i > 0) else 1)
                                          for b in range(blocks)]))
            cin = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class PreActBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        out = self.conv1(self.relu1(self.bn1(x)))
        return x + self.conv2(self.relu2(self.bn2(out)))


def preact_resnet_fixed(blocks: int = 6, c: int = 16) -> nn.Module:
    """Pre-activation ResNet, randn init, then ``torchdiag.fix_init``: the convs that feed BatchNorm keep
    their (large) randn scale, which BatchNorm undoes; the residual convs are brought to std 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), *[PreActBlock(c) for _ in range(blocks)],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_()
    torchdiag.fix_init(model, torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    return model


class EncoderClassifier(nn.Module):
    def __init__(self, norm_first: bool, d: int = 64, layers: int = 4, vocab: int = 100, classes: int = 10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.emb(tokens)).mean(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """A small GPT-2-style decoder: N(0, 0.02) init, scaled residual projections, tied embeddings."""

    def __init__(self, vocab: int = 128, d: int = 64, layers: int = 6, heads: int = 4, ctx: int = 32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class LSTMTagger(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 32, hidden: int = 64, tags: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, tags)

    def forward(self, tokens):
        out, _ = self.lstm(self.emb(tokens))
        return self.head(out)


def xavier_relu_mlp(depth: int = 30, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.xavier_normal_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def randn_products(scale: float, depth: int = 100, width: int = 512) -> nn.Module:
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(torch.randn(width, width) * scale)
    return model


def sigmoid_stack(depth: int = 10, width: int = 256) -> nn.Module:
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Sigmoid())],
                         nn.Linear(width, 10))


def negative_bias_relu(depth: int = 12, width: int = 128) -> nn.Module:
    model = kaiming_mlp(depth, width)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, -3.0)
    return model


def tanh_times_3(depth: int = 8, width: int = 128) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.xavier_normal_(lin.weight, gain=nn.init.calculate_gain("tanh"))
        with torch.no_grad():
            lin.weight.mul_(3.0)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


# ----------------------------------------------------------------------------- cases
def _vec(dim: int, classes: int = 10, batch: int = 32):
    return lambda g: (torch.randn(batch, dim, generator=g), torch.randint(0, classes, (batch,), generator=g))


def _img(batch: int = 16):
    return lambda g: (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))


def _tokens(vocab: int, t: int, classes: int, per_token: bool, batch: int = 16):
    def make(g):
        x = torch.randint(0, vocab, (batch, t), generator=g)
        return x, torch.randint(0, classes, (batch, t) if per_token else (batch,), generator=g)

    return make


def _ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    data: Callable[[torch.Generator], tuple]
    healthy: bool
    why: str
    expect: dict[str, str] = field(default_factory=dict)  # flag -> first layer it must fire on
    expect_sgd: dict[str, str] | None = None  # where SGD's first bad layer differs
    lr: dict[str, float] = field(default_factory=lambda: {"sgd": 0.01, "adamw": 1e-3})


CASES = [
    Case("kaiming_relu_mlp", kaiming_mlp, _vec(128), True, "24 Linear+ReLU, Kaiming fan_in: He et al. 2015"),
    Case("resnet_bn", ResNet, _img(), True, "ResNet-18-shaped CNN, BatchNorm, torchvision init"),
    Case("resnet_bn_zero_init_residual", lambda: ResNet(zero_init_residual=True), _img(), True,
         "each block's last BatchNorm weight is zero: the branches start silent on purpose"),
    Case("transformer_post_norm", lambda: EncoderClassifier(False), _tokens(100, 16, 10, False), True,
         "nn.TransformerEncoder, post-norm, default init"),
    Case("transformer_pre_norm", lambda: EncoderClassifier(True), _tokens(100, 16, 10, False), True,
         "nn.TransformerEncoder, pre-norm, default init"),
    Case("gpt_decoder", GPT, _tokens(128, 32, 128, True), True,
         "GPT-2-style LM: N(0, 0.02), scaled residual projections, tied embeddings"),
    Case("preact_resnet_after_fix_init", preact_resnet_fixed, _img(), True,
         "convs feeding BatchNorm keep a large scale that BatchNorm undoes (a false alarm fix_init found)"),
    Case("zero_head_mlp", zero_head_mlp, _vec(128), True, "the head is zero-initialised on purpose"),
    Case("lstm_tagger", LSTMTagger, _tokens(100, 20, 8, True), True, "Embedding -> 2-layer LSTM -> Linear"),
    Case("xavier_relu_mlp", xavier_relu_mlp, _vec(256), False,
         "Xavier before ReLU halves the second moment per layer, forward and backward (He et al. 2015)",
         {"vanishing": "0"}),
    Case("randn_products", lambda: randn_products(1.0), _vec(512, 512, 16), False,
         "randn weights multiply the std by sqrt(512) per layer, from the first one on; float32 overflows near layer 28"
         " (ref/002)",
         {"exploding": "0", "nonfinite": "27"}),
    Case("randn_products_x0.01", lambda: randn_products(0.01), _vec(512, 512, 16), False,
         "0.01*randn multiplies the std by 0.226 per layer (ref/002); gradients underflow to 0 below",
         {"vanishing": "0"}),
    Case("sigmoid_stack", sigmoid_stack, _vec(256), False,
         "sigmoid' <= 1/4: gradients shrink ~7x per layer while the forward stays bounded", {"vanishing": "0"}),
    Case("negative_bias_relu", negative_bias_relu, _vec(128), False,
         "every bias -3: almost no pre-activation is positive (the vanishing that follows is attributed to it)",
         {"dead": "1"}),
    Case("learning_rate_too_high", kaiming_mlp, _vec(128), False,
         "SGD at lr 5 / AdamW at lr 1 replace the weights at every step (update ratio >> 0.5)",
         {"large_updates": "0"}, lr={"sgd": 5.0, "adamw": 1.0},
         expect_sgd={"large_updates": "48"}),  # SGD: the head's gradient is the largest relative to its weights
    Case("tanh_weights_x3", tanh_times_3, _vec(128), False,
         "Xavier-tanh weights x3: most tanh outputs sit at +-1, and gradients grow 1.6x per layer towards the input",
         {"saturated": "1", "exploding": "0"}),
]


def verdict(case: Case, optimizer: str, fired: dict[str, tuple[str, int]]) -> str | None:
    """None if what fired is right for the case, else why not.

    Healthy: nothing fires. Broken: each expected flag fires first on the expected layer, at the
    first step anything fires; flags that only appear at later steps are consequences (a learning
    rate too high goes on to explode and overflow) and are allowed.
    """
    if case.healthy:
        return None if not fired else f"false alarm: {fired}"
    expect = case.expect_sgd if optimizer == "sgd" and case.expect_sgd else case.expect
    got = {flag: layer for flag, (layer, _) in fired.items()}
    missing = {f: layer for f, layer in expect.items() if got.get(f) != layer}
    if missing:
        return f"expected {expect}, got {fired}"
    first = min(fired[f][1] for f in expect)
    extra = {f: v for f, v in fired.items() if f not in expect and v[1] <= first}
    return f"unexpected at the first bad step: {extra}" if extra else None


def run(case: Case, optimizer: str = "adamw", steps: int = 3, seed: int = 0) -> dict:
    """Train ``steps`` steps with watch on; return what fired: {flag: (first layer, step)} and the warnings."""
    torch.manual_seed(seed)
    model = case.build()
    g = torch.Generator().manual_seed(seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=case.lr["adamw"]) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=case.lr["sgd"], momentum=0.9))
    fired: dict[str, tuple[str, int]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, optimizer=opt) as diag:
            for _ in range(steps):
                x, y = case.data(g)
                loss = _ce(model(x), y)
                loss.backward()
                opt.step()  # ends the watcher's step (optimizer=opt)
                opt.zero_grad()
                report = diag.step()  # the report of the step that just ended
                for layer in report.layers:
                    for flag in layer.status:
                        fired.setdefault(flag, (layer.name, report.step))
    msgs = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    return {"fired": fired, "warnings": msgs, "report": report}


def table(optimizers=("adamw", "sgd"), steps: int = 3) -> str:
    head = "| model | healthy | optimizer | " + " | ".join(FLAGS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(FLAGS))]
    for case in CASES:
        for opt in optimizers:
            fired = run(case, opt, steps)["fired"]
            cells = [f"`{fired[f][0]}` @{fired[f][1]}" if f in fired else "" for f in FLAGS]
            lines.append(f"| {case.name} | {'yes' if case.healthy else 'no'} | {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table())
    print("\ncell = first layer the flag fired on @ the step it first fired (3 steps, every=1)")
