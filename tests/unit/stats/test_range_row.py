"""A tensor against a format's range (``stats.range_row``) and the figures the host makes of it, checked against
counts of the tensor itself and ``torch.finfo``."""

from __future__ import annotations

import math

import pytest
import torch

from torchdiag._record._assemble import _range
from torchdiag._reduce.accumulators import RangeCounts
from torchdiag._stats import stats
from torchdiag._vocab import FORMATS

FP16 = torch.finfo(torch.float16)


def _values(row) -> list[float]:
    return [float(v) for v in (row.tolist() if isinstance(row, torch.Tensor) else row)]


def test_the_formats_are_torchs_own():
    for name, fmt in FORMATS.items():
        if hasattr(torch, name):
            info = torch.finfo(getattr(torch, name))
            assert (fmt.max, fmt.tiny) == (float(info.max), float(info.tiny)), name


def test_the_precision_floor_is_eight_smallest_subnormal_steps():
    for name, fmt in FORMATS.items():
        if hasattr(torch, name):
            dtype = getattr(torch, name)
            # the smallest positive value of the format: the bit pattern ...0001
            bits = torch.ones(1, dtype=torch.int16 if dtype.itemsize == 2 else torch.uint8)
            step = bits.view(dtype).float().item()
            assert fmt.floor == 8 * step, name


@pytest.mark.parametrize("kernel", [False, True], ids=["aten", "cpu-kernel"])
def test_a_float16_tensor_is_counted_as_zero_below_and_above_the_floor(kernel):
    """The range row as the step buffer holds it (ATen's four values, or the C kernel's whole row of a float32 copy
    with the format's max in place of its shift), read back by the host's accumulator."""
    from torchdiag._stats import _cpurow as cpurow
    from torchdiag._stats.stepbuffer import StepBuffer
    from torchdiag._vocab import Row

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(10_000, generator=g) * 2e-6).half()  # rms 2e-6: a good part under 4.8e-7, a few flushed
    x[:100] = 0.0
    x[100] = 3e4
    fmt = stats.NARROW[torch.float16]
    cpurow.set_enabled(kernel)
    try:
        if kernel and cpurow.library_file() is None:
            pytest.skip(cpurow.NOT_BUILT)
        buf = StepBuffer()
        if kernel:
            assert buf.kernel_range_row(0, Row.ACT_RANGE, x, fmt.max, fmt.floor)
            row = buf.kernel_row_values(0).tolist()
        else:
            row = _values(stats.range_row(x, fmt))
    finally:
        cpurow.set_enabled(True)
    rc = RangeCounts()
    rc.add_row(x.numel(), row)
    a = x.float().abs()
    floor = 8 * torch.nextafter(torch.zeros((), dtype=torch.float16), torch.ones((), dtype=torch.float16)).item()
    assert rc.fmax == FP16.max and rc.absmax == a.max().item()
    assert rc.nonzero == (a > 0).sum().item()
    assert rc.normal == (a >= floor).sum().item()
    assert 0 < rc.nonzero - rc.normal < rc.nonzero  # the premise: some below the floor, some above


def test_scaled_counts_what_an_fp8_recipe_would_lose_after_scaling_the_absmax_to_the_max():
    x = torch.logspace(-9, 0, 1000) * torch.tensor([1.0, -1.0]).repeat(500)
    e4m3 = FORMATS["float8_e4m3fn"]
    _, _, _, low, absmax, nonzero, above = _values(stats.range_row(x, e4m3, scaled=True))
    assert low == -absmax
    cut = x.abs().max().item() * 2.0 ** -9 * 8 / 448.0  # e4m3's smallest subnormal is 2**-9, its max 448
    assert absmax == 1.0 and nonzero == 1000
    assert above == pytest.approx((x.abs() >= cut).sum().item(), abs=1)  # float32 rounding at the cut itself


def test_an_empty_tensor_has_no_range_row():
    assert stats.range_row(torch.empty(0, dtype=torch.float16), stats.NARROW[torch.float16]) is None


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_host_figures_name_the_format_and_its_headroom(name):
    fmt = FORMATS[name]
    rc = RangeCounts()
    rc.add_row(100, [fmt.max, 0.0, 0.0, -fmt.max / 16, fmt.max / 32, 80, 60])
    r = _range(rc)
    assert r.format == name and r.headroom == pytest.approx(4.0)
    assert r.low_fraction == pytest.approx(20 / 80) and r.zero_fraction == pytest.approx(0.2)


def test_headroom_at_the_edges():
    over, zeros = RangeCounts(), RangeCounts()
    over.add_row(10, [FP16.max, 0.0, 0.0, 0.0, math.inf, 10, 10])
    zeros.add_row(10, [FP16.max, 0.0, 0.0, 0.0, 0.0, 0, 0])
    assert _range(over).headroom == -math.inf
    assert _range(zeros).headroom == math.inf and _range(zeros).low_fraction is None
