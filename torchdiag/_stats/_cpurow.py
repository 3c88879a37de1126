"""One-pass statistics on the CPU: a small C kernel reads a float32 tensor once for its whole row.

The ATen path (``stats``) reads a CPU activation three to five times (``sum``, ``dot``, ``aminmax``, and
``sign`` + ``sum`` for a ReLU output, which also writes a copy). This kernel (``_rows.c``) reads it once,
with a software prefetch: measured on a cold 1M-element tensor, one thread, about one ``sum``'s time for the
whole row, against about three ``sum``s for the ATen passes. It is plain C (no torch headers, no Python.h),
built when torchdiag is installed (an optional setuptools extension, ``setup.py``) into a shared library next to
this file, and loaded with ``ctypes`` at its first use: no compiler, subprocess or thread at run time. Where it
was not built (no C compiler at install time), does not load or fails its self-check, or with
``TORCHDIAG_CPU_KERNEL=0``, the ATen path is used (``status`` says why).

The kernel is single-threaded, so it is used where ATen's reductions would not be parallel anyway: up
to 2 torch threads, or tensors of up to 256K elements. The order of its additions is fixed by its source,
not by the instruction set: its AVX2 and baseline builds give identical rows (tested).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from pathlib import Path
from typing import Any

import torch

from .library import function, library_file

SERIAL_N = 1 << 18  # past this many elements, with more than 2 threads, ATen's parallel passes win
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_double,
         ctypes.c_void_p]
NOT_BUILT = "the C kernel was not built with this install (no C compiler at install time)"
OFF = "switched off (TORCHDIAG_CPU_KERNEL=0 or set_enabled(False))"

_lock = threading.Lock()
# "lib": (functions or None, path, why), found and loaded once per process; "fns": what ``usable`` reads (the
# functions, or None for the ATen path; absent until the first use); "why": the reason for None; "off": the switch
_state: dict = {}


def load(path: Path) -> tuple:
    """The kernel's four variants (plain, zeros, saturation, both) from the library at ``path``."""
    lib = ctypes.CDLL(str(path))
    fns = []
    for name in ("td_row", "td_row_zeros", "td_row_sat", "td_row_zeros_sat"):
        f = getattr(lib, name)
        f.argtypes = _ARGS
        f.restype = ctypes.c_int
        fns.append(f)
    return tuple(fns)


# The self-check: 1..17 (a whole vector of 16 lanes and a tail of one), about r = 1, saturation rails at 3 +- 10:
# every figure exact in float32, whatever the order of the additions.
_CHECK_X = [float(v) for v in range(1, 18)]
_CHECK_ROWS = (
    [1.0, 136.0, 1496.0, 1.0, 17.0, math.nan, math.nan],
    [1.0, 136.0, 1496.0, 1.0, 17.0, 17.0, math.nan],
    [1.0, 136.0, 1496.0, 1.0, 17.0, math.nan, 4.0],
    [1.0, 136.0, 1496.0, 1.0, 17.0, 17.0, 4.0],
)


def _self_check(fns: tuple) -> bool:
    """Whether every variant gives the row of a known tensor (a library built wrong gives the ATen path, not wrong
    statistics)."""
    x = torch.tensor(_CHECK_X, dtype=torch.float32)
    out = torch.empty(7, dtype=torch.float64)
    for fn, want in zip(fns, _CHECK_ROWS):
        out.fill_(-1.0)
        if fn(x.data_ptr(), x.numel(), 1, 3.0, 10.0, 10.0, out.data_ptr()) != 1:
            return False
        for got, w in zip(out.tolist(), want):
            if not (got == w or (math.isnan(got) and math.isnan(w))):
                return False
    return True


def _find_and_load() -> tuple[tuple | None, Path | None, str | None]:
    path = library_file()
    if path is None:
        return None, None, NOT_BUILT
    try:
        fns = load(path)
    except (OSError, AttributeError) as e:  # not loadable here, or not the kernel's library
        return None, path, f"the C kernel at {path} did not load ({type(e).__name__}: {str(e)[:300]})"
    if not _self_check(fns):
        return None, path, f"the C kernel at {path} gave a wrong row in its self-check"
    return fns, path, None


def _library() -> tuple | None:
    """The kernel's functions, loaded at the first call (a ``dlopen`` and the self-check: no subprocess); None
    where the ATen path is used (``_state["why"]`` says why)."""
    fns = _state.get("fns", False)
    if fns is not False:
        return fns
    with _lock:
        if "fns" not in _state:
            if _state.get("off", os.environ.get("TORCHDIAG_CPU_KERNEL", "1") == "0"):
                _state["why"], _state["fns"] = OFF, None
            else:
                if "lib" not in _state:
                    _state["lib"] = _find_and_load()
                fns, _, why = _state["lib"]
                _state["why"], _state["fns"] = why, fns
    return _state["fns"]


def set_enabled(on: bool) -> None:
    """Use the kernel (where it was built) or the ATen path from now on, process-wide (as ``TORCHDIAG_CPU_KERNEL``;
    for A/B measurements and tests). The library stays loaded."""
    with _lock:
        _state.pop("fns", None)
        _state.pop("why", None)
        _state["off"] = not on


def status() -> str:
    """'on', or why the ATen path is used (for the README's reader and bug reports)."""
    return "on" if _library() is not None else _state.get("why") or "off"


def library_path() -> Path | None:
    """The shared library in use (None: the ATen path)."""
    return _state["lib"][1] if _library() is not None else None


_HIST_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_void_p)


def _load_hist(path: Path) -> Any:
    """The library's histogram binning, checked on a known tensor (0..9 over [0, 9] in 3 bins: 3, 3, 4); None where
    this library has none (built before it) or bins wrong."""
    fn = function(path, "td_hist", _HIST_ARGS, ctypes.c_int)
    if fn is None:
        return None
    x = torch.arange(10, dtype=torch.float32)
    counts = torch.zeros(3, dtype=torch.int64)
    fn(x.data_ptr(), 10, 0.0, 9.0, 3, counts.data_ptr())
    return fn if counts.tolist() == [3, 3, 4] else None


def hist_into(x: torch.Tensor, lo: float, width: float, counts: torch.Tensor) -> bool:
    """Add the fixed-bin counts of ``x`` (``usable``; finite, every value >= ``lo``) into ``counts``, a contiguous
    int64 tensor of one count per bin, with the ATen path's float32 arithmetic (``stats._histogram_cpu``): bin
    ``floor((x - lo) * bins / width)``, the maximum in the last. False where this library cannot (then the ATen
    path bins it)."""
    if _library() is None:
        return False
    if "hist" not in _state:
        with _lock:
            if "hist" not in _state:
                _state["hist"] = _load_hist(_state["lib"][1])
    fn = _state["hist"]
    if fn is None:
        return False
    return bool(fn(x.data_ptr(), x.numel(), lo, width, counts.numel(), counts.data_ptr()))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through the kernel: a contiguous float32 CPU tensor, where it wins."""
    # a plain tensor (or parameter) with storage: a wrapper subclass (DTensor, a tensor subclass) or a ZeroTensor
    # has data_ptr 0
    if not (type(x) in _PLAIN and x.is_cpu and x.dtype == torch.float32 and x.is_contiguous()):
        return False
    n = x.numel()
    return n > 0 and (n <= SERIAL_N or torch.get_num_threads() <= 2) and x.data_ptr() != 0 and _library() is not None


def row_into(x: torch.Tensor, out_ptr: int, shift: bool, ratio: float,
             saturation: tuple[float, float] | None = None, zeros: bool = False) -> bool:
    """The 7 statistics of the contiguous float32 CPU tensor ``x`` (any shape; ``usable``), ``stats.act_row``'s
    columns with min and max always, written as float64 at address ``out_ptr`` (a row of a block the caller
    owns: no tensor per row); returns whether its sums are reliable to float accuracy (``stats._reliable``)."""
    fns = _library()
    assert fns is not None  # ``usable(x)``, the caller's precondition, found it loaded
    c, h = saturation if saturation is not None else (0.0, 0.0)
    fn = fns[(1 if zeros else 0) + (2 if saturation is not None else 0)]
    return bool(fn(x.data_ptr(), x.numel(), int(shift), c, h, ratio, out_ptr))
