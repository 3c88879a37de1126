"""One-pass statistics on a GPU: a Triton kernel reads each tensor once for its whole row.

The ATen path (``stats``) reads an activation three to five times (``sum``, a norm, ``aminmax``,
``sign``) and launches 5-8 kernels for it; this module's kernels read it once and launch two:
each program reduces a contiguous chunk to partial sums about the shift ``r = x[0]`` (loaded by
every program, so the shift costs nothing and is always taken), min, max, non-zero and saturated
counts, and a second one-program kernel adds the partials in a fixed order (deterministic, no
atomics) into the row ``stats.act_row`` would give. Used for CUDA tensors when Triton imports;
the first failure (an old Triton, an unsupported dtype) turns it off for the process with a
warning and the ATen path takes over.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from .._reduce.accumulators import MomentAccumulator
from ..errors import warn_self

try:  # Triton ships with CUDA builds of torch; CPU builds and other platforms have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent (CI)
    triton = None

BLOCK = 1024  # elements per program per iteration
_MAX_PROGRAMS = 4096  # partials per tensor: the finishing kernel reduces them in one block
_enabled = triton is not None
_COLS = MomentAccumulator.ACT_COLS  # the statistics row: r, sum(x - r), sum((x - r)^2), min, max, non-zero, saturated

if triton is not None:

    @triton.jit
    def _min_nan(v):
        bad = tl.max(tl.where(v != v, 1.0, 0.0), 0)  # tl.min's NaN handling is unspecified: NaN wins here
        return tl.where(bad > 0, float("nan"), tl.min(v, 0))

    @triton.jit
    def _max_nan(v):
        bad = tl.max(tl.where(v != v, 1.0, 0.0), 0)
        return tl.where(bad > 0, float("nan"), tl.max(v, 0))

    @triton.jit(do_not_specialize=["n", "chunk"])
    def _partials(x_ptr, part_ptr, n, chunk, centre, half, BLOCK: tl.constexpr, SAT: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.load(x_ptr).to(tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        q = tl.zeros((BLOCK,), tl.float32)
        mn = tl.full((BLOCK,), float("inf"), tl.float32)
        mx = tl.full((BLOCK,), float("-inf"), tl.float32)
        nz = tl.zeros((BLOCK,), tl.float32)
        sat = tl.zeros((BLOCK,), tl.float32)
        base = pid.to(tl.int64) * chunk
        for start in range(0, chunk, BLOCK):
            offs = base + start + tl.arange(0, BLOCK)
            mask = offs < n
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - r, 0.0)
            s += d
            q += d * d
            mn = tl.minimum(mn, tl.where(mask, v, float("inf")), propagate_nan=tl.PropagateNan.ALL)
            mx = tl.maximum(mx, tl.where(mask, v, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
            nz += tl.where(mask & (v != 0.0), 1.0, 0.0)
            if SAT:
                sat += tl.where(mask & (tl.abs(v - centre) > half), 1.0, 0.0)
        out = part_ptr + pid * 8
        tl.store(out, tl.sum(s, 0))
        tl.store(out + 1, tl.sum(q, 0))
        tl.store(out + 2, _min_nan(mn))
        tl.store(out + 3, _max_nan(mx))
        tl.store(out + 4, tl.sum(nz, 0))
        tl.store(out + 5, tl.sum(sat, 0))

    @triton.jit(do_not_specialize=["programs"])
    def _finish(x_ptr, part_ptr, row_ptr, programs, P: tl.constexpr, ZEROS: tl.constexpr, SAT: tl.constexpr):
        i = tl.arange(0, P)
        mask = i < programs
        p = part_ptr + i * 8
        tl.store(row_ptr, tl.load(x_ptr).to(tl.float32))
        tl.store(row_ptr + 1, tl.sum(tl.load(p, mask=mask, other=0.0), 0))
        tl.store(row_ptr + 2, tl.sum(tl.load(p + 1, mask=mask, other=0.0), 0))
        tl.store(row_ptr + 3, _min_nan(tl.load(p + 2, mask=mask, other=float("inf"))))
        tl.store(row_ptr + 4, _max_nan(tl.load(p + 3, mask=mask, other=float("-inf"))))
        if ZEROS:
            tl.store(row_ptr + 5, tl.sum(tl.load(p + 4, mask=mask, other=0.0), 0))
        else:
            tl.store(row_ptr + 5, float("nan"))
        if SAT:
            tl.store(row_ptr + 6, tl.sum(tl.load(p + 5, mask=mask, other=0.0), 0))
        else:
            tl.store(row_ptr + 6, float("nan"))


# Below this many elements a gradient's or weight's three moments go through ATen: its two reductions launch
# faster from Python than the two Triton kernels (measured on an H100 host: ~30 us against ~70 us), and the
# second read pass costs the GPU next to nothing. Activations, whose ATen row is 5-8 launches, always fuse.
SMALL = 1 << 20


def usable(x: torch.Tensor, small_ok: bool = True) -> bool:
    """Whether ``x`` (a flat, contiguous view) goes through the fused kernels."""
    return (_enabled and x.is_cuda and (small_ok or x.numel() >= SMALL)
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.is_contiguous())


def _on(device: torch.device) -> Any:
    """Triton launches on the current device: switch only when ``device`` is another one."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _grid(n: int) -> tuple[int, int]:
    """(elements per program, programs) for ``n`` elements: at most ``_MAX_PROGRAMS`` programs."""
    chunk = BLOCK * max(1, math.ceil(n / (BLOCK * _MAX_PROGRAMS)))
    return chunk, math.ceil(n / chunk)


def _give_up(what: str, e: Exception) -> None:
    """The first kernel failure turns the fused path off for the process, with one warning."""
    global _enabled
    _enabled = False
    warn_self(f"torchdiag: the fused Triton {what} kernel failed ({type(e).__name__}: {e}); using the slower"
              " ATen path from now on", category=RuntimeWarning)


def row(x: torch.Tensor, saturation: tuple[float, float] | None = None, zeros: bool = False) -> torch.Tensor | None:
    """The 7 statistics of the flat tensor ``x`` as one float32 device tensor; None if the kernels failed.

    Columns as ``stats.act_row``: the shift ``x[0]``, sum and sum of squares about it, min, max, the
    non-zero count (NaN unless ``zeros``) and the saturated count (NaN when ``saturation`` is None).
    """
    n = x.numel()
    chunk, programs = _grid(n)
    try:
        buf = torch.empty(8 * programs + 8, dtype=torch.float32, device=x.device)  # partials, then the row
        part, out = buf[: 8 * programs], buf[8 * programs: 8 * programs + _COLS]
        c, h = saturation if saturation is not None else (0.0, 0.0)
        with _on(x.device):
            _partials[(programs,)](x, part, n, chunk, float(c), float(h), BLOCK=BLOCK, SAT=saturation is not None)
            _finish[(1,)](x, part, out, programs, P=max(16, triton.next_power_of_2(programs)), ZEROS=zeros,
                          SAT=saturation is not None)
    except Exception as e:  # noqa: BLE001 - fall back to the ATen path for good, never break the step
        _give_up("statistics", e)
        return None
    return out


if triton is not None:

    @triton.jit(do_not_specialize=["n", "chunk"])
    def _histogram(x_ptr, row_ptr, out_ptr, n, chunk, BINS: tl.constexpr, SLOTS: tl.constexpr,
                   BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        lo = tl.load(row_ptr + 3)
        hi = tl.load(row_ptr + 4)
        pad = tl.where(lo == hi, 1.0, 0.0)  # a constant tensor: [x - 1, x + 1], as torch.histc
        lo = lo - pad
        hi = hi + pad
        width = hi - lo
        if pid == 0:
            tl.store(out_ptr, lo.to(tl.float64))
            tl.store(out_ptr + 1, hi.to(tl.float64))
        acc = tl.zeros((SLOTS,), tl.int32)
        base = pid.to(tl.int64) * chunk
        for start in range(0, chunk, BLOCK):
            offs = base + start + tl.arange(0, BLOCK)
            mask = offs < n
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.math.div_rn((v - lo) * BINS, width)  # torch.histc's arithmetic, IEEE division (not `/`)
            b = tl.where(b == b, b, 0.0)  # NaN (the host drops such a histogram anyway)
            idx = tl.minimum(tl.maximum(b, 0.0), BINS - 1).to(tl.int32)  # the maximum goes in the last bin
            idx = tl.where(mask, idx, SLOTS - 1)  # lanes past the end: a slot that is never read
            acc += tl.histogram(idx, SLOTS)
        slots = tl.arange(0, SLOTS)
        tl.atomic_add(out_ptr + 2 + slots, acc.to(tl.float64), mask=slots < BINS)  # integers: exact, any order


def histogram(x: torch.Tensor, row: torch.Tensor, out: torch.Tensor) -> bool:
    """Fixed-bin histogram of the flat tensor ``x`` over ``[row[3], row[4]]`` (its min and max from ``row``)
    into the float64 row ``out`` = ``[lo, hi, counts...]``, in one read; False if the kernel failed."""
    bins = out.shape[0] - 2
    n = x.numel()
    chunk, programs = _grid(n)
    try:
        out[2:].zero_()
        with _on(x.device):
            _histogram[(programs,)](x, row, out, n, chunk, BINS=bins,
                                                SLOTS=triton.next_power_of_2(bins + 1), BLOCK=BLOCK)
    except Exception as e:  # noqa: BLE001 - fall back to the ATen path for good, never break the step
        _give_up("histogram", e)
        return False
    return True
