"""Whole training runs under ``torchdiag.watch``: data, models, recipes and one ``run(case)``.

Only the public API is used (``torchdiag.watch``, ``Watcher.step`` / ``findings``, ``DiagnosticWarning``).
Data ships offline: ``sklearn.datasets.load_digits()`` for the classifiers, the bytes of CPython's standard-library
sources for the byte-level language models.

    python -m tests.helpers.runs            # every case, as a table
    python -m tests.helpers.runs mlp_adam   # some of them
"""

from __future__ import annotations

import glob
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag

LN_VOCAB = math.log(256)  # 5.545: the loss of a uniform byte model


# ---------------------------------------------------------------------------------------------------- data


@cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised digits (1,797 × 64 pixels), a fixed 1,397 / 400 train / held-out split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:1397], y[:1397], x[1397:], y[1397:]
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-3)
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def digit_batches(steps: int, batch: int = 64, seed: int = 0, n_train: int | None = None):
    """``steps`` random training batches (``n_train``: only the first n examples, a small-data run)."""
    x, y, _, _ = digits()
    if n_train is not None:
        x, y = x[:n_train], y[:n_train]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
        yield x[idx], y[idx]


@cache
def stdlib_bytes() -> torch.Tensor:
    """CPython's standard-library ``.py`` files (top level, sorted), concatenated: byte ids 0..255."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    data = b"".join(open(f, "rb").read() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def byte_split() -> tuple[torch.Tensor, torch.Tensor]:
    """First 90 % of the bytes to train on, the last 10 % held out."""
    data = stdlib_bytes()
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def byte_batches(steps: int, batch: int = 16, seq: int = 64, seed: int = 0, held_out: bool = False):
    """``steps`` batches of ``seq + 1`` consecutive bytes at random offsets (fixed seed)."""
    data = byte_split()[1 if held_out else 0]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + seq + 1] for s in start.tolist()])


# ---------------------------------------------------------------------------------------------------- models


def mlp12(width: int = 256, depth: int = 12) -> nn.Sequential:
    """``depth`` × (Linear ``width`` + ReLU) and a Linear head, Kaiming-normal (fan_in, ReLU), zero biases."""
    layers: list[nn.Module] = []
    fan = 64
    for _ in range(depth):
        layers += [nn.Linear(fan, width), nn.ReLU()]
        fan = width
    layers.append(nn.Linear(fan, 10))
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


class Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def cnn() -> nn.Sequential:
    """Digits as 1×8×8: four 3×3 conv + ReLU (PyTorch's default init), a 2×2 max-pool, a Linear head."""
    return nn.Sequential(
        Reshape(1, 8, 8),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(d)
        self.channel_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer on digits: 16 patches of 2×2 pixels, d 64, 4 blocks, mean-pooled LayerNorm head."""

    def __init__(self, d: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList(MixerBlock(16, d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        h = self.embed(p)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def _transformers() -> None:
    """transformers imports torchvision when it is installed: load it beside the CPU torch first."""
    from tests.helpers.thirdparty import import_torchvision

    import_torchvision()


def gpt2(d: int = 64, layers: int = 4, heads: int = 4, seq: int = 64) -> nn.Module:
    _transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_positions=seq, n_embd=d, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def llama(d: int = 64, layers: int = 4, heads: int = 4, seq: int = 64) -> nn.Module:
    _transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=8 * d // 3 // 8 * 8, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=seq,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


MODELS = {"mlp12": mlp12, "cnn": cnn, "mixer": Mixer, "gpt2": gpt2, "llama": llama}
LMS = ("gpt2", "llama")


# ---------------------------------------------------------------------------------------------------- recipes


@dataclass
class Case:
    """One training run.

    recipe: ``adam`` (Adam, constant lr), ``adamw_cosine`` (AdamW, linear warm-up over ``warmup`` steps, cosine decay
    to 10 %, weight decay 0.1 (LMs) / 0.01, clipping at ``clip``), ``sgd_step`` (SGD momentum 0.9, ×0.1 at 1/2 and
    3/4 of the run), ``sgd`` (plain SGD, constant lr), ``adamw`` (AdamW, constant lr: no warm-up, no clipping).
    """

    name: str
    model: str
    recipe: str
    lr: float
    steps: int
    batch: int = 64
    warmup: int = 0
    clip: float | None = None
    bf16: bool = False
    optimizer_arg: bool = True  # watch(model, optimizer=opt); False: watch(model) and diag.step(loss=) after opt.step()
    n_train: int | None = None  # classifiers: train on only the first n examples
    seed: int = 0
    diverges: bool = False  # what the case is built to do, decided from first principles (see the test file)


def make_optimizer(case: Case, model: nn.Module):
    params = list(model.parameters())
    if case.recipe == "adam":
        opt = torch.optim.Adam(params, lr=case.lr)
    elif case.recipe == "adamw":
        opt = torch.optim.AdamW(params, lr=case.lr, weight_decay=0.0)
    elif case.recipe == "adamw_cosine":
        wd = 0.1 if case.model in LMS else 0.01
        opt = torch.optim.AdamW(params, lr=case.lr, weight_decay=wd, betas=(0.9, 0.95))
    elif case.recipe in ("sgd_step", "sgd"):
        opt = torch.optim.SGD(params, lr=case.lr, momentum=0.9 if case.recipe == "sgd_step" else 0.0)
    else:
        raise ValueError(case.recipe)
    sched = None
    if case.recipe == "adamw_cosine":
        def factor(t: int) -> float:
            if t < case.warmup:
                return (t + 1) / case.warmup
            p = (t - case.warmup) / max(1, case.steps - case.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    elif case.recipe == "sgd_step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [case.steps // 2, 3 * case.steps // 4], gamma=0.1)
    return opt, sched


# ---------------------------------------------------------------------------------------------------- run


@dataclass
class Warned:
    step: int  # the loop step (0-based) during which the warning arrived
    text: str


@dataclass
class RunResult:
    case: Case
    losses: list[float]
    metric_name: str  # "held-out accuracy" (classifiers) or "held-out loss" (LMs)
    metric: float
    heldout_loss_before: float
    heldout_loss_after: float
    warnings: list[Warned]
    findings: list  # torchdiag's RunFinding objects
    seconds: float
    other_warnings: list[str] = field(default_factory=list)

    @property
    def divergence_step(self) -> int | None:
        return divergence_step(self.losses)

    @property
    def first_warning_step(self) -> int | None:
        return self.warnings[0].step if self.warnings else None

    @property
    def lead(self) -> int | None:
        d, w = self.divergence_step, self.first_warning_step
        return None if d is None or w is None else d - w


def divergence_step(losses: list[float], window: int = 5, margin: float = 1.0) -> int | None:
    """The first step whose loss diverged, measured from the losses alone (without torchdiag).

    Diverged: the loss is non-finite; or it is more than ``margin`` nats above the untrained model's (step 0's) loss,
    which training that works never is, not even on its worst batch; or the mean of the last ``window`` losses has
    risen more than ``margin`` nats above the lowest such mean before it (the loss was going down and went back up: a
    slow divergence; batch noise of a healthy run moves it by far less).
    """
    best = math.inf
    for t, loss in enumerate(losses):
        if not math.isfinite(loss) or loss > losses[0] + margin:
            return t
        if t + 1 >= window:
            mean = sum(losses[t + 1 - window : t + 1]) / window
            if mean > best + margin:
                return t
            best = min(best, mean)
    return None


def _loss(case: Case, model: nn.Module, batch) -> torch.Tensor:
    if case.model in LMS:
        tokens = batch
        logits = model(input_ids=tokens[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, 256), tokens[:, 1:].reshape(-1))
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


@torch.no_grad()
def evaluate(case: Case, model: nn.Module) -> tuple[float, float]:
    """(held-out loss, held-out accuracy or nan) in eval mode, unrecorded (no_grad)."""
    was = model.training
    model.eval()
    try:
        if case.model in LMS:
            losses = [_loss(case, model, b).item() for b in byte_batches(8, batch=16, seed=123, held_out=True)]
            return sum(losses) / len(losses), float("nan")
        _, _, xte, yte = digits()
        out = model(xte).float()
        return F.cross_entropy(out, yte).item(), (out.argmax(1) == yte).float().mean().item()
    finally:
        model.train(was)


def batches(case: Case):
    if case.model in LMS:
        return byte_batches(case.steps, batch=case.batch, seed=case.seed)
    return digit_batches(case.steps, batch=case.batch, seed=case.seed, n_train=case.n_train)


def run(case: Case) -> RunResult:
    """Train ``case`` under ``torchdiag.watch`` (the default cadence: the time budget), loss given to
    ``step(loss=)``; collect the loss per step, the DiagnosticWarnings (the loop step each arrived at) and the
    run's findings."""
    torch.set_num_threads(1)
    torch.manual_seed(case.seed)
    model = MODELS[case.model]()
    model.train()
    before, _ = evaluate(case, model)
    opt, sched = make_optimizer(case, model)
    losses: list[float] = []
    got: list[Warned] = []
    other: list[str] = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = 0

        def collect(step: int) -> None:
            nonlocal seen
            for w in caught[seen:]:
                if issubclass(w.category, torchdiag.DiagnosticWarning):
                    got.append(Warned(step, str(w.message)))
                else:
                    other.append(f"{w.category.__name__}: {w.message}")
            seen = len(caught)

        kwargs = {"optimizer": opt} if case.optimizer_arg else {}
        with torchdiag.watch(model, **kwargs) as diag:
            for t, batch in enumerate(batches(case)):
                if case.bf16:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = _loss(case, model, batch)
                else:
                    loss = _loss(case, model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if case.clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip)
                opt.step()
                if sched is not None:
                    sched.step()
                diag.step(loss=loss.detach())
                losses.append(loss.item())
                collect(t)
        collect(len(losses))  # what leaving the watch says
        findings = list(diag.findings)
    seconds = time.perf_counter() - t0
    after, acc = evaluate(case, model)
    is_lm = case.model in LMS
    return RunResult(case, losses, "held-out loss" if is_lm else "held-out accuracy", after if is_lm else acc,
                     before, after, got, findings, seconds, other)


# ---------------------------------------------------------------------------------------------------- cases

MLP_STEPS = 300
LM_STEPS = 120

HEALTHY = [
    Case("mlp_adam", "mlp12", "adam", 1e-3, MLP_STEPS),
    Case("mlp_adam_no_opt_arg", "mlp12", "adam", 1e-3, MLP_STEPS, optimizer_arg=False),
    Case("mlp_adamw_cosine", "mlp12", "adamw_cosine", 1e-3, MLP_STEPS, warmup=30, clip=1.0),
    Case("mlp_sgd_step", "mlp12", "sgd_step", 0.01, MLP_STEPS),
    Case("mlp_adam_bf16", "mlp12", "adam", 1e-3, MLP_STEPS, bf16=True),
    Case("mlp_small_data", "mlp12", "adam", 1e-3, 400, batch=16, n_train=400),  # heavy-tailed batch losses
    Case("mlp_tiny_data", "mlp12", "adam", 1e-3, MLP_STEPS, batch=16, n_train=100),  # loss to ~1e-6
    Case("cnn_adam", "cnn", "adam", 1e-3, MLP_STEPS),
    Case("mixer_adamw_cosine", "mixer", "adamw_cosine", 3e-3, 200, warmup=20, clip=1.0),
    Case("gpt2_adamw_cosine", "gpt2", "adamw_cosine", 3e-3, LM_STEPS, batch=16, warmup=15, clip=1.0),
    Case("llama_adamw_cosine", "llama", "adamw_cosine", 3e-3, LM_STEPS, batch=16, warmup=15, clip=1.0),
]

# Too high a learning rate, decided from first principles: SGD at lr 3 on a 12-layer ReLU MLP (gradient ~1 per unit:
# steps far larger than the 0.09 weight scale, a positive feedback through 12 layers); Adam at lr 0.3 (every weight
# moves by ~0.3 per step, 3x the Kaiming std); AdamW at lr 0.3 without warm-up on a byte LM (GPT-2/Llama train at
# ~3e-3: embeddings drawn at 0.02 move by 15x their norm on the first step). A slow divergence (attention logits
# growing for tens of steps before the loss goes) did not show in these pre-norm models within 300 steps: GPT-2 at
# lr 0.05 / 0.1 and Llama at 0.03 / 0.1 pass 1e3 logits at steps 10-65, then plateau at loss ~2.8-3.2 (healthy 2.3).
DIVERGING = [
    Case("mlp_sgd_lr3", "mlp12", "sgd", 3.0, 60, diverges=True),
    Case("mlp_adam_lr0.3", "mlp12", "adam", 0.3, 60, diverges=True),
    Case("gpt2_adamw_lr0.3", "gpt2", "adamw", 0.3, 40, batch=16, diverges=True),
    Case("llama_adamw_lr0.3", "llama", "adamw", 0.3, 40, batch=16, diverges=True),
    # the same without optimizer=: no update ratio, so what is left to warn must come from the forward/backward
    Case("mlp_adam_lr0.3_no_opt_arg", "mlp12", "adam", 0.3, 60, optimizer_arg=False, diverges=True),
    Case("gpt2_adamw_lr0.3_no_opt_arg", "gpt2", "adamw", 0.3, 40, batch=16, optimizer_arg=False, diverges=True),
]

CASES = {c.name: c for c in HEALTHY + DIVERGING}


# ---------------------------------------------------------------------------------------------------- table


def describe_findings(result: RunResult, width: int = 0) -> str:
    """One entry per problem and cause: ``problem (direction) @ layer (+N layers) @ first step: fix``."""
    groups: dict[tuple, list] = {}
    for f in result.findings:
        groups.setdefault((f.problem, f.direction, f.cause), []).append(f)
    parts = []
    for (problem, direction, cause), fs in groups.items():
        lead = next((f for f in fs if f.layer == cause), min(fs, key=lambda f: f.first_step))
        where = f" ({direction})" if direction else ""
        more = f" (+{len(fs) - 1} layers)" if len(fs) > 1 else ""
        fix = lead.message.split("Fix: ", 1)[-1] if "Fix: " in lead.message else lead.message
        if width:
            fix = fix[:width] + ("…" if len(fix) > width else "")
        parts.append(f"{problem}{where} @ '{lead.layer}'{more} @ {min(f.first_step for f in fs)}: {fix}")
    return "; ".join(parts) or "-"


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def row(r: RunResult) -> str:
    c = r.case
    recipe = f"{c.recipe} lr {c.lr:g}" + (" bf16" if c.bf16 else "") + ("" if c.optimizer_arg else " (no optimizer=)")
    metric = f"{r.metric:.3f} ({'acc' if r.metric_name.endswith('accuracy') else 'loss'})"
    return (f"| {c.name} | {c.model} | {recipe} | {c.steps} | {metric} | {_fmt(r.divergence_step)} | "
            f"{_fmt(r.first_warning_step)} | {_fmt(r.lead)} | {len(r.warnings)} | {describe_findings(r, 160)} |")


def main(argv: list[str] | None = None) -> None:
    names = (sys.argv[1:] if argv is None else argv) or list(CASES)
    print("| run | model | recipe | steps | final held-out | divergence step | first warning | lead | warnings "
          "| findings (problem @ layer @ step: cause/fix) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for name in names:
        r = run(CASES[name])
        results.append(r)
        print(row(r), flush=True)
    print()
    for r in results:
        for w in r.warnings:
            print(f"{r.case.name} step {w.step}: {w.text}")
    print()
    for r in results:
        print(f"{r.case.name}: {r.seconds:.1f} s, losses {r.losses[0]:.3f} -> {min(r.losses):.3f} (min) -> "
              f"{r.losses[-1]:.3f}, held-out loss {r.heldout_loss_before:.3f} -> {r.heldout_loss_after:.3f}")


if __name__ == "__main__":
    main()
