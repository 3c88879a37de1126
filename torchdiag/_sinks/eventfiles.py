"""TensorBoard event files: the compiled CRC32C their records are checksummed with, and whether a run's files
can be read to their end (``check_event_files``, for ``summarize``)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

_HOLDERS = [0]  # open owners of the compiled CRC (a watch's writer, a summarize check): restored at none
_PURE: list = []  # TensorBoard's own pure-Python masked CRC, while the compiled one stands in for it
_OFFERED: list = []  # providers of a compiled CRC-32C besides google-crc32c (``offer_crc32c``)


def offer_crc32c(provider: Callable[[], Callable[[bytes], int] | None]) -> None:
    """Another compiled CRC-32C (unmasked) for ``use_compiled_crc`` to use where ``google-crc32c`` is not
    installed: ``provider`` is called at the first need, and returns the function or None (``watch`` offers the
    one built with torchdiag's CPU kernel)."""
    if provider not in _OFFERED:
        _OFFERED.append(provider)


def _compiled() -> Callable[[bytes], int] | None:
    """``google-crc32c``'s CRC-32C where it is installed with its C extension, else an offered one, else None."""
    try:
        import google_crc32c

        hardware = getattr(google_crc32c, "implementation", "c") == "c"  # (not its pure-Python fallback)
    except ImportError:
        hardware = False
    if not hardware:
        for provider in _OFFERED:
            fn = provider()
            if fn is not None:
                return fn
        return None

    def value(data: bytes) -> int:
        return int(google_crc32c.value(bytes(data)))

    return value


def use_compiled_crc() -> bool:
    """Give TensorBoard's event writer a compiled CRC-32C, until the matching ``release_compiled_crc``.

    Without TensorFlow, TensorBoard checksums every event record in pure Python (~0.1 ms per KB, on the writer
    thread but holding the GIL). The compiled one is ``google-crc32c``'s (``pip install torchdiag[fast]``), else
    the one built with torchdiag's CPU kernel (``offer_crc32c``); it is checked against TensorBoard's own on a
    test vector before it is used. It is TensorBoard's module-level function that is replaced, so every writer
    of the process (your own ``SummaryWriter`` too) uses it meanwhile: the same checksums, computed faster. When
    the last holder releases it (a watch's writer closed), TensorBoard's own function is put back. Returns
    whether a compiled CRC is in use.
    """
    try:
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if getattr(record_writer.masked_crc32c, "_torchdiag", False):
        _HOLDERS[0] += 1
        return True
    crc32c = _compiled()
    if crc32c is None:
        return False
    pure = record_writer.masked_crc32c

    def masked_crc32c(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    probe = bytes(range(256)) * 3
    if masked_crc32c(probe) != pure(probe):  # pragma: no cover - a broken build: keep the pure one
        return False
    masked_crc32c._torchdiag = True  # type: ignore[attr-defined]
    _PURE[:] = [pure]
    _HOLDERS[0] = 1
    record_writer.masked_crc32c = masked_crc32c
    return True


def release_compiled_crc() -> None:
    """One holder of ``use_compiled_crc`` is done; the last one puts TensorBoard's own function back."""
    try:
        from tensorboard.summary.writer import record_writer
    except ImportError:  # pragma: no cover - nothing was replaced
        return
    if not getattr(record_writer.masked_crc32c, "_torchdiag", False):
        return
    _HOLDERS[0] = max(0, _HOLDERS[0] - 1)
    if _HOLDERS[0] == 0 and _PURE:
        record_writer.masked_crc32c = _PURE.pop()


def check_event_files(run: str, last_step: int | None) -> str | None:
    """Why the event files directly in ``run`` cannot be read to their end (a record cut off or failing its
    checksum, as TensorBoard's reader then silently stops there), or None when they can. The header of every
    record is checked (cheap); the data checksums too when a compiled CRC-32C is at hand (``google-crc32c`` or
    torchdiag's own, offered by the caller); else the step of the last record is compared with the last step the
    reader reached."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer import record_writer


    check_data = use_compiled_crc()
    crc = record_writer.masked_crc32c
    if check_data:
        release_compiled_crc()  # (``crc`` keeps the compiled function for this check)
    reached = "no step" if last_step is None else f"step {last_step}"
    for name in sorted(os.listdir(run)):
        path = os.path.join(run, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        last = b""
        with open(path, "rb") as f:
            pos = 0
            while pos < size:
                header = f.read(12)
                problem = None
                if len(header) < 12:
                    problem = "is cut off in a record header"
                else:
                    (length,), (hcrc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
                    if crc(header[:8]) != hcrc:
                        problem = "has a corrupt record header"
                    elif pos + 12 + length + 4 > size:
                        problem = "is cut off inside a record"
                    else:
                        data = f.read(length)
                        (dcrc,) = struct.unpack("<I", f.read(4))
                        if check_data and crc(data) != dcrc:
                            problem = "has a record that fails its checksum"
                        last = data
                if problem:
                    return (f"stopped early: {name} {problem} at byte {pos} of {size} (truncated, corrupt, or"
                            f" still being written); read up to {reached}")
                pos += 12 + length + 4
        if last and last_step is not None:
            try:
                final = Event.FromString(last).step
            except Exception:  # noqa: BLE001 - an unparseable last record: the reader stopped there too
                final = None
            if final is None or final > last_step:
                return (f"stopped early: {name} has records up to step {final} that TensorBoard's reader could"
                        f" not read (a corrupt record); read up to {reached}")
    return None
