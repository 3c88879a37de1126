"""One-pass statistics on the CPU: a small C kernel reads a float32 tensor once for its whole row.

The ATen path (``stats``) reads a CPU activation three to five times (``sum``, ``dot``, ``aminmax``, and
``sign`` + ``sum`` for a ReLU output, which also writes a copy). This kernel (``_rows.c``) reads it once,
with a software prefetch: measured on a cold 1M-element tensor, one thread, about one ``sum``'s time for the
whole row, against about three ``sum``s for the ATen passes. It is plain C (no torch headers), compiled once
per machine with the system's C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``; about 0.3-1 s), in a thread
started at a watch's entry (``prepare``: never inside the user's step; the ATen path until it is ready), into a cache
directory (``$TORCHDIAG_CACHE``, else ``$XDG_CACHE_HOME/torchdiag`` or ``~/.cache/torchdiag``; a temporary
directory of the process's own where that is not writable), and called through ``ctypes``. Where there is no
compiler, the build fails, or ``TORCHDIAG_CPU_KERNEL=0``, the ATen path is used, for good.

The kernel is single-threaded, so it is used where ATen's reductions would not be parallel anyway: up
to 2 torch threads, or tensors of up to 256K elements. The order of its additions is fixed by its source,
not by the instruction set: its AVX2 and baseline builds give identical rows (tested).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_rows.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
SERIAL_N = 1 << 18  # past this many elements, with more than 2 threads, ATen's parallel passes win
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_double,
         ctypes.c_void_p]

_lock = threading.Lock()
_state: dict = {}  # "fns": (plain, zeros, sat, zeros+sat) or None; "why": the reason it is not used


def cache_dir() -> Path:
    env = os.environ.get("TORCHDIAG_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "torchdiag"


FAILURE_TTL_S = 86400.0  # a compiler that failed or hung is not tried again for a day (a file in the cache says so)


def cc_timeout_s() -> float:
    """How long a compiler call may take: ``TORCHDIAG_CC_TIMEOUT`` seconds, else 60 (a build takes 0.3-1 s; a hung
    ``$CC``, such as an unreachable distcc or ccache server, would otherwise hold the first recorded step)."""
    try:
        value = float(os.environ.get("TORCHDIAG_CC_TIMEOUT", "") or 60.0)
    except ValueError:
        return 60.0
    return value if value > 0 else 60.0


_BUILDING: dict = {}  # the compiler running now ("proc") and the file it writes ("tmp"): for ``_at_exit``


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own; past ``cc_timeout_s`` its whole process group is killed (a compiler driver's
    children too), never left running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _BUILDING["proc"] = proc
    try:
        out, err = proc.communicate(timeout=cc_timeout_s())
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.communicate()
        raise RuntimeError(f"{cmd[0]} did not finish within {cc_timeout_s():g} s (killed; TORCHDIAG_CC_TIMEOUT sets"
                           " the limit)") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _failure_file(cc: str) -> Path:
    return cache_dir() / f"cc-failed-{hashlib.sha256(str(shutil.which(cc)).encode()).hexdigest()[:16]}"


def _remembered_failure(cc: str) -> str | None:
    """Why this compiler failed in another process within ``FAILURE_TTL_S``, if it did."""
    try:
        path = _failure_file(cc)
        if time.time() - path.stat().st_mtime < FAILURE_TTL_S:
            return path.read_text()[:300]
    except OSError:
        pass
    return None


def _remember_failure(cc: str, why: str) -> None:
    try:
        path = _failure_file(cc)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(why)
    except OSError:
        pass


def compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def build(out: Path, cc: str, extra: tuple[str, ...] = (), replace: bool = False) -> None:
    """Compile ``_rows.c`` into the shared library ``out``. Published with a hard link, never over an existing
    file: processes building at once (ranks, nodes sharing a home) keep the first one, which others may have
    mapped already. ``replace``: over a file that is not whole (a rename: a process that mapped the old one keeps
    its inode)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep(out.parent)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    _BUILDING["tmp"] = tmp
    try:
        done = _run([cc, *FLAGS, *extra, "-o", tmp, str(SOURCE)])
        if done.returncode != 0 and not extra:  # no function multiversioning (musl, old compilers): one target
            done = _run([cc, *FLAGS, "-DTD_ONE_TARGET", "-o", tmp, str(SOURCE)])
        if done.returncode != 0:
            raise RuntimeError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[:300]}")
        os.chmod(tmp, 0o755)
        if replace:
            os.replace(tmp, out)
            return
        try:
            os.link(tmp, out)
        except FileExistsError:
            pass
    finally:
        _BUILDING.pop("tmp", None)
        _BUILDING.pop("proc", None)
        if os.path.exists(tmp):
            os.unlink(tmp)


_STALE_S = 3600.0  # a build's temporary file this old was left by a process killed while it built


def _sweep(directory: Path) -> None:
    """Remove the temporary files of builds that processes killed mid-build left behind."""
    now = time.time()
    for stale in directory.glob("*.so.tmp"):
        try:
            if now - stale.stat().st_mtime > _STALE_S:
                stale.unlink()
        except OSError:
            pass


def whole(path: Path) -> bool:
    """Whether an ELF library is complete: its section header table, which the linker writes last, lies within the
    file. A truncated file (a full disk, a killed copy, a sync that stopped) fails, where loading it would kill the
    process with SIGBUS. Other formats are taken as they are."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if head[:4] != b"\x7fELF":
        return size > 0
    if len(head) < 64 or head[4] not in (1, 2) or head[5] not in (1, 2):
        return False
    little = head[5] == 1
    if head[4] == 2:  # 64-bit: e_shoff at 0x28 (8 bytes), e_shentsize and e_shnum at 0x3A, 0x3C
        shoff = int.from_bytes(head[0x28:0x30], "little" if little else "big")
        shentsize = int.from_bytes(head[0x3A:0x3C], "little" if little else "big")
        shnum = int.from_bytes(head[0x3C:0x3E], "little" if little else "big")
    else:  # 32-bit: e_shoff at 0x20 (4 bytes), e_shentsize and e_shnum at 0x2E, 0x30
        shoff = int.from_bytes(head[0x20:0x24], "little" if little else "big")
        shentsize = int.from_bytes(head[0x2E:0x30], "little" if little else "big")
        shnum = int.from_bytes(head[0x30:0x32], "little" if little else "big")
    return 0 < shoff and shoff + shentsize * shnum <= size


def _trusted(path: Path) -> bool:
    """A library torchdiag may load: owned by this user, in a directory owned by this user, neither writable by
    anyone else (a predictable name in a shared directory could be someone else's code)."""
    if not hasattr(os, "geteuid"):
        return True  # (no POSIX owners: the cache is the user's own profile directory)
    try:
        for st in (path.stat(), path.parent.stat()):
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def load(path: Path) -> tuple:
    lib = ctypes.CDLL(str(path))
    fns = []
    for name in ("td_row", "td_row_zeros", "td_row_sat", "td_row_zeros_sat"):
        f = getattr(lib, name)
        f.argtypes = _ARGS
        f.restype = ctypes.c_int
        fns.append(f)
    return tuple(fns)


def _cache_path(cc: str) -> Path:
    """Where the cache keeps the library this compiler builds: named by the source, the compiler (its resolved path,
    size and modification time: an upgrade builds anew) and the platform; no subprocess is run to name it."""
    exe = os.path.realpath(shutil.which(cc) or cc)
    try:
        st = os.stat(exe)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "?"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), exe, stamp, " ".join(FLAGS), sys.platform,
                                     platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir() / f"rows-{key}.so"


def _cached(cc: str) -> tuple[tuple, Path]:
    """The kernel from the cache (built there if missing); where the cache cannot be used (not writable, not
    this user's, on a filesystem that cannot map libraries), a build of this process's own."""
    path = _cache_path(cc)
    try:
        if not path.exists():
            build(path, cc)
        elif not whole(path) and _trusted(path):  # a truncated library: loading it would kill the process
            build(path, cc, replace=True)
        if _trusted(path) and whole(path):
            return load(path), path
    except OSError:  # the cache cannot be used (not writable, a filesystem that cannot map libraries); a compiler
        pass  # that fails or hangs raises RuntimeError, which a second build would only repeat
    private = Path(tempfile.mkdtemp(prefix="torchdiag-")) / path.name
    try:
        build(private, cc)
        if not whole(private):
            raise RuntimeError(f"the library {cc} built is not whole")
        return load(private), private
    finally:  # a process's own build leaves nothing behind in $TMPDIR (a loaded library stays mapped once unlinked)
        shutil.rmtree(private.parent, ignore_errors=True)


def _library() -> tuple | None:
    """The kernel's functions, loaded (built first where the cache has none) on the first call, waiting for a build
    another thread started (``prepare``); None where the ATen path is used for good (``_state["why"]`` says why)."""
    fns = _state.get("fns", False)
    if fns is not False:
        return fns
    with _lock:
        if "fns" not in _state:
            _state["fns"] = _load()
    return _state["fns"]


def _unusable() -> str | None:
    """Why the kernel cannot be used in this process, found without running anything; None if it may be."""
    if _state.get("off", os.environ.get("TORCHDIAG_CPU_KERNEL", "1") == "0"):
        return "switched off (TORCHDIAG_CPU_KERNEL=0 or set_enabled(False))"
    cc = compiler()
    if cc is None:
        return "no C compiler ($CC, cc, gcc or clang)"
    remembered = _remembered_failure(cc)
    if remembered is not None:
        return f"the build failed in an earlier process, not retried for a day ({remembered})"
    return None


def _load() -> tuple | None:
    why = _unusable()
    if why is not None:
        _state["why"] = why
        return None
    cc = compiler()
    assert cc is not None
    try:
        fns, _state["path"] = _cached(cc)
        return fns
    except Exception as e:  # noqa: BLE001 - no kernel: the ATen path, never an error in the user's step
        _state["why"] = f"the build failed ({type(e).__name__}: {str(e)[:300]})"
        if isinstance(e, RuntimeError):  # the compiler failed or hung: remembered, not paid in every process
            _remember_failure(cc, _state["why"])
    return None


def prepare() -> None:
    """At a watch's entry: the kernel, loaded at once where the cache holds it (no subprocess: the same kernel for
    every step of the process, so the same figures from run to run); else built in a thread of its own, beside the
    training loop, never inside the user's step (the steps until it is ready use the ATen path: the same figures
    to float32 rounding)."""
    if "fns" in _state or _state.get("thread") is not None:
        return
    with _lock:
        if "fns" in _state or _state.get("thread") is not None:
            return
        why = _unusable()
        if why is not None:
            _state["why"], _state["fns"] = why, None
            return
        cc = compiler()
        assert cc is not None
        try:
            path = _cache_path(cc)
            if path.exists() and _trusted(path) and whole(path):
                _state["fns"], _state["path"] = load(path), path
                return
        except Exception:  # noqa: BLE001, S110 - a library that does not load: the thread's build says why
            pass
        _start_thread()


def _start_thread() -> None:
    thread = threading.Thread(target=_library, name="torchdiag-cpu-kernel", daemon=True)
    _state["thread"] = thread
    thread.start()


def ready() -> tuple | None:
    """The kernel's functions if they are loaded; None while they load (the ATen path meanwhile) or for good. Never
    waits, never runs a compiler: a first use without a watch (a bare ``stats`` call) starts the loading thread."""
    fns = _state.get("fns", False)
    if fns is False:
        if _state.get("thread") is None and _lock.acquire(blocking=False):
            try:
                if "fns" not in _state and _state.get("thread") is None:
                    _start_thread()
            finally:
                _lock.release()
        return None
    return fns


_EXIT_WAIT_S = 10.0  # at interpreter exit, how long a build under way may take to finish (and fill the cache)


def _at_exit() -> None:
    """A build under way at interpreter exit: given a few seconds to finish (a short process still fills the cache),
    then its compiler's process group is killed and its temporary file removed, not left behind."""
    thread = _state.get("thread")
    if thread is not None and thread.is_alive():
        thread.join(timeout=min(_EXIT_WAIT_S, cc_timeout_s()))
    running = _BUILDING.get("proc")
    if running is not None and running.poll() is None:
        try:
            os.killpg(running.pid, signal.SIGKILL)
        except OSError:
            running.kill()
    tmp = _BUILDING.get("tmp")
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass


atexit.register(_at_exit)


def _after_fork_in_child() -> None:
    """A forked child has no copy of the loading thread (and its lock may have been held): it starts afresh."""
    global _lock
    _lock = threading.Lock()
    _BUILDING.clear()
    if "fns" not in _state:
        _state.pop("thread", None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_enabled(on: bool) -> None:
    """Use the kernel (where it builds) or the ATen path from now on, process-wide (as ``TORCHDIAG_CPU_KERNEL``;
    for A/B measurements and tests)."""
    with _lock:
        for key in ("fns", "why", "path", "thread"):
            _state.pop(key, None)
        _state["off"] = not on


def status() -> str:
    """'on', or why the ATen path is used (for the README's reader and bug reports)."""
    return "on" if _library() is not None else _state.get("why", "off")


def library_path() -> Path | None:
    """The shared library in use (None: the ATen path)."""
    return _state.get("path") if _library() is not None else None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through the kernel: a contiguous float32 CPU tensor, where it wins."""
    # a plain tensor (or parameter) with storage: a wrapper subclass (DTensor, a tensor subclass) or a ZeroTensor
    # has data_ptr 0
    return (type(x) in _PLAIN and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and x.numel() > 0 and (x.numel() <= SERIAL_N or torch.get_num_threads() <= 2) and x.data_ptr() != 0
            and ready() is not None)


def row_into(x: torch.Tensor, out_ptr: int, shift: bool, ratio: float,
             saturation: tuple[float, float] | None = None, zeros: bool = False) -> bool:
    """The 7 statistics of the contiguous float32 CPU tensor ``x`` (any shape; ``usable``), ``stats.act_row``'s
    columns with min and max always, written as float64 at address ``out_ptr`` (a row of a block the caller
    owns: no tensor per row); returns whether its sums are reliable to float accuracy (``stats._reliable``)."""
    fns = ready()
    assert fns is not None  # ``usable(x)``, the caller's precondition, found it loaded
    c, h = saturation if saturation is not None else (0.0, 0.0)
    fn = fns[(1 if zeros else 0) + (2 if saturation is not None else 0)]
    return bool(fn(x.data_ptr(), x.numel(), int(shift), c, h, ratio, out_ptr))
