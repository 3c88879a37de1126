"""The shared library built with this install (``_rows.c``: the CPU statistics kernel and a CRC-32C): where it is,
and its CRC-32C for TensorBoard's event records. No torch here: ``torchdiag summarize`` reads event files with it
without importing torch."""

from __future__ import annotations

import ctypes
import importlib.machinery
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DIRECTORY = Path(__file__).parent  # where the install put the library
NAME = "_rows"

_lock = threading.Lock()
_crc: list = []  # [the CRC-32C function or None], found at the first call


def library_file(directory: Path | None = None) -> Path | None:
    """The kernel's shared library as the install named it (``_rows`` and this interpreter's extension suffix,
    e.g. ``.abi3.so``), if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = (directory or DIRECTORY) / (NAME + suffix)
        if path.is_file():
            return path
    return None


def function(path: Path, name: str, argtypes: Sequence[type], restype: type) -> Any:
    """The C function ``name`` of the library at ``path``, typed; None where the library does not load or has no
    such function (one built before it)."""
    try:
        fn = getattr(ctypes.CDLL(str(path)), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


def load_crc32c(path: Path) -> Callable[[bytes], int] | None:
    """The CRC-32C of the library at ``path``, checked on the standard test vector ("123456789" -> 0xE3069283);
    None where that library has none, does not load or gives a wrong value."""
    fn = function(path, "td_crc32c", (ctypes.c_char_p, ctypes.c_int64), ctypes.c_uint32)
    if fn is None:
        return None

    def crc32c(data: bytes) -> int:
        if type(data) is not bytes:  # a bytearray or memoryview: ctypes passes only bytes without a copy
            data = bytes(data)
        return int(fn(data, len(data)))

    return crc32c if crc32c(b"123456789") == 0xE3069283 and crc32c(b"") == 0 else None


def crc32c() -> Callable[[bytes], int] | None:
    """The CRC-32C (unmasked) built with this install, or None where the library was not built or did not load.
    Independent of the statistics kernel's switch (``TORCHDIAG_CPU_KERNEL``): it has its own check."""
    if not _crc:
        with _lock:
            if not _crc:
                path = library_file()
                _crc.append(load_crc32c(path) if path is not None else None)
    return _crc[0]
