"""A controlled slow divergence for the steps-to-divergence forecast: the query and key weights of a small attention
model grow 12 % a step (what a too-high learning rate does to them over tens of steps, Wortsman et al. 2023), so the
largest attention logit grows ~1.25x a step from ~2 to past ``attention_logit_max``."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

import torchdiag


class Attention(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a + h)


def hand_logit_max(model: Attention, x: torch.Tensor) -> float:
    """max over heads, queries and keys of q.k/sqrt(d_head), from the module's own weights."""
    with torch.no_grad():
        h = model.inp(x)
        d, heads = h.shape[-1], model.attn.num_heads
        w, b = model.attn.in_proj_weight, model.attn.in_proj_bias
        q = (h @ w[:d].T + b[:d]).view(*h.shape[:2], heads, d // heads).transpose(1, 2)
        k = (h @ w[d:2 * d].T + b[d:2 * d]).view(*h.shape[:2], heads, d // heads).transpose(1, 2)
        return (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).max().item()


def growing_attention(steps: int = 60, growth: float = 1.12) -> tuple[list[float], list, list[str]]:
    """Watch the model while its q/k weights grow: (the largest logit before each step, by hand; the forecasts the
    watch made; the DiagnosticWarnings' texts)."""
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(2, 24, 16)
    logits, forecasts = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model) as diag:
            for _ in range(steps):
                logits.append(hand_logit_max(model, x))
                model(x).pow(2).mean().backward()
                model.zero_grad()
                report = diag.step()  # None at a step the time budget leaves out
                forecasts += report.forecasts if report is not None else []
                with torch.no_grad():
                    model.attn.in_proj_weight[: 2 * model.attn.embed_dim] *= growth
    return logits, forecasts, [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
