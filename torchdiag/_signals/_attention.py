"""Attention figures on a sample of queries: the largest logit q.k * scale over the allowed keys and the mean over
heads of the normalised entropy; ``nn.MultiheadAttention``'s q and k rebuilt from its projection; the mode entered
around a watched attention module's forward that reports each ``F.scaled_dot_product_attention`` call to the watch
whose module runs it."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .._capture.runtime import tracing

if TYPE_CHECKING:
    from .signals import Signals


def attention_figures(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                      allowed: torch.Tensor | None = None, additive: torch.Tensor | None = None, causal: bool = False,
                      max_queries: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(max logit over allowed keys, mean over heads of the normalised entropy) for ``q`` (B, H, Sq, D) and
    ``k`` (B, Hk, Sk, D), on the first two sequences and up to ``max_queries`` evenly spaced queries.

    ``allowed`` is a boolean mask broadcastable to (B, H, Sq, Sk), True where a query may attend; ``additive``
    a float mask added to the logits (``-inf`` excludes); ``causal`` the top-left causal mask of SDPA."""
    q, k = q[:2].detach(), k[:2].detach()
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    sq, sk = q.shape[-2], k.shape[-2]
    idx = _query_sample(sq, max_queries, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q[:, :, idx].float() @ k.float().transpose(-1, -2)) * scale  # (b, H, nq, Sk)
    if not causal and allowed is None and additive is None:  # every key allowed: no mask to build
        logp = torch.log_softmax(logits, dim=-1)
        ent = -(logp.exp() * logp).sum(-1)  # (b, H, nq)
        norm = ent / math.log(sk) if sk > 1 else torch.zeros_like(ent)
        return logits.amax(), norm.mean()
    if causal and allowed is None and additive is None:  # the causal mask alone: the same for every row and head
        excluded, inv_log, rows = _causal_plan(sk, idx)
        scores = logits.masked_fill(excluded, -math.inf)  # (every query keeps key 0: no row is all -inf)
        logp = torch.log_softmax(scores, dim=-1)
        plogp = (logp.exp() * logp).masked_fill_(excluded, 0.0)  # (0 * -inf is NaN: the excluded keys add 0)
        # mean over heads of each head's mean over the rows with more than one key, as _mean_normalised
        norm = -(plogp.sum(-1) * inv_log).sum() / (logits.shape[0] * logits.shape[1] * rows) if rows \
            else logits.new_zeros(())
        return scores.amax(), norm
    ok = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    if causal:
        ok &= torch.arange(sk, device=q.device)[None, :] <= idx[:, None]
    if allowed is not None:
        ok &= _rows(allowed, logits.shape, idx).to(torch.bool)
    scores = logits
    if additive is not None:  # -inf, or the dtype's lowest value (Hugging Face's masks), excludes a key
        lowest = torch.finfo(additive.dtype).min / 2 if additive.is_floating_point() else -math.inf
        add = _rows(additive, logits.shape, idx).float()
        ok &= torch.isfinite(add) & (add > lowest)
        scores = logits + torch.where(ok, add, torch.zeros_like(add))
    top = logits.masked_fill(~ok, torch.finfo(torch.float32).min).amax()
    logp = torch.log_softmax(scores.masked_fill(~ok, -math.inf), dim=-1)
    ent = -(torch.where(ok, logp.exp() * logp, torch.zeros_like(logp))).sum(-1)  # (b, H, nq)
    return top, _mean_normalised(ent, ok.sum(-1))


def _mean_normalised(ent: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mean over heads of each head's mean entropy / log(keys it could attend to), rows with one key left out.
    ``ent`` and ``n`` are (b, H, nq)."""
    rows = n > 1
    norm = torch.where(rows, ent / torch.log(n.clamp(min=2).float()), torch.zeros_like(ent))
    per_head = norm.sum(dim=(0, 2)) / rows.sum(dim=(0, 2)).clamp(min=1)
    has = rows.any(dim=2).any(dim=0)
    return (per_head * has).sum() / has.sum().clamp(min=1)


_SAMPLES: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_CAUSAL: dict[tuple[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]] = {}


def _causal_plan(sk: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For SDPA's top-left causal mask on the sampled queries ``idx`` (a ``_query_sample`` tensor, cached): the
    excluded keys (nq, Sk) bool, 1/log(keys each query may attend to) (nq,), 0 for a query with one key, and how
    many queries have more than one; cached per sample."""
    key = (sk, idx)
    plan = _CAUSAL.get(key)
    if plan is None:
        excluded = torch.arange(sk, device=idx.device)[None, :] > idx[:, None]
        n = (idx + 1).clamp(max=sk)
        inv_log = torch.where(n > 1, 1.0 / torch.log(n.clamp(min=2).float()), torch.zeros(n.shape, device=idx.device))
        plan = _CAUSAL[key] = (excluded, inv_log, int((n > 1).sum()))
        if len(_CAUSAL) > 256:
            _CAUSAL.clear()
    return plan


def _query_sample(sq: int, max_queries: int, device: torch.device) -> torch.Tensor:
    """Up to ``max_queries`` evenly spaced query positions (first and last included), cached per shape."""
    key = (sq, max_queries, device)
    idx = _SAMPLES.get(key)
    if idx is None:
        n = min(sq, max_queries)
        picks = sorted({round(i * (sq - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
        idx = _SAMPLES[key] = torch.tensor(picks, dtype=torch.long, device=device)
        if len(_SAMPLES) > 256:
            _SAMPLES.clear()
    return idx


def entropy_of_probs(p: torch.Tensor, max_queries: int = 64) -> torch.Tensor:
    """Mean over heads of the normalised entropy of attention probabilities (B, H, Sq, Sk)."""
    p = p[:2].detach()
    p = p[:, :, _query_sample(p.shape[-2], max_queries, p.device)].float()
    ok = p > 0
    ent = -(torch.where(ok, p * p.clamp(min=1e-30).log(), torch.zeros_like(p))).sum(-1)
    value = _mean_normalised(ent, ok.sum(-1))
    probs = ((p >= 0).all() & ((p.sum(-1) - 1).abs() < 1e-3).all())  # else not probabilities (T5: a position bias)
    return torch.where(probs, value, torch.full_like(value, math.nan))


def _rows(mask: torch.Tensor, shape: torch.Size, idx: torch.Tensor) -> torch.Tensor:
    """A mask broadcastable to (B, H, Sq, Sk), cut to the sampled sequences and queries."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m[: shape[0]] if m.shape[0] > 1 else m
    m = m[:, :, idx] if m.shape[2] > 1 else m
    return m.expand(shape)


def mha_figures(m: nn.MultiheadAttention, args: tuple, kwargs: dict, max_queries: int
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    got = dict(zip(names, args))
    got.update({k: v for k, v in kwargs.items() if k in names})
    query, key = got.get("query"), got.get("key")
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or query.dim() != 3:
        return None
    if not m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    query, key = query[:2], key[:2]
    e, h = m.embed_dim, m.num_heads
    if m.in_proj_weight is not None:
        wq, wk = m.in_proj_weight[:e], m.in_proj_weight[e: 2 * e]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bq = bk = None
    if m.in_proj_bias is not None:
        bq, bk = m.in_proj_bias[:e], m.in_proj_bias[e: 2 * e]
    with torch.no_grad():
        q = F.linear(query.detach(), wq.detach(), None if bq is None else bq.detach())
        k = F.linear(key.detach(), wk.detach(), None if bk is None else bk.detach())
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        q = q.view(b, sq, h, e // h).transpose(1, 2)
        k = k.view(b, sk, h, e // h).transpose(1, 2)
        allowed, additive = None, None
        kpm, am = got.get("key_padding_mask"), got.get("attn_mask")
        if isinstance(kpm, torch.Tensor):
            keep = ~kpm[:2].bool() if kpm.dtype == torch.bool else torch.isfinite(kpm[:2]) & (kpm[:2] == 0)
            allowed = keep[:, None, None, :]
        if isinstance(am, torch.Tensor):
            if am.dim() == 3:  # (N * H, L, S)
                am = am.view(-1, h, am.shape[-2], am.shape[-1])[:2]
            if am.dtype == torch.bool:
                keep = ~am
                allowed = keep if allowed is None else allowed & keep
            else:
                additive = am
        return attention_figures(q, k, allowed=allowed, additive=additive, max_queries=max_queries)


_SDPA_FN = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is


class SDPA:
    """``F.scaled_dot_product_attention`` calls seen inside the forwards of watched attention modules. On a
    recorded step a ``TorchFunctionMode`` (``_Observer``) is entered around such a forward alone and reports each
    SDPA call to the watch whose module runs it; nothing of ``torch.nn.functional`` is replaced, so scripting,
    other models and references taken meanwhile are untouched."""

    local = threading.local()  # .stack: (weak reference to the Signals, report name or None, its _Observer or
    # None) of each running attention module, innermost last; name None: its SDPA calls are not counted (not
    # recording, MHA's own call)

    @classmethod
    def enter(cls, ref: weakref.ref[Signals], name: str | None) -> None:
        """An attention module's forward begins (``name``: its calls are counted, under that name)."""
        stack = cls.local.__dict__.setdefault("stack", [])
        mode = None
        if name is not None:
            mode = _Observer()
            mode.__enter__()
        stack.append((ref, name, mode))

    @classmethod
    def leave(cls) -> tuple[weakref.ref[Signals], str | None] | None:
        """An attention module's forward ended: (its owner's reference, its name), or None if none was running."""
        stack = getattr(cls.local, "stack", None)
        if not stack:
            return None
        ref, name, mode = stack.pop()
        if mode is not None:
            _leave(mode)
        return ref, name

    @classmethod
    def forget(cls, ref: weakref.ref[Signals]) -> None:
        """Drop the entries of one watch's signals (``ref``), and entries of signals gone, from this thread's stack,
        and leave their modes: those an attention forward left when it never returned (a ``KeyboardInterrupt``:
        PyTorch runs ``always_call`` forward hooks for an ``Exception`` only)."""
        stack = getattr(cls.local, "stack", None)
        if stack:
            gone = [e for e in stack if e[0] is ref or e[0]() is None]
            stack[:] = [e for e in stack if not (e[0] is ref or e[0]() is None)]
            for e in reversed(gone):
                if e[2] is not None:
                    _leave(e[2])


def _leave(mode: _Observer) -> None:
    """Take ``mode`` off this thread's torch function mode stack, wherever it is on it (modes entered after it
    are put back in their order)."""
    mode.done = True
    above = []
    try:
        while torch._C._len_torch_function_stack() > 0:
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                break
            above.append(top)
    finally:
        for m in reversed(above):
            torch._C._push_on_torch_function_stack(m)


class _Observer(torch.overrides.TorchFunctionMode):
    """Entered around one watched attention module's forward on a recorded step: each SDPA call made in it (and
    not in a nested attention module's) is reported to the watch; every call runs exactly as it would without."""

    def __init__(self) -> None:
        super().__init__()
        self.done = False

    def __torch_function__(self, func: Callable, types: Sequence[type], args: tuple = (),
                           kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SDPA_FN and not self.done and not tracing():
            _report(self, args, kwargs)
        return out


def _report(mode: _Observer, args: tuple, kwargs: dict) -> None:
    stack = getattr(SDPA.local, "stack", None)
    if not stack or stack[-1][2] is not mode:  # a nested module's call (its own mode reports it), or MHA's own
        return
    owner, name = stack[-1][0](), stack[-1][1]
    if owner is not None and name is not None:
        try:
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args))
            named.update(kwargs)
            owner.on_sdpa(name, named.get("query"), named.get("key"), named.get("attn_mask"),
                          bool(named.get("is_causal", False)), named.get("scale"))
        except Exception:  # noqa: BLE001, S110 - torchdiag's figures never break the user's attention
            pass
