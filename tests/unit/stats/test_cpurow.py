"""The CPU statistics kernel (torchdiag._stats._cpurow): its row against float64 tensor ops, the same row from its
AVX2 and baseline builds, the library the install built found and checked next to the module, and the ATen path
where it is absent, does not load or is switched off; no subprocess in a watched step."""

from __future__ import annotations

import ast
import importlib.machinery
import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchdiag
from tests.helpers.recording import spy
from torchdiag._stats import _cpurow as cpurow
from torchdiag._stats import library, stats

# only where the install built no library (no C compiler then); a library that is there but unusable fails
needs_kernel = pytest.mark.skipif(library.library_file() is None, reason=cpurow.NOT_BUILT)

REPO = Path(__file__).resolve().parents[3]
SAT = (0.0, 0.9)


@pytest.fixture(autouse=True)
def kernel_on():
    """Each test starts and ends with the kernel on where it was built (whatever ``TORCHDIAG_CPU_KERNEL`` says)."""
    cpurow.set_enabled(True)
    yield
    cpurow.set_enabled(True)


@pytest.fixture
def no_library(monkeypatch, tmp_path):
    """This process as if the install had built no kernel: the loader looks in an empty directory, afresh."""
    monkeypatch.setattr(library, "DIRECTORY", tmp_path)
    monkeypatch.setattr(cpurow, "_state", {})
    return tmp_path


def expected(x: torch.Tensor, saturation=None, zeros=False) -> list[float]:
    """The row by definition, in float64: about r = x[0]; min/max NaN when x holds a NaN (torch.aminmax)."""
    d = x.double()
    r = d[0]
    nan = bool(torch.isnan(d).any())
    row = [r.item(), (d - r).sum().item(), ((d - r) ** 2).sum().item(),
           math.nan if nan else d.min().item(), math.nan if nan else d.max().item(),
           float((d != 0).sum()) if zeros else math.nan]
    if saturation is None:
        row.append(math.nan)
    else:
        c, h = saturation
        row.append(float(((d - c).abs() > h).sum()))
    return row


def close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    for u, v in zip(a, b):
        if math.isnan(u) or math.isnan(v):
            if not (math.isnan(u) and math.isnan(v)):
                return False
        elif not u == pytest.approx(v, rel=rel, abs=rel * max(1.0, abs(b[2]) ** 0.5 * 1e-2)):
            return False
    return True


@pytest.fixture
def kernel_for_any_size(monkeypatch):
    """Every size through the kernel whatever the thread count (past 256K elements it yields to ATen's parallel
    passes with more than 2 threads)."""
    monkeypatch.setattr(cpurow, "SERIAL_N", 1 << 40)


@needs_kernel
@pytest.mark.parametrize("n", [1, 15, 16, 17, 4095, 4096, 4097, 65536 + 37, 300_001])
def test_row_equals_float64_definition(n, kernel_for_any_size):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 3 + 1).relu_() - 0.5  # zeros and values past the saturation rails
    x[torch.rand(n, generator=g) < 0.3] = 0.0
    got = stats.act_row(x, SAT, zeros=True)
    assert isinstance(got, torch.Tensor), "a float32 CPU tensor goes through the kernel"
    assert close(got.tolist(), expected(x, SAT, zeros=True))
    plain = stats.act_row(x).tolist()
    assert close(plain, expected(x))
    assert math.isnan(plain[5]) and math.isnan(plain[6])  # counts not asked for
    assert close(stats.grad_row(x).tolist()[:5], expected(x)[:5])


@needs_kernel
def test_nonfinite_values_propagate_like_aminmax():
    x = torch.randn(10_000)
    x[1234] = math.inf
    row = stats.act_row(x).tolist()
    assert row[4] == math.inf and math.isfinite(row[3]) and row[2] == math.inf
    x[777] = math.nan
    row = stats.act_row(x).tolist()
    assert math.isnan(row[1]) and math.isnan(row[3]) and math.isnan(row[4])
    mn, mx = torch.aminmax(x)
    assert math.isnan(mn.item()) and math.isnan(mx.item())  # the ATen path's semantics, kept


@needs_kernel
@pytest.mark.parametrize("case", ["both infinities", "infinite first element", "float lanes overflow both ways",
                                  "nan after infinities", "nan last"])
def test_min_and_max_are_nan_exactly_when_aminmax_says_so(case):
    """The kernel learns of a NaN from its sum, which infinities of both signs also make NaN: min and max must
    still be NaN only when the tensor holds one (as ``torch.aminmax``), in every way the sum can go NaN."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3 * 4096 + 7, generator=g)
    if case == "both infinities":
        x[100], x[5000] = math.inf, -math.inf
    elif case == "infinite first element":  # the shift r = x[0] = inf: x[0] - r is NaN
        x[0] = math.inf
    elif case == "float lanes overflow both ways":  # finite values whose float32 lane sums reach +inf and -inf
        x[0] = 0.0  # the shift: the lanes' d = x - r are then +-3e38
        x[16:4096:16], x[1:4096:16] = 3e38, -3e38
    elif case == "nan after infinities":
        x[10], x[20], x[9000] = math.inf, -math.inf, math.nan
    else:
        x[-1] = math.nan
    row = torch.as_tensor(stats.act_row(x, shift=False)).tolist()
    mn, mx = (v.item() for v in torch.aminmax(x))
    for got, want in ((row[3], mn), (row[4], mx)):
        assert (math.isnan(got) and math.isnan(want)) or got == want, (case, row, mn, mx)


@needs_kernel
def test_unreliable_float_sums_are_redone_in_float64():
    """|x| ~ 1e20: x^2 overflows float32; the row falls back to float64 (as the ATen path) and stays exact."""
    x = torch.full((5000,), 1e20)
    x[::2] = 2e20
    row = stats.act_row(x).tolist()
    d = x.double()
    assert row[2] == pytest.approx(((d - d[0]) ** 2).sum().item(), rel=1e-9)
    assert row[1] == pytest.approx((d - d[0]).sum().item(), rel=1e-9)


def test_tensors_without_plain_storage_take_the_aten_path():
    """A wrapper subclass (DTensor, a tensor subclass) reports contiguous float32 but has no data pointer of its
    own: handing it to C would read address 0 and kill the process, so it takes the ATen path."""
    two = pytest.importorskip("torch.testing._internal.two_tensor")
    a = torch.randn(1000)
    x = two.TwoTensor(a, a.clone())
    assert not cpurow.usable(x) and not cpurow.usable(torch._efficientzerotensor(10))
    row = stats.act_row(x)
    assert isinstance(row, list)


@needs_kernel
def test_strided_and_half_precision_tensors():
    """A strided tensor is flattened (a copy) and goes through the kernel; half precision takes the ATen path."""
    x = torch.randn(64, 64)
    strided = x.t()[:, :10]
    assert close(stats.act_row(strided).tolist(), expected(strided.reshape(-1)))
    assert isinstance(stats.act_row(x.bfloat16()), list)


@needs_kernel
def test_aten_path_when_switched_off_gives_the_same_statistics():
    x = (torch.randn(50_000) * 2 + 0.3).relu()  # the zeros count is of a non-negative output (ReLU family)
    kernel = stats.act_row(x, SAT, zeros=True)
    cpurow.set_enabled(False)
    try:
        aten = stats.act_row(x, SAT, zeros=True, shift=True)
        assert isinstance(aten, list)
        aten = torch.stack(aten).double()
    finally:
        cpurow.set_enabled(True)
    assert cpurow.status() == "on"
    # the same moments about the same shift, min, max and counts; float32 sums in another order
    assert torch.allclose(kernel, aten, rtol=1e-5, atol=1e-3, equal_nan=True)


@needs_kernel
def test_a_watched_step_reads_the_same_from_the_host_block_as_from_float64_tensor_ops():
    """A watch writes the kernel's rows into one host block per step (growing it past its first 64 rows here:
    40 Linear + ReLU pairs and a Tanh head give 160+ rows), and peeking at the step in progress rolls its weight
    rows back. Each layer's statistics must be those of its own tensors, computed here in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(40) for m in (nn.Linear(16, 16), nn.ReLU())], nn.Linear(16, 4), nn.Tanh())
    x = torch.randn(32, 16)
    outs, grads = spy(model)
    with torchdiag.watch(model, config={"warnings": False}) as diag:
        model(x).sum().backward()
        peek = diag.report()  # a peek: weight rows written, then rolled back
        report = diag.step()
        assert diag._recorder.buffer._block.shape[0] >= 128  # (private: the block grew)
    assert [(p.name, p.act_std, p.grad_std, p.weight_std) for p in peek.layers] == \
        [(r.name, r.act_std, r.grad_std, r.weight_std) for r in report.layers]
    assert len(report.layers) == len(model)
    for layer in report.layers:
        y, g = outs[layer.name].double(), grads[layer.name].double()
        assert layer.act_std == pytest.approx(y.std(correction=0).item(), rel=1e-5), layer.name
        assert layer.act_mean == pytest.approx(y.mean().item(), rel=1e-4, abs=1e-6), layer.name
        assert layer.grad_std == pytest.approx(g.std(correction=0).item(), rel=1e-5), layer.name
        module = model[int(layer.name)]
        if isinstance(module, nn.ReLU):
            assert layer.zero_fraction == pytest.approx((y == 0).double().mean().item()), layer.name
        elif isinstance(module, nn.Linear):
            w = module.weight.detach().double()
            assert layer.weight_std == pytest.approx(w.std(correction=0).item(), rel=1e-5), layer.name


@needs_kernel
def test_the_library_the_install_built_is_found_next_to_the_module_and_used():
    path = library.library_file()
    assert path.parent == Path(cpurow.__file__).parent
    assert path.name[len(library.NAME):] in importlib.machinery.EXTENSION_SUFFIXES
    assert cpurow.status() == "on" and cpurow.library_path() == path
    assert cpurow.usable(torch.randn(100))


def _setup_flags() -> list[str]:
    """``FLAGS`` as setup.py builds the kernel with them (read, not run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no FLAGS")


def _build(out: Path, *extra: str) -> tuple:
    """``_rows.c`` built here as setup.py builds it, with ``extra`` flags; its functions."""
    cc = shutil.which("cc") or shutil.which("gcc")
    cmd = [cc, *_setup_flags(), "-fPIC", "-shared", *extra, "-o", str(out), str(REPO / "torchdiag/_stats/_rows.c")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return cpurow.load(out)


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux",
                    reason="x86 instruction sets, read from /proc/cpuinfo")
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler for the builds")
@pytest.mark.skipif(not (REPO / "setup.py").exists(), reason="a source checkout (setup.py, _rows.c)")
def test_avx2_and_baseline_builds_give_bit_identical_rows(tmp_path):
    """The row must not depend on the CPU's instruction set: the same source built for the x86-64 baseline
    (SSE2) and for AVX2 (with FMA available) gives the same bits as the installed kernel (which picks its clone by
    CPU), also for a tail that is not a whole vector and for NaN, infinities, signed zeros and denormals."""
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    builds = {"installed": cpurow.load(library.library_file()),
              "base": _build(tmp_path / "base.so", "-DTD_ONE_TARGET"),
              "avx2": _build(tmp_path / "avx2.so", "-DTD_ONE_TARGET", "-mavx2", "-mfma")}
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-42, math.inf, -math.inf, 3.0e38])
    inputs = [torch.randn(n, generator=g) * 5 + 2 for n in (33, 4096 * 3 + 5, 200_003)]
    inputs += [torch.cat((special[:4], torch.randn(50, generator=g))), special[:4].repeat(9), special[:5],
               torch.cat((torch.randn(20, generator=g), torch.tensor([math.nan]), special))]
    for x in inputs:
        for variant in range(4):
            rows = {}
            for name, fns in builds.items():
                out = torch.empty(7, dtype=torch.float64)
                reliable = fns[variant](x.data_ptr(), x.numel(), 1, 0.0, 0.9, 10.0, out.data_ptr())
                rows[name] = (reliable, out.view(torch.int64).tolist())  # the bits, NaN payloads and signs too
            assert rows["base"] == rows["avx2"] == rows["installed"], (x.numel(), variant, rows)
    hists = {"installed": cpurow._load_hist(library.library_file()),  # the histogram binning: the same bins too
             "base": cpurow._load_hist(tmp_path / "base.so"), "avx2": cpurow._load_hist(tmp_path / "avx2.so")}
    for x in inputs[:3]:
        lo, width = x.min().item(), (x.max() - x.min()).item()
        got = {}
        for name, fn in hists.items():
            counts = torch.zeros(64, dtype=torch.int64)
            assert fn(x.data_ptr(), x.numel(), lo, width, 64, counts.data_ptr()) == 1
            got[name] = counts.tolist()
        assert got["base"] == got["avx2"] == got["installed"], x.numel()


def test_without_the_library_the_aten_path_gives_the_same_statistics(no_library):
    """An install without a C compiler has no library: the ATen path, the reason in ``status``, and the statistics
    of the kernel (where this install has it) to float32 rounding."""
    x = (torch.randn(50_000) * 2 + 0.3).relu()
    assert library.library_file() is None
    assert cpurow.status() == cpurow.NOT_BUILT and cpurow.library_path() is None
    assert not cpurow.usable(x)
    aten = stats.act_row(x, SAT, zeros=True, shift=True)
    assert isinstance(aten, list)
    assert close(torch.stack(aten).double().tolist(), expected(x, SAT, zeros=True), rel=1e-4)


def _watched_layers(steps: int = 3) -> list[tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torchdiag.watch(model, every=1, config={"warnings": False}) as diag:
        for _ in range(steps):
            model(torch.randn(16, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            report = diag.step()
    return [(r.name, r.act_mean, r.act_std, r.grad_std, r.weight_std, r.zero_fraction) for r in report.layers]


@needs_kernel
def test_a_watch_without_the_library_reports_what_it_reports_with_it(monkeypatch, tmp_path):
    with_kernel = _watched_layers()
    monkeypatch.setattr(library, "DIRECTORY", tmp_path)
    monkeypatch.setattr(cpurow, "_state", {})
    without = _watched_layers()
    assert cpurow.status() == cpurow.NOT_BUILT
    assert [r[0] for r in without] == [r[0] for r in with_kernel]
    for a, b in zip(without, with_kernel):
        for u, v in zip(a[1:], b[1:]):  # (a figure a layer does not have is None on both paths)
            assert (u is None and v is None) or u == pytest.approx(v, rel=1e-4, abs=1e-7), (a, b)


def test_a_library_that_does_not_load_is_not_used(no_library):
    """A file of the library's name that is not a loadable library (a wrong platform's, a damaged one)."""
    (no_library / (library.NAME + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not a library")
    assert "did not load" in cpurow.status()
    assert isinstance(stats.act_row(torch.randn(100)), list)


@needs_kernel
def test_a_library_that_fails_its_self_check_is_not_used(monkeypatch):
    monkeypatch.setattr(cpurow, "_state", {})
    assert cpurow.status() == "on"  # the self-check passes on the real rows
    wrong = [list(row) for row in cpurow._CHECK_ROWS]
    wrong[3][2] += 1.0  # another sum of squares than the kernel gives
    monkeypatch.setattr(cpurow, "_CHECK_ROWS", wrong)
    monkeypatch.setattr(cpurow, "_state", {})
    assert "self-check" in cpurow.status()
    assert not cpurow.usable(torch.randn(100))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TORCHDIAG_CPU_KERNEL", "0")
    monkeypatch.setattr(cpurow, "_state", {})
    assert cpurow.status() == cpurow.OFF
    assert isinstance(stats.act_row(torch.randn(100)), list)
    cpurow.set_enabled(True)  # the switch overrides the variable, as before
    assert cpurow.status() == ("on" if library.library_file() is not None else cpurow.NOT_BUILT)


def test_no_subprocess_is_started_in_a_watched_training_step(monkeypatch):
    """The kernel is loaded, not built, at its first use (here inside the first watched step): no compiler, no
    subprocess, from the training thread or any other."""
    started = []

    def refuse(self, *args, **kwargs):
        started.append(args[:1])
        raise AssertionError(f"a subprocess was started in a watched step: {args[:1]}")

    monkeypatch.setattr(cpurow, "_state", {})  # not loaded yet: the first use is inside the steps
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    layers = _watched_layers()
    monkeypatch.undo()
    assert started == []
    assert len(layers) == 5 and all(math.isfinite(r[2]) for r in layers)
    if library.library_file() is not None:
        assert cpurow.status() == "on"


def _bins_both_ways(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A histogram step's row of ``x`` ([lo, hi, 64 counts]) through the kernel, and through the ATen passes."""
    mn, mx = x.min().item(), x.max().item()
    rows = []
    for on in (True, False):
        cpurow.set_enabled(on)
        try:
            out = torch.zeros(stats.HIST_BINS + 2, dtype=torch.float64)
            stats._histogram_cpu(x, mn, mx, out)
        finally:
            cpurow.set_enabled(True)
        rows.append(out)
    return rows[0], rows[1]


@needs_kernel
def test_the_kernels_histogram_bins_as_the_aten_passes_and_histc_do():
    """The kernel's binning (one read) against the ATen path's float32 passes, count for count: sizes that are no
    whole block, a maximum that lands on the last edge, a constant tensor (range x +- 1), a tiny and a huge range,
    denormals; and against torch.histc where no value sits on an edge."""
    probe = torch.zeros(stats.HIST_BINS, dtype=torch.int64)
    assert cpurow.hist_into(torch.arange(10.0), 0.0, 9.0, probe)  # the library built from this source bins
    assert probe.sum().item() == 10
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(n, generator=g) * s + o for n in (1, 3, 255, 257, 4099, 300_001)
             for s, o in ((1.0, 0.0), (1e-4, 3.0), (1e4, -7.0))]
    cases += [torch.arange(65.0), torch.arange(1000.0) / 7, torch.full((50,), 3.0), torch.rand(999, generator=g) * 1e30,
              torch.tensor([0.0, 1e-40, -1e-42, 2e-45, 5.0])]
    for x in cases:
        kernel, aten = _bins_both_ways(x)
        assert torch.equal(kernel, aten), (x.numel(), (kernel - aten).abs().max())
        assert kernel[2:].sum().item() == x.numel()
    x = torch.randn(10_000, generator=g)
    kernel, _ = _bins_both_ways(x)
    ref = torch.histc(x.double(), bins=stats.HIST_BINS, min=kernel[0].item(), max=kernel[1].item())
    assert kernel[2:].tolist() == ref.tolist()


@needs_kernel
def test_the_kernels_histogram_leaves_other_bin_counts_to_aten():
    x = torch.randn(100)
    counts = torch.zeros(300, dtype=torch.int64)
    assert not cpurow.hist_into(x, x.min().item(), (x.max() - x.min()).item(), counts)
    assert counts.sum().item() == 0
