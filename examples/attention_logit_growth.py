"""Attention-logit growth at a high learning rate, and qk-layernorm preventing it (Wortsman et al. 2023).

A small pre-norm transformer language model is trained on synthetic token sequences with AdamW at a high learning
rate, once as it is and once with qk-layernorm (a LayerNorm on q and on k before their dot product). torchdiag
records the largest attention logit of each layer on every recorded step; the first run's logits grow past
``attention_logit_max`` and are flagged ``attention_logits``, the second's stay small.

    python examples/attention_logit_growth.py [--steps 150] [--lr 0.3]
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag


class CausalAttention(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.q_norm = nn.LayerNorm(d // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(d // heads) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), CausalAttention(d, heads, qk_norm)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, heads: int = 4, depth: int = 2, seq: int = 64,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, qk_norm) for _ in range(depth))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def batches(steps: int, batch: int = 16, seq: int = 64, vocab: int = 256, seed: int = 0):
    """Sequences with structure to learn: each token is the previous one plus a per-sequence stride."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 8, (batch, 1), generator=g)
        yield (start + stride * torch.arange(seq + 1)) % vocab


def train(qk_norm: bool, steps: int, lr: float, every: int = 10) -> dict:
    torch.manual_seed(0)
    model = TinyLM(qk_norm=qk_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    logits_max: list[tuple[int, float]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchdiag.watch(model, every=every, optimizer=opt) as diag:
            for tokens in batches(steps):
                out = model(tokens[:, :-1])
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), tokens[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                report = diag.step(loss=loss)
                if report is not None:
                    tops = [r.attention_logit_max for r in report.layers if r.attention_logit_max is not None]
                    logits_max.append((report.step, max(tops)))
    flagged = sorted({f.problem for f in diag.findings if f.problem.startswith("attention")})
    return {"model": model, "final_loss": loss.item(), "logits_max": logits_max, "findings": flagged,
            "warnings": [str(w.message) for w in caught if "attention" in str(w.message)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.3)
    args = parser.parse_args()
    print(f"TinyLM (2 blocks, d 64, 4 heads), AdamW lr {args.lr:g}, {args.steps} steps; largest attention logit")
    print("| step | " + " | ".join(["no qk-norm", "qk-layernorm"]) + " |\n| --- | --- | --- |")
    runs = [train(False, args.steps, args.lr), train(True, args.steps, args.lr)]
    for (step, a), (_, b) in zip(*(r["logits_max"] for r in runs)):
        if step % 50 == 0 or step == runs[0]["logits_max"][-1][0]:
            print(f"| {step} | {a:.3g} | {b:.3g} |")
    for name, r in zip(("no qk-norm", "qk-layernorm"), runs):
        print(f"{name}: final loss {r['final_loss']:.3f}, findings {r['findings'] or 'none'}")


if __name__ == "__main__":
    main()
