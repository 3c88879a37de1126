"""Pictures in pure Python (no imaging library): an RGB ``Canvas`` with rectangles, lines and a 5x7 font,
the blue-white-red colour scale, and the PNG encoder the overview images are written with."""

from __future__ import annotations

import functools
import struct
import zlib


def png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (rows top to bottom, 3 bytes a pixel)."""
    stride = 3 * width
    rows = memoryview(rgb)
    raw = b"".join([b"\x00" + rows[y * stride:(y + 1) * stride] for y in range(height)])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 3)) + chunk(b"IEND", b""))


# a 5x7 font: each glyph is 7 rows of 5 bits (the high bit left); letters upper case only
_FONT = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16), "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31), "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17), "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17), "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8), ":": (0, 12, 12, 0, 12, 12, 0),
    "-": (0, 0, 0, 31, 0, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0), "/": (0, 1, 2, 4, 8, 16, 0),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), "=": (0, 0, 31, 0, 31, 0, 0),
    "%": (24, 25, 2, 4, 8, 19, 3), "<": (2, 4, 8, 16, 8, 4, 2), ">": (8, 4, 2, 1, 2, 4, 8),
    "_": (0, 0, 0, 0, 0, 0, 31), "×": (0, 17, 10, 4, 10, 17, 0), "#": (10, 10, 31, 10, 31, 10, 10),
    "?": (14, 17, 1, 2, 4, 0, 4), "!": (4, 4, 4, 4, 4, 0, 4), "*": (0, 4, 21, 14, 21, 4, 0),
    "[": (14, 8, 8, 8, 8, 8, 14), "]": (14, 2, 2, 2, 2, 2, 14), "'": (4, 4, 8, 0, 0, 0, 0),
    "…": (0, 0, 0, 0, 0, 0, 21), "^": (4, 10, 17, 0, 0, 0, 0),
    "÷": (0, 4, 0, 31, 0, 4, 0),
}


def _runs(rows: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """A glyph's pixels as horizontal runs (column, row, length): one copy per run, not per pixel."""
    runs = []
    for r, bits in enumerate(rows):
        c = 0
        while c < 5:
            if bits & (16 >> c):
                n = 1
                while c + n < 5 and bits & (16 >> (c + n)):
                    n += 1
                runs.append((c, r, n))
                c += n
            else:
                c += 1
    return tuple(runs)


_GLYPHS = {ch: _runs(rows) for ch, rows in _FONT.items()}


@functools.lru_cache(maxsize=16)
def _placed(width: int, scale: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """Each glyph's runs on a canvas ``width`` pixels wide at ``scale``: (byte offset from the glyph's top left,
    bytes), one per line of pixels."""
    return {ch: tuple((3 * ((r * scale + k) * width + c * scale), 3 * n * scale) for c, r, n in runs
                      for k in range(scale)) for ch, runs in _GLYPHS.items()}
CHAR_W, CHAR_H = 6, 8  # a glyph and its spacing
WHITE, BLACK, GREY, MISSING = (255, 255, 255), (0, 0, 0), (120, 120, 120), (200, 200, 200)
NONFINITE = (150, 0, 200)  # NaN/Inf: a colour that the blue-white-red scale never takes
FORWARD, BACKWARD = (202, 64, 42), (33, 102, 172)
# ColorBrewer RdBu (reversed): low = blue, the reference = near white, high = red
_DIVERGING = ((5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240), (247, 247, 247),
              (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31))


def diverging(t: float) -> tuple[int, int, int]:
    """The colour of ``t`` in [-1, 1] (clamped): -1 dark blue, 0 near white, +1 dark red."""
    t = min(max(t, -1.0), 1.0)
    x = (t + 1) / 2 * (len(_DIVERGING) - 1)
    i = min(int(x), len(_DIVERGING) - 2)
    f = x - i
    a, b = _DIVERGING[i], _DIVERGING[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))  # type: ignore[return-value]


SCALE = [bytes(diverging((i - 128) / 128)) for i in range(257)]  # the scale in 257 steps, as pixel bytes


def mix(c: tuple[int, int, int], w: float) -> tuple[int, int, int]:
    """``c`` faded towards white by ``w`` (0: as is, 1: white)."""
    return tuple(round(v + (255 - v) * w) for v in c)  # type: ignore[return-value]


class Canvas:
    """An RGB pixel buffer with rectangles, lines and 5x7 text, encoded as PNG."""

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = WHITE) -> None:
        self.width, self.height = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            o = 3 * (yy * self.width + x0)
            self.px[o:o + len(row)] = row

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            o = 3 * (y * self.width + x)
            self.px[o:o + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], thick: int = 1,
             dash: int = 0) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        width, height, px, half = self.width, self.height, self.px, thick // 2
        square = bytes(color) * thick
        while True:
            if not dash or (n // dash) % 2 == 0:  # a thick x thick square about the point (``rect``, inlined)
                a, b = x0 - half, x0 - half + thick
                if a >= 0 and b <= width:
                    for yy in range(max(y0 - half, 0), min(y0 - half + thick, height)):
                        o = 3 * (yy * width + a)
                        px[o:o + 3 * thick] = square
                else:
                    self.rect(a, y0 - half, thick, thick, color)
            n += 1
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int] = BLACK, scale: int = 1) -> int:
        """Draw ``s`` with its top left at (x, y), each font pixel ``scale`` x ``scale``; returns the x after it."""
        s = s.upper()
        pixel, width, px = bytes(color), self.width, self.px
        end = x + CHAR_W * scale * len(s)
        if x >= 0 and y >= 0 and end <= width and y + 7 * scale <= self.height:  # inside: no clipping
            placed = _placed(width, scale)
            fills: dict[int, bytes] = {}  # a run's bytes, by length
            at = 3 * (y * width + x)
            unknown = placed["?"]
            for ch in s:
                for o, n in placed.get(ch, unknown):
                    fill = fills.get(n)
                    if fill is None:
                        fill = fills[n] = pixel * (n // 3)
                    px[at + o:at + o + n] = fill
                at += 3 * CHAR_W * scale
            return end
        for ch in s:
            for c, r, n in _GLYPHS.get(ch, _GLYPHS["?"]):
                x0, x1 = max(x + c * scale, 0), min(x + (c + n) * scale, width)
                if x1 <= x0:
                    continue
                run = pixel * (x1 - x0)
                for yy in range(max(y + r * scale, 0), min(y + (r + 1) * scale, self.height)):
                    o = 3 * (yy * width + x0)
                    px[o:o + len(run)] = run
            x += CHAR_W * scale
        return x

    def strip(self, x: int, y: int, pixels: bytes, h: int) -> None:
        """The row of RGB ``pixels`` (3 bytes each) drawn ``h`` times from (x, y) down (within the canvas)."""
        x0, x1 = max(x, 0), min(x + len(pixels) // 3, self.width)
        if x1 <= x0:
            return
        row = pixels[3 * (x0 - x):3 * (x1 - x)]
        for yy in range(max(y, 0), min(y + h, self.height)):
            o = 3 * (yy * self.width + x0)
            self.px[o:o + len(row)] = row

    def png(self) -> bytes:
        return png(self.width, self.height, self.px)


def text_width(s: str, scale: int = 1) -> int:
    return CHAR_W * scale * len(s)

