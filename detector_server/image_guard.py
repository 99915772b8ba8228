"""The work budget of an encoded image: refuse files whose headers would make Pillow loop for long.

Use `check_image_work(data)` before handing untrusted bytes to Pillow (`preprocess.decode_image`
does). Pillow parses headers and metadata in Python, one loop iteration per JPEG marker, fill or
junk byte, PNG chunk, GIF block, TIFF directory entry or strip, and RLE-compressed BMP pixel. Those
cost time (and memory) per structure, not per pixel, so a 32x32 JPEG padded with 12 million empty
APP1 markers (46 MiB) took 28 s and 1.8 GB to open. Here each of those structures is counted, in a
loop that stops at the budget, and an image over budget is an InputError before Pillow sees it.

The budget, `work_budget(len(data))`, is 1024 structures plus one per 4 KiB of file (TIFF strips:
one per KiB): a real image never comes near it (a photo has tens of JPEG markers; libpng writes one
IDAT chunk per 8 KiB), while Pillow's Python work on any accepted image stays proportional to its
size, a few ms per MB. A few Pillow handlers do more than constant work per structure (a JPEG DQT or SOF
segment loops over its content, EXIF segments are concatenated); those segments have their own
small counts. Pixel decoding (libjpeg, zlib, libtiff, libwebp) runs in C and is bounded by the
pixel limit, not here. Formats are recognised by the same leading bytes Pillow checks; WebP is
parsed in C entirely and needs no count.

Test: tests/runtime/test_preprocess.py (budgets, real images pass), tests/reliability/
test_hostile_input.py (the padded files of each format are refused fast).
"""
from __future__ import annotations

import re
import struct

from .errors import InputError

__all__ = ["check_image_work", "work_budget", "MAX_RLE_BMP_PIXELS"]

_BASE_STEPS = 1024          # structures every image may have, whatever its size
_BYTES_PER_STEP = 4096      # plus one per this many bytes of file
_BYTES_PER_STRIP = 1024     # TIFF strips or tiles: one per KiB (a 640-pixel gray row is a strip)
_MAX_JPEG_SCANS = 256       # progressive scans (libjpeg redoes work per scan; photos have ~10)
# JPEG segments whose Pillow handler costs more than one step: at most this many of each kind.
_MAX_HEAVY = {"DQT": 8, "SOF": 4, "Exif": 4, "Photoshop": 8}
_MAX_DQT_BYTES = 1024       # a DQT segment holds at most 4 tables (4 x 129 bytes + length)
MAX_RLE_BMP_PIXELS = 1 << 18  # Pillow decodes RLE BMP in Python, a step per pixel

_FF_RUN = re.compile(rb"\xff+")
# Pillow's JPEG marker table (JpegImagePlugin.MARKER) holds every code from FFC0 to FFFE; these
# have no length and payload (JPG0, RSTn, SOI, EOI, JPGn); anything below FFC0 is an error.
_NO_PAYLOAD = frozenset([0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)])
_SOF = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
                  0xDE])


def work_budget(n_bytes: int) -> int:
    """How many header structures an image of `n_bytes` may have (see the module docstring)."""
    return _BASE_STEPS + n_bytes // _BYTES_PER_STEP


def _refuse(what: str, limit: int) -> InputError:
    return InputError(f"image has more than {limit} {what}, over the work limit for its size",
                      field="data")


def check_image_work(data: bytes) -> None:
    """Raise InputError when `data` has more header structures than `work_budget` allows.

    Bytes that are no known image format pass (Pillow refuses them at once); so do structures cut
    short (Pillow reports the truncation). Costs at most a few ms: every loop stops at the budget.
    """
    budget = work_budget(len(data))
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg(data, budget)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png(data, budget)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data, budget)
    elif data[:4] in (b"MM\x00\x2a", b"II\x2a\x00", b"MM\x2a\x00", b"II\x00\x2a", b"MM\x00\x2b",
                      b"II\x2b\x00"):
        _check_tiff(data, budget)
    elif data[:2] == b"BM":
        _check_bmp(data)


def _check_jpeg(data: bytes, budget: int) -> None:
    """Walk the markers up to the first scan as Pillow does: each junk byte, fill byte and
    segment is one step; count the heavy segments; then count the scans."""
    n, pos, steps = len(data), 2, 0
    heavy = dict.fromkeys(_MAX_HEAVY, 0)
    while pos < n:
        window = pos + budget - steps + 2        # never look further than the budget reaches
        ff = data.find(b"\xff", pos, window)
        run = _FF_RUN.match(data, ff, window).end() if ff >= 0 else min(n, window)
        steps += run - pos                       # junk bytes, the 0xFF and its fill bytes
        if steps > budget:
            raise _refuse("JPEG markers, fill or junk bytes", budget)
        if ff < 0 or run >= n:
            return
        code, pos = data[run], run + 1
        if code == 0x00:                         # an escaped 0xFF: Pillow skips it
            continue
        if code < 0xC0 or code == 0xFF:          # not a marker: Pillow stops with an error
            return
        if code == 0xDA:                         # start of scan: the rest is libjpeg's
            if data.count(b"\xff\xda", run - 1) > _MAX_JPEG_SCANS:
                raise _refuse("JPEG scans", _MAX_JPEG_SCANS)
            return
        if code in _NO_PAYLOAD:
            continue
        length = int.from_bytes(data[pos:pos + 2], "big")
        kind = _heavy_kind(code, data, pos + 2)
        if kind is not None:
            heavy[kind] += 1
            if heavy[kind] > _MAX_HEAVY[kind] or (kind == "DQT" and length > _MAX_DQT_BYTES):
                raise _refuse(f"JPEG {kind} segments (or too large ones)", _MAX_HEAVY[kind])
        pos += max(length, 2)


def _heavy_kind(code: int, data: bytes, start: int) -> str | None:
    if code == 0xDB:
        return "DQT"
    if code in _SOF:
        return "SOF"
    if code == 0xE1 and data.startswith(b"Exif\0\0", start):
        return "Exif"
    if code == 0xED and data.startswith(b"Photoshop 3.0\0", start):
        return "Photoshop"
    return None


def _check_png(data: bytes, budget: int) -> None:
    """Count the chunks up to IEND (Pillow reads each one in Python, IDAT chunks included)."""
    pos, chunks, n = 8, 0, len(data)
    while pos + 8 <= n:
        chunks += 1
        if chunks > budget:
            raise _refuse("PNG chunks", budget)
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IEND":
            return
        pos += 12 + length


def _check_gif(data: bytes, budget: int) -> None:
    """Count the bytes, extensions and data sub-blocks Pillow walks before the first image."""
    n = len(data)
    flags = data[10] if n > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    steps = 0
    while pos < n:
        steps += 1
        if steps > budget:
            raise _refuse("GIF blocks before the first image", budget)
        block = data[pos]
        if block in (0x2C, 0x3B):        # image descriptor (C decodes from here) or trailer
            return
        if block != 0x21:                # junk: a step per byte
            pos += 1
            continue
        pos += 2                         # extension introducer and label
        while pos < n:                   # data sub-blocks up to the empty one
            steps += 1
            if steps > budget:
                raise _refuse("GIF blocks before the first image", budget)
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


def _check_tiff(data: bytes, budget: int) -> None:
    """Count the entries of the first directory and its strips or tiles (a Python step each)."""
    e = "<" if data[:2] == b"II" else ">"
    big = data[2] == 43                  # BigTIFF, as Pillow decides it
    head, count_fmt, entry_fmt, entry_size = (16, "Q", "HHQ", 20) if big else (8, "H", "HHL", 12)
    if len(data) < head:
        return
    offset = struct.unpack_from(e + ("Q" if big else "L"), data, 8 if big else 4)[0]
    csize = struct.calcsize(count_fmt)
    if offset + csize > len(data):
        return
    entries = struct.unpack_from(e + count_fmt, data, offset)[0]
    if entries > budget:
        raise _refuse("TIFF directory entries", budget)
    for k in range(entries):
        at = offset + csize + k * entry_size
        if at + entry_size > len(data):
            return
        tag, _, count = struct.unpack_from(e + entry_fmt, data, at)
        strips = _BASE_STEPS + len(data) // _BYTES_PER_STRIP
        if tag in (273, 324) and count > strips:     # StripOffsets, TileOffsets
            raise _refuse("TIFF strips or tiles", strips)


def _check_bmp(data: bytes) -> None:
    """RLE-compressed BMP is decoded by Pillow in Python, a step per pixel: bound its pixels."""
    if len(data) < 34 or int.from_bytes(data[14:18], "little") < 40:
        return                           # an OS/2 header: no compression field
    width, height = struct.unpack_from("<ii", data, 18)
    compression = int.from_bytes(data[30:34], "little")
    if compression in (1, 2) and abs(width) * abs(height) > MAX_RLE_BMP_PIXELS:
        raise InputError(f"RLE-compressed BMP of {abs(width)}x{abs(height)} pixels is over the "
                         f"limit of {MAX_RLE_BMP_PIXELS} for that encoding", field="data")
