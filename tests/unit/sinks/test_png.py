"""The pure-Python picture primitives the overview images are drawn with, against their definitions."""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction

import pytest

from torchdiag._sinks import png


def _by_definition(width: int, height: int, ops: list[tuple]) -> bytearray:
    """The canvas after ``ops``, pixel by pixel: a font pixel (column c, row r of the 5x7 glyph) is a
    ``scale`` x ``scale`` square; squares are clipped to the canvas."""
    px = bytearray(bytes(png.WHITE) * (width * height))
    for kind, *args in ops:
        if kind == "text":
            x, y, s, color, scale = args
            for ch in s.upper():
                rows = png._FONT.get(ch, png._FONT["?"])
                for r, bits in enumerate(rows):
                    for c in range(5):
                        if bits & (16 >> c):
                            for yy in range(y + r * scale, y + (r + 1) * scale):
                                for xx in range(x + c * scale, x + (c + 1) * scale):
                                    if 0 <= xx < width and 0 <= yy < height:
                                        px[3 * (yy * width + xx):3 * (yy * width + xx) + 3] = bytes(color)
                x += png.CHAR_W * scale
        elif kind == "line":  # the pixel nearest the segment at each step of its longer axis (lines with an odd
            # length there have no ties), each a thick x thick square about it; dashes of `dash` points
            x0, y0, x1, y1, color, thick, dash = args
            dx, dy = x1 - x0, y1 - y0
            steps = max(abs(dx), abs(dy))
            for n in range(steps + 1):
                t = Fraction(n, steps) if steps else Fraction(0)
                px_, py_ = round(x0 + t * dx), round(y0 + t * dy)
                if dash and (n // dash) % 2:
                    continue
                for yy in range(py_ - thick // 2, py_ - thick // 2 + thick):
                    for xx in range(px_ - thick // 2, px_ - thick // 2 + thick):
                        if 0 <= xx < width and 0 <= yy < height:
                            px[3 * (yy * width + xx):3 * (yy * width + xx) + 3] = bytes(color)
        elif kind == "strip":
            x, y, pixels, h = args
            for k in range(len(pixels) // 3):
                for yy in range(y, y + h):
                    if 0 <= x + k < width and 0 <= yy < height:
                        px[3 * (yy * width + x + k):3 * (yy * width + x + k) + 3] = pixels[3 * k:3 * k + 3]
    return px


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_text_lines_and_strips_draw_the_pixels_their_definition_gives(scale):
    every = "".join(png._FONT) + "éz"  # every glyph, an unknown one (drawn as ?) and a lower-case letter
    width, height = 400, 40
    inside = every[:12]
    assert 2 + png.text_width(inside, scale) <= width and 3 + 7 * scale <= height  # drawn without clipping
    ops = [("text", 2, 3, inside, (200, 10, 30), scale),
           ("text", 20, 12, every[12:24], (9, 9, 9), scale),
           ("text", -7, 36, every[24:50], png.BLACK, scale),  # clipped on the left and at the bottom
           ("text", 300, -3, every[50:], (1, 2, 3), scale),  # clipped at the top and on the right
           ("line", 5, 2, 390, 37, (0, 90, 0), scale, 0), ("line", 398, 1, -3, 41, (70, 0, 70), scale, 3),
           ("line", 10, 20, 10, 20, (5, 5, 5), scale, 0), ("line", 50, 0, 60, 39, (0, 0, 200), scale, 2),
           ("strip", -2, 12, bytes(range(30)), 4), ("strip", 390, 37, bytes(range(60)), 9)]
    c = png.Canvas(width, height)
    for kind, *args in ops:
        if kind == "line":
            x0, y0, x1, y1, color, thick, dash = args
            c.line(x0, y0, x1, y1, color, thick=thick, dash=dash)
        else:
            getattr(c, kind)(*args)
    assert c.px == _by_definition(width, height, ops)
    assert c.text(0, 0, "AB", scale=scale) == png.text_width("AB", scale)  # the x after the text


def test_png_holds_the_canvas_rows():
    c = png.Canvas(7, 3)
    c.strip(0, 1, bytes(range(21)), 1)
    data = c.png()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):  # each chunk: length, type, data, CRC of type and data
        (n,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        body = data[at + 8:at + 8 + n]
        assert struct.unpack(">I", data[at + 8 + n:at + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        at += 12 + n
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (7, 3, 8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[b"IDAT"])
    assert raw == b"".join(b"\x00" + bytes(c.px[21 * y:21 * (y + 1)]) for y in range(3))  # filter 0, then the row
