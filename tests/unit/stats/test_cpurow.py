"""The CPU statistics kernel (torchdiag.stats._cpurow): its row against float64 tensor ops, the same row from its
AVX2 and baseline builds, and the ATen path where it cannot be built."""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers.recording import spy
from torchdiag.stats import _cpurow as cpurow
from torchdiag.stats import stats

pytestmark = pytest.mark.skipif(cpurow.status() != "on", reason=f"CPU kernel not built: {cpurow.status()}")

SAT = (0.0, 0.9)


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


def test_strided_and_half_precision_tensors():
    """A strided tensor is flattened (a copy) and goes through the kernel; half precision takes the ATen path."""
    x = torch.randn(64, 64)
    strided = x.t()[:, :10]
    assert close(stats.act_row(strided).tolist(), expected(strided.reshape(-1)))
    assert isinstance(stats.act_row(x.bfloat16()), list)


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


def test_no_compiler_means_the_aten_path_and_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHDIAG_CACHE", str(tmp_path))
    monkeypatch.setattr(cpurow, "compiler", lambda: shutil.which("false"))  # every build fails
    cpurow.set_enabled(True)
    try:
        assert "build failed" in cpurow.status()
        assert isinstance(stats.act_row(torch.randn(100)), list)
    finally:
        monkeypatch.undo()
        cpurow.set_enabled(True)
    assert cpurow.status() == "on"


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners and modes")
def test_a_cache_others_can_write_to_is_not_loaded_from(monkeypatch, tmp_path):
    """A predictable library name in a directory someone else can write to could be their code: torchdiag builds
    a private copy instead, and a fresh cache of its own is used as it is."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TORCHDIAG_CACHE", str(shared))
    scratch = tmp_path / "tmp"  # $TMPDIR, where the private copy is built
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    try:
        cpurow.set_enabled(True)
        assert cpurow.status() == "on" and cpurow.library_path().parent != shared
        assert list(scratch.iterdir()) == []  # #28 item 11: the private build leaves nothing behind in $TMPDIR
        own = tmp_path / "own"
        monkeypatch.setenv("TORCHDIAG_CACHE", str(own))
        cpurow.set_enabled(True)
        assert cpurow.status() == "on" and cpurow.library_path().parent == own
        assert close(stats.act_row(torch.arange(5.0)).tolist(), expected(torch.arange(5.0)))
    finally:
        monkeypatch.undo()
        cpurow.set_enabled(True)


@pytest.mark.skipif(sys.platform != "linux", reason="ELF libraries")
def test_a_truncated_library_in_the_cache_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    """#28 item 12: a library cut short in the cache (a full disk, a killed copy) killed every new process with
    SIGBUS when it was loaded. Right answer: a fresh interpreter sees that it is not whole, rebuilds it in place and
    records its step with the kernel; the file is whole again after."""
    monkeypatch.setenv("TORCHDIAG_CACHE", str(tmp_path))
    try:
        cpurow.set_enabled(True)
        assert cpurow.status() == "on"
        path = cpurow.library_path()
        assert path.parent == tmp_path and cpurow.whole(path)
        data = path.read_bytes()
        cut = tmp_path / "cut"
        cut.write_bytes(data[: len(data) // 2])
        os.chmod(cut, 0o755)
        os.replace(cut, path)  # (a new inode: this process keeps the library it mapped)
        assert not cpurow.whole(path)
        run = ("import torch, torchdiag; from torchdiag.stats import _cpurow; m = torch.nn.Linear(64, 64)\n"
               "with torchdiag.watch(m, every=1) as d:\n"
               "    m(torch.randn(8, 64)).sum().backward(); r = d.step()\n"
               "print(_cpurow.status(), _cpurow.library_path())")
        done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=240,
                              env={**os.environ, "TORCHDIAG_CACHE": str(tmp_path)})
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # not killed by SIGBUS (-7)
        status, used = done.stdout.split()
        assert status == "on" and used == str(path)
        assert cpurow.whole(path) and path.stat().st_size == len(data)
    finally:
        monkeypatch.undo()
        cpurow.set_enabled(True)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux",
                    reason="x86 instruction sets, read from /proc/cpuinfo")
def test_avx2_and_baseline_builds_give_bit_identical_rows(tmp_path):
    """The row must not depend on the CPU's instruction set: the same source built for the x86-64 baseline
    (SSE2) and for AVX2 (with FMA available) gives the same bits, also for a tail that is not a whole vector and
    for NaN, infinities, signed zeros and denormals."""
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    cc = cpurow.compiler()
    builds = {}
    for name, extra in {"base": ("-DTD_ONE_TARGET",), "avx2": ("-DTD_ONE_TARGET", "-mavx2", "-mfma")}.items():
        path = tmp_path / f"{name}.so"
        cpurow.build(path, cc, extra)
        builds[name] = cpurow.load(path)
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-42, math.inf, -math.inf, 3.0e38])
    inputs = [torch.randn(n, generator=g) * 5 + 2 for n in (33, 4096 * 3 + 5, 200_003)]
    inputs += [torch.cat((special[:4], torch.randn(50, generator=g))), special[:4].repeat(9), special[:5],
               torch.cat((torch.randn(20, generator=g), torch.tensor([math.nan]), special))]
    for x in inputs:
        for variant in range(4):
            rows = []
            for fns in builds.values():
                out = torch.empty(7, dtype=torch.float64)
                fns[variant](x.data_ptr(), x.numel(), 1, 0.0, 0.9, 10.0, out.data_ptr())
                rows.append(out)
            same = torch.equal(rows[0].isnan(), rows[1].isnan()) and torch.equal(rows[0].nan_to_num(),
                                                                                  rows[1].nan_to_num())
            same = same and torch.equal(rows[0].signbit(), rows[1].signbit())
            assert same, (x.numel(), variant, rows)


def test_a_watched_step_reads_the_same_from_the_host_block_as_from_float64_tensor_ops():
    """A watch writes the kernel's rows into one host block per step (growing it past its first 64 rows here:
    40 Linear + ReLU pairs and a Tanh head give 160+ rows), and peeking at the step in progress rolls its weight
    rows back. Each layer's statistics must be those of its own tensors, computed here in float64."""
    from torch import nn

    import torchdiag

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


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX process groups, /proc")
def test_a_hanging_compiler_is_killed_with_its_children_and_not_tried_again(tmp_path):
    """#28 item 10: a $CC that hangs (an unreachable distcc or ccache server) held the first recorded step for 120 s
    in every new process and left its child running. Right answer: the step goes on within TORCHDIAG_CC_TIMEOUT
    (2 s here) on the ATen path, nothing the compiler started is left, and the next process does not try again."""
    marker = f"{300 + os.getpid() % 600}.5"  # a sleep only this test's compiler starts
    cc = tmp_path / "hanging-cc"
    cc.write_text(f"#!/bin/sh\nsleep {marker} &\nsleep {marker}\n")
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "TORCHDIAG_CACHE": str(tmp_path / "cache"), "TORCHDIAG_CC_TIMEOUT": "2"}
    run = ("import time, torch, torchdiag; from torchdiag.stats import _cpurow; m = torch.nn.Linear(64, 64)\n"
           "t = time.monotonic()\n"
           "with torchdiag.watch(m, every=1) as d:\n"
           "    m(torch.randn(8, 64)).sum().backward(); r = d.step()\n"
           "print(round(time.monotonic() - t, 1)); print(_cpurow.status())")
    took, said = [], []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        seconds, status = done.stdout.strip().split("\n", 1)
        took.append(float(seconds))
        said.append(status)
    assert took[0] < 15 and "did not finish within 2 s" in said[0]
    assert took[1] < 5 and "not retried" in said[1]
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"sleep\0{marker}".encode() in (proc / "cmdline").read_bytes():
                left.append(proc.name)
        except OSError:
            continue
    assert left == [], "the compiler's children are still running"


def _python(code: str, env: dict) -> str:
    """Run ``code`` in a fresh interpreter with ``env``; its standard output (it must exit 0)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _slow_compiler(tmp_path: Path, seconds: float) -> dict:
    """An environment whose ``$CC`` waits ``seconds`` before running the real compiler, with a cache of its own."""
    cc = tmp_path / "slow-cc"
    cc.write_text(f'#!/bin/sh\nsleep {seconds}\nexec {cpurow.compiler()} "$@"\n')
    cc.chmod(0o755)
    return {**os.environ, "CC": str(cc), "TORCHDIAG_CACHE": str(tmp_path / "cache")}


@pytest.mark.skipif(sys.platform != "linux", reason="a POSIX shell script as the compiler")
def test_the_kernel_is_built_beside_the_loop_never_inside_the_users_step(tmp_path):
    """#25/#28: the kernel was compiled by a subprocess started from the user's first recorded forward, which waited
    for it. Right answer: the watch starts the build in a thread of its own at its entry; the steps meanwhile use the
    ATen path (the same figures), no subprocess is started from the training thread, and the kernel is on once
    built. A compiler that takes 3 s before it starts makes the difference plain."""
    env = _slow_compiler(tmp_path, 3)
    run = ("import subprocess, threading, time, torch, torchdiag\n"
           "from torchdiag.stats import _cpurow\n"
           "starts = []\n"
           "popen = subprocess.Popen.__init__\n"
           "def spy(self, *a, **k):\n"
           "    starts.append(threading.current_thread().name)\n"
           "    popen(self, *a, **k)\n"
           "subprocess.Popen.__init__ = spy\n"
           "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())\n"
           "x = torch.randn(8, 64)\n"
           "t = time.monotonic()\n"
           "with torchdiag.watch(m, every=1) as d:\n"
           "    m(x).sum().backward(); r = d.step()\n"
           "took = time.monotonic() - t\n"
           "want = m[0](x).detach().std(correction=0).item()\n"
           "print(round(took, 2), _cpurow.status(), sorted(set(starts)), abs(r['0'].act_std - want) / want < 1e-5)")
    out = _python(run, env)
    took, status, threads, right = out.strip().rsplit("\n", 1)[-1].split(" ", 3)
    assert float(took) < 2.5, out  # the step did not wait for the 3 s compiler
    assert status == "on"  # built meanwhile (status waits for the thread)
    assert threads == "['torchdiag-cpu-kernel']" and right == "True", out


def test_a_cached_kernel_is_loaded_at_the_watchs_entry_so_every_step_takes_the_same_path(tmp_path):
    """The figures of a step must not depend on how long a build took: where the cache holds the library, the watch
    loads it at its entry (no subprocess, no thread), and its first recorded step already reads through the kernel."""
    env = {**os.environ, "TORCHDIAG_CACHE": str(tmp_path / "cache")}
    assert _python("from torchdiag.stats import _cpurow; print(_cpurow.status())", env).strip() == "on"
    run = ("import subprocess, torch, torchdiag\n"
           "from torchdiag.stats import _cpurow\n"
           "starts = []\n"
           "popen = subprocess.Popen.__init__\n"
           "subprocess.Popen.__init__ = lambda self, *a, **k: (starts.append(a), popen(self, *a, **k))[1]\n"
           "m = torch.nn.Linear(64, 64)\n"
           "with torchdiag.watch(m, every=1) as d:\n"
           "    ready = _cpurow.ready() is not None\n"
           "print(ready, _cpurow._state.get('thread') is None, len(starts))")
    assert _python(run, env).split() == ["True", "True", "0"]


@pytest.mark.skipif(sys.platform != "linux", reason="a POSIX shell script as the compiler")
def test_a_process_that_exits_while_the_kernel_builds_fills_the_cache_and_leaves_no_temporary_file(tmp_path):
    env = _slow_compiler(tmp_path, 1)
    cache = tmp_path / "cache"
    run = ("import torch, torchdiag\n"
           "m = torch.nn.Linear(64, 64)\n"
           "with torchdiag.watch(m, every=1) as d:\n"
           "    m(torch.randn(8, 64)).sum().backward(); d.step()\n")  # exits at once, the build under way
    _python(run, env)
    names = sorted(p.name for p in cache.iterdir())
    assert any(n.startswith("rows-") and n.endswith(".so") for n in names), names
    assert not any(n.endswith(".so.tmp") for n in names), names
