"""Pure statistics: tensors -> on-device moment rows (merged on the host by ``accumulators``).

Each recorded tensor becomes one short row of float32 numbers computed where the tensor
lives, with no host synchronisation: a ``sum`` and a ``dot(x, x)`` (measured on CPU at a
fraction of ``torch.var_mean``'s cost), ``aminmax`` for activations, and counts only where a
rule reads them (zeros of ReLU outputs, rails of tanh/sigmoid). The host turns rows into
exact per-call moments and merges calls with Chan's parallel formula in float64.

Precision: ``sum(x**2) - n*mean**2`` cancels when ``|mean| >> std``. So moments are taken
about a shift ``r`` (the tensor's first element) on a layer's first recorded step and on
any step after one that showed ``|mean| > SHIFT_RATIO * std``; well-conditioned layers skip
the subtraction pass.

NaN/Inf: an activation's from its min/max (``aminmax`` propagates NaN), a gradient's from its
sum and sum of squares (NaN/Inf propagate); counting them element by element would cost a
full pass (~20x a ``sum``).
"""

from __future__ import annotations

import math

import torch

from .._reduce.accumulators import MomentAccumulator
from .._vocab import FORMATS, Format
from . import _cpurow as cpurow
from . import _fused as fused

# Row layouts. Activation: r, sum(x-r), sum((x-r)^2), min, max, nonzero count (NaN: not counted),
# saturated count (NaN: not counted). Gradient / weight (ATen path): r, sum(x-r), sum((x-r)^2)[, min, max]; from
# a kernel (fused on CUDA, cpurow on the CPU) every row is an activation row, a 1-D tensor (min and max come free).
ACT_COLS = MomentAccumulator.ACT_COLS  # a statistics row: r, sum(x - r), sum((x - r)^2), min, max, nonzero, saturated
MOMENT_COLS = 3  # its first three: what a sum of squares and the moments are read from
SHIFT_RATIO = 10.0  # |mean| / std above which the next recorded step subtracts a shift first

_CONST: dict[tuple[torch.device, float], torch.Tensor] = {}


def _const(device: torch.device, value: float) -> torch.Tensor:
    t = _CONST.get((device, value))
    if t is None:
        t = _CONST[(device, value)] = torch.full((), value, dtype=torch.float32, device=device)
    return t


_F32 = torch.float32


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``x`` in its own dtype (a copy only for truly strided layouts).

    Half-precision tensors are not converted: every reduction below reads them as they are and
    accumulates in float32 (``dtype=``), so no float32 copy of an activation is ever written. A complex tensor is
    read as its real and imaginary parts (``view_as_real``): its sum of squares is that of its moduli, and no
    cast discards a part (casting complex to real warns, and raises under ``-W error``).
    """
    x = x.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    if x.dtype not in (torch.float16, torch.bfloat16, _F32):
        x = x.float()  # float64 (rare): statistics are float32 anyway
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)  # channels_last: this permutation is contiguous, so the flatten is a view
    return x.reshape(-1)


def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == _F32:
        return torch.dot(x, x)  # measured: a fraction of var_mean's cost on CPU
    return torch.linalg.vector_norm(x, dtype=_F32).square()  # reads half precision, accumulates in float32


def _moments(x: torch.Tensor, shift: bool) -> list[torch.Tensor]:
    if shift:
        r = x[0].to(_F32, copy=True)  # its own storage: a view would keep the whole tensor alive (and see edits)
        d = x.to(_F32) - r
        row = [r, d.sum(), torch.dot(d, d)]
    else:
        row = [_const(x.device, 0.0), x.sum(dtype=_F32), _sum_sq(x)]
    if x.device.type == "cpu" and not _reliable(row[1].item(), row[2].item(), x.numel()):
        return _moments64(x)
    return row


def _reliable(s: float, q: float, n: int) -> bool:
    """Whether float32 sums ``s = sum(x - r)``, ``q = sum((x - r)^2)`` give the variance to float32 accuracy.

    Not when ``q`` overflowed (finite values above ~1e19) or when ``|mean| > SHIFT_RATIO * std`` about the
    shift taken (the cancellation the shift policy avoids from the next step on: the first ill-conditioned
    step after a well-conditioned one). On the CPU reading the two sums costs no synchronisation (~1 us),
    so such a row is recomputed at once in float64 about the first element (``_moments64``).
    """
    if not (math.isfinite(q) and math.isfinite(s)):
        return False  # (NaN/Inf in the tensor itself stays NaN/Inf in float64: it is reported as such)
    return s * s / n * (1.0 + SHIFT_RATIO * SHIFT_RATIO) <= SHIFT_RATIO * SHIFT_RATIO * q or q == 0.0


def _moments64(x: torch.Tensor) -> list[torch.Tensor]:
    """The moment row in float64, about the first element: no overflow, no cancellation (the row is then
    float64; the step's host copy promotes to it)."""
    x64 = x.double()
    r = x64[0].clone()
    d = x64 - r
    return [r, d.sum(), torch.dot(d, d)]


def cpu_kernel_status() -> str:
    """'on' where the CPU statistics kernel built with this install is in use, else why the ATen passes are."""
    return cpurow.status()


def _cpu_row(x: torch.Tensor, saturation: tuple[float, float] | None = None, zeros: bool = False) -> torch.Tensor:
    """The whole row from the CPU kernel in one read (``cpurow``), always about the first element (free there);
    recomputed in float64 where its float sums are not reliable (as ``_moments``)."""
    row = torch.empty((1, ACT_COLS), dtype=torch.float64)
    cpu_row_into(x, row, 0, saturation, zeros)
    return row[0]


def cpu_row_into(x: torch.Tensor, block: torch.Tensor, i: int, saturation: tuple[float, float] | None = None,
                 zeros: bool = False) -> None:
    """``_cpu_row`` of ``x`` (``cpurow.usable``) into row ``i`` of ``block``, a contiguous float64 [rows, 7]
    tensor (the step buffer's host block: no tensor per row)."""
    if not cpurow.row_into(x, block.data_ptr() + i * ACT_COLS * 8, True, SHIFT_RATIO, saturation, zeros):
        block[i, :3] = torch.stack(_moments64(_flat(x)))


def _minmax(x: torch.Tensor) -> list[torch.Tensor]:
    mn, mx = torch.aminmax(x)
    return [mn, mx] if x.dtype == _F32 else [mn.float(), mx.float()]


def grad_row(g: torch.Tensor, shift: bool = True, minmax: bool = False) -> list[torch.Tensor] | torch.Tensor:
    """Moments of a gradient (or weight): shift, sum and sum of squares about it[, min, max].

    On a GPU with Triton, for a large tensor: the fused kernel's whole activation row (one read; min and
    max come free). A float32 CPU tensor: the CPU kernel's (``cpurow``), always about the first element
    (``shift`` is for the ATen passes, where the subtraction costs a pass). A watch's hooks ask the step buffer
    first (``StepBuffer.kernel_row``), which writes a contiguous one's row in place; here it is a tensor.
    """
    x = _flat(g)
    if fused.usable(x, small_ok=minmax):  # histogram steps: the fused histogram reads min/max from this row
        whole = fused.row(x)
        if whole is not None:
            return whole
    if cpurow.usable(x):
        return _cpu_row(x)
    row = _moments(x, shift)
    if minmax:
        row += _minmax(x)
    return row


def act_row(y: torch.Tensor, saturation: tuple[float, float] | None = None, shift: bool = True,
            zeros: bool = False) -> list[torch.Tensor] | torch.Tensor:
    """Moments of an activation, its min and max, and the counts a rule needs.

    ``zeros``: count non-zero elements of a non-negative output (ReLU family): ``sum(sign(y))`` on the
    ATen path, branch-free (``count_nonzero`` is ~10x slower on ReLU outputs); the kernels count ``y != 0``,
    the same for the non-negative outputs it is asked of. ``saturation``: ``(centre, half_width)``: count
    elements with ``|y - centre| > half_width``. ``shift``: as in ``grad_row``.
    """
    x = _flat(y)
    if fused.usable(x):
        whole = fused.row(x, saturation, zeros)
        if whole is not None:
            return whole
    if cpurow.usable(x):
        return _cpu_row(x, saturation, zeros)
    row = _moments(x, shift) + _minmax(x)
    row.append(torch.sign(x).sum(dtype=_F32) if zeros else _const(x.device, math.nan))
    if saturation is None:
        row.append(_const(x.device, math.nan))
    else:
        c, h = saturation
        z = x.abs() if c == 0.0 else (x - c).abs()
        row.append((z > h).sum(dtype=_F32))
    return row


# ------------------------------------------------------------------ a half-precision dtype's range
#: the dtypes a tensor is judged against its own range in: float16 (and the float8 formats where torch has them);
#: bfloat16 has float32's exponent range, which no trained layer runs out of
NARROW: dict[torch.dtype, Format] = {torch.float16: FORMATS["float16"]}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        NARROW[getattr(torch, _name)] = FORMATS[_name]
# the kernels count |x| > this x floor in float32: at or above the floor (the next value down is below it)
BELOW = 1.0 - 2.0 ** -12


def range_row(x: torch.Tensor, fmt: Format, scaled: bool = False) -> list[torch.Tensor] | torch.Tensor | None:
    """The statistics row of ``x`` with the format's max in place of its shift, ``[format max, ., ., min, max,
    non-zero count, count at or above the floor]``, against ``fmt`` (``Row.ACT_RANGE``, ``Row.GRAD_RANGE``): the
    floor is the format's precision floor (``Format.floor``), so non-zero minus the last count are the values that
    kept 3 significant bits or fewer. One read on a GPU with
    Triton (the fused kernel's whole row, its saturation band set to the floor and the format's max in place of
    its shift); otherwise three ATen reductions of ``|x|`` (on the CPU the step buffer has the C kernel read a
    float32 copy instead: ``StepBuffer.kernel_range_row``). Paid only for tensors in a narrow dtype (``NARROW``)
    or by ``check(precision=)``.

    ``scaled``: the tensor as an fp8 recipe would store it, scaled so that its absmax is the format's max
    (``check``'s "would it fit" figure): the floor is then ``absmax * floor / max``. None for an empty tensor."""
    x = _flat(x)
    if x.numel() == 0:
        return None
    fmax = _const(x.device, fmt.max)
    if not scaled and fused.usable(x):
        whole = fused.row(x, (0.0, fmt.floor * BELOW), True)
        if whole is not None:
            whole[0] = fmt.max  # the whole row, the format's max in place of its shift (``RangeCounts.add_row``)
            return whole
    a = x.abs()
    absmax = a.max().to(_F32)
    # compared in the tensor's own dtype: the floor is exact there (a power of two in its range)
    floor = absmax * (fmt.floor / fmt.max) if scaled else fmt.floor
    zero = _const(x.device, 0.0)  # (the kernels' row: its sums unused)
    return [fmax, zero, zero, -absmax, absmax, torch.count_nonzero(a).to(_F32), (a >= floor).sum(dtype=_F32)]


def sumsq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a tensor (for an rms), as a 0-d float32 tensor (float64 on the CPU where float32
    overflows: finite values above ~1e19)."""
    x = _flat(x)
    q = _sum_sq(x)
    if x.device.type == "cpu" and q.item() == math.inf and x.numel():
        x64 = x.double()
        return torch.dot(x64, x64)
    return q


Moments = MomentAccumulator  # the host-side accumulator of a row's moments (``accumulators``)


# ------------------------------------------------------------------ histograms
HIST_BINS = 64  # fixed bins of the on-device histograms (TensorBoard re-bins for display anyway)
_HIST_CHUNK = 1 << 24  # elements binned per kernel: bounds the transient memory to ~8 bytes x 16M


def histogram_row(t: torch.Tensor, row: list[torch.Tensor] | torch.Tensor, out: torch.Tensor) -> None:
    """Fixed-bin histogram of ``t`` over its range, written on the device into ``out``.

    ``row`` is the tensor's statistics row: its min and max (columns 3 and 4) are already computed.
    ``out`` is a row ``[lo, hi, count_0, ..., count_{bins-1}]``. The binning is
    ``torch.histc``'s, bin ``floor((x - lo) * bins / (hi - lo))`` with the maximum in the last
    bin, and a constant tensor gets the range ``[x - 1, x + 1]`` like ``histc``. When the range
    is not finite (NaN/Inf in the tensor) ``lo``/``hi`` are too and the counts are meaningless.

    On a GPU no value leaves the device: with Triton, one kernel bins the tensor in one read
    (``fused.histogram``); without, the tensor is mapped onto [0, 1] and binned by ``histc``.
    On the CPU, where reading a value costs no synchronisation, the range is read first and the
    tensor binned by ``bincount`` in chunks that stay in cache (``histc`` on the CPU is ~10x slower).
    """
    mn, mx = row[3], row[4]
    if t.device.type == "cpu":
        _histogram_cpu(_flat(t), mn.item(), mx.item(), out)
        return
    x = _flat(t)
    if isinstance(row, torch.Tensor) and fused.usable(x) and fused.histogram(x, row, out):
        return
    x = x.float()  # histogram steps only: a float32 copy is fine here
    bins = out.shape[0] - 2
    mn, mx = mn.to(x.dtype), mx.to(x.dtype)
    pad = (mn == mx).to(x.dtype)  # a constant tensor: [x - 1, x + 1]
    lo, hi = mn - pad, mx + pad
    torch.stack((lo, hi), out=out[:2])  # NaN/Inf stay visible to the host, which then drops the histogram
    lo, hi = lo.nan_to_num(0.0, 0.0, 0.0), hi.nan_to_num(1.0, 1.0, 1.0)
    width = hi - lo
    counts = out[2:]
    counts.zero_()
    for chunk in x.split(_HIST_CHUNK):  # float32 counts per chunk stay exact (< 2**24)
        y = (chunk - lo).div_(width)  # in [0, 1]: (x - lo) <= (hi - lo) survives rounding
        counts.add_(torch.histc(y, bins=bins, min=0.0, max=1.0))


_F32_MAX = float(torch.finfo(torch.float32).max)
_CPU_HIST_CHUNK = 1 << 18  # elements binned per step on the CPU: its scratch (2 MB) stays in cache


def _histogram_cpu(x: torch.Tensor, mn: float, mx: float, out: torch.Tensor) -> None:
    bins = out.shape[0] - 2
    # histc's arithmetic, in float32: edges padded by 1 for a constant tensor, bin = (x - lo) * bins / width
    lo_t, hi_t = torch.tensor((mn, mx), dtype=_F32)
    if mn == mx:
        lo_t, hi_t = lo_t - 1, hi_t + 1
    lo, hi, width = lo_t.item(), hi_t.item(), (hi_t - lo_t).item()
    out[0], out[1] = lo, hi
    counts = out[2:]
    counts.zero_()
    if not math.isfinite(width):
        return  # NaN/Inf in the tensor: the host drops this histogram
    if width * bins > _F32_MAX:  # (x - lo) * bins would overflow float32 (ranges above ~5e36): not binned
        out[0] = out[1] = math.nan  # the host drops it and notes why
        return
    if cpurow.usable(x):  # the C kernel: the same bins in one read
        c64 = torch.zeros(bins, dtype=torch.int64)
        if cpurow.hist_into(x, lo, width, c64):
            counts.add_(c64)
            return
    k = min(x.numel(), _CPU_HIST_CHUNK)
    f = torch.empty(k, dtype=_F32)
    i = torch.empty(k, dtype=torch.int32)
    for chunk in x.split(_CPU_HIST_CHUNK):
        m = chunk.numel()
        if chunk.dtype == _F32:
            torch.sub(chunk, lo, out=f[:m])
        else:  # half precision: subtract in float32, not in the input's dtype
            f[:m].copy_(chunk).sub_(lo)
        f[:m].mul_(bins).div_(width)  # >= 0, as x >= lo
        i[:m].copy_(f[:m])  # truncation = floor here
        c = torch.bincount(i[:m], minlength=bins + 1)  # bin `bins`: the maximum (histc puts it in the last bin)
        counts.add_(c[:bins])
        counts[bins - 1] += c[bins:].sum()


def merge_histograms(rows: list[list[float]]) -> tuple[float, float, list[float]]:
    """Merge host histogram rows ``[lo, hi, counts...]`` into one over the union of their ranges.

    Rows with the same range add exactly; otherwise each bin's count moves to the bin of the
    merged range that holds its centre (approximate, as any re-binning is).
    """
    lo = min(r[0] for r in rows)
    hi = max(r[1] for r in rows)
    if all(r[0] == lo and r[1] == hi for r in rows):
        return lo, hi, [sum(c) for c in zip(*(r[2:] for r in rows))]
    bins = len(rows[0]) - 2
    merged = [0.0] * bins
    for r in rows:
        step = (r[1] - r[0]) / bins
        for i, c in enumerate(r[2:]):
            if c:
                centre = r[0] + (i + 0.5) * step
                j = min(bins - 1, max(0, int((centre - lo) / (hi - lo) * bins)))
                merged[j] += c
    return lo, hi, merged
