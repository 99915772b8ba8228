"""The hostile-input corpus of the reliability tests and bench/fuzz.py, built from real images.

`build_hostile_corpus()` returns the cases; `check_result` asserts one verdict. Every
case names what the runtime must do with it: "score" (a finite score, no error), "error" (a per-item
error, no score) or "either" (formats whose last bytes a decoder may forgive, e.g. a PNG cut inside
IEND). Whatever the expectation, an item never raises and never takes the others down with it.
"""
from __future__ import annotations

import io
import math
import os
import socket
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import real_images
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
EXPECTATIONS = ("score", "error", "either")


@dataclass(frozen=True)
class HostileCase:
    """One corpus entry: `name` doubles as the item id; `expect` is one of EXPECTATIONS."""

    name: str
    data: bytes
    expect: str


# ---------------------------------------------------------------------------------------------
# Encoders of real images into odd formats
# ---------------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """`img` saved as `fmt` (PIL format name) into bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring width x height RGB pixels, with a tiny IDAT (a few rows
    of zeros): a decoder that trusts the header allocates width*height*3 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)) * 4, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def jpeg_bomb(jpeg: bytes, width: int = 65500, height: int = 65500) -> bytes:
    """A real JPEG whose SOF marker is patched to declare width x height."""
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        i = data.find(marker)
        if i >= 0:
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise ValueError("no SOF marker in the JPEG")


def gif_bomb(width: int = 65535, height: int = 65535) -> bytes:
    """A GIF whose logical screen and only frame declare width x height (a few bytes of data)."""
    small = encode(Image.new("P", (1, 1)), "GIF")
    data = bytearray(small)
    data[6:10] = struct.pack("<HH", width, height)             # logical screen
    i = data.find(b"\x2c")                                     # image descriptor
    data[i + 5:i + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    small = bytearray(encode(Image.new("RGB", (1, 1)), "BMP"))
    small[18:26] = struct.pack("<ii", width, height)
    return bytes(small)


def tiff_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    img = Image.new("L", (1, 1))
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    # Patch ImageWidth (256) and ImageLength (257) entries of the first IFD (little endian).
    ifd = struct.unpack("<I", data[4:8])[0]
    n = struct.unpack("<H", data[ifd:ifd + 2])[0]
    for k in range(n):
        e = ifd + 2 + 12 * k
        tag, typ = struct.unpack("<HH", data[e:e + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            data[e + 2:e + 4] = struct.pack("<H", 4)           # LONG
            data[e + 8:e + 12] = struct.pack("<I", value)
    return bytes(data)


def exif_rotated_jpeg(img: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def animated_gif(frames: list[Image.Image]) -> bytes:
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def sixteen_bit_png(gray: np.ndarray) -> bytes:
    return encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")


def palette_with_transparency(img: Image.Image) -> bytes:
    p = img.convert("P", palette=Image.ADAPTIVE, colors=16)
    return encode(p, "PNG", transparency=0)


# ---------------------------------------------------------------------------------------------
# Work bombs: small valid images whose headers make Pillow loop per structure (image_guard)
# ---------------------------------------------------------------------------------------------
def _tiny(fmt: str, **kw) -> bytes:
    return encode(Image.new("RGB", (32, 32), (90, 120, 30)), fmt, **kw)


def jpeg_padded(n: int, padding: bytes = b"\xff\xe1\x00\x02") -> bytes:
    """A 32x32 JPEG with `padding` repeated `n` times after SOI: empty APP1 markers by default
    (4 bytes each; 12 million of them stalled the old server 28 s), or b"\xff" fill bytes."""
    j = _tiny("JPEG")
    return j[:2] + padding * n + j[2:]


def jpeg_with_segments(marker: int, payload: bytes, n: int) -> bytes:
    """A 32x32 JPEG with `n` extra segments `marker` + `payload` after SOI."""
    j = _tiny("JPEG")
    seg = struct.pack(">HH", 0xFF00 | marker, len(payload) + 2) + payload
    return j[:2] + seg * n + j[2:]


def png_padded(n: int) -> bytes:
    """A 32x32 PNG with `n` empty ancillary chunks before IDAT (1.3 million stalled it 9.5 s)."""
    p = _tiny("PNG")
    return p[:33] + _png_chunk(b"abCd", b"") * n + p[33:]


def gif_padded(n: int) -> bytes:
    """A 32x32 GIF with a comment extension of `n` one-byte sub-blocks before the image."""
    g = _tiny("GIF")
    i = g.index(b"\x2c")                   # the image descriptor (the palette holds no 0x2C)
    return g[:i] + b"\x21\xfe" + b"\x01c" * n + b"\x00" + g[i:]


def tiff_many_strips(n: int, width: int = 1) -> bytes:
    """A width x n gray uncompressed TIFF, one strip per row (Pillow: a Python step per strip)."""
    entries = [(256, 4, 1, width), (257, 4, 1, n), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, n, 0), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, n, 0)]
    ifd_size = 2 + 12 * len(entries) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * n
    pixels_at = counts_at + 4 * n
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, typ, count, value in entries:
        value = {273: offsets_at, 279: counts_at}.get(tag, value)
        out += struct.pack("<HHI", tag, typ, count)
        out += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
    out += struct.pack("<I", 0)
    out += struct.pack(f"<{n}I", *range(pixels_at, pixels_at + n * width, width))
    out += struct.pack(f"<{n}I", *([width] * n))
    return bytes(out + bytes(range(256)) * (n * width // 256 + 1))


def rle_bmp(width: int, height: int) -> bytes:
    """A 4-bit RLE BMP of width x height (Pillow decodes RLE4 in Python, a step per pixel)."""
    rows = bytearray()
    for _ in range(height):
        left = width
        while left:
            run = min(255, left)
            rows += bytes([run, 0x17])
            left -= run
        rows += b"\x00\x00"                  # end of line
    rows += b"\x00\x01"                      # end of bitmap
    palette = bytes(range(16)) * 4
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 4, 2, len(rows), 2835, 2835, 16, 0)
    offset = 14 + len(header) + len(palette)
    return (b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + header + palette
            + bytes(rows))


def png_with_long_exif(n: int, orientation: int = 6) -> bytes:
    """A 32x32 PNG whose eXIf chunk has an orientation tag and one SHORT tag of `n` values:
    ImageOps.exif_transpose decodes all n of them to rewrite the EXIF block."""
    ifd = struct.pack("<H", 2) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    ifd += struct.pack("<HHII", 0x9000, 3, n, 8 + len(ifd) + 12 + 4) + struct.pack("<I", 0)
    exif = b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x01\x02" * n
    p = _tiny("PNG")
    return p[:33] + _png_chunk(b"eXIf", exif) + p[33:]


WORK_BOMBS = {
    "jpeg_300k_empty_app1": lambda: jpeg_padded(300_000),
    "jpeg_1M_fill_bytes": lambda: jpeg_padded(1_000_000, b"\xff"),
    "jpeg_20_dqt_of_1000_tables": lambda: jpeg_with_segments(0xDB, (b"\x00" + bytes(64)) * 1000,
                                                             20),
    "jpeg_8_exif": lambda: jpeg_with_segments(0xE1, b"Exif\x00\x00" + bytes(60_000), 8),
    "jpeg_300_scans": lambda: _tiny("JPEG", progressive=True)[:-2] + b"\xff\xda\x00\x02" * 300
    + b"\xff\xd9",
    "png_100k_empty_chunks": lambda: png_padded(100_000),
    "gif_300k_comment_blocks": lambda: gif_padded(300_000),
    "tiff_100k_strips": lambda: tiff_many_strips(100_000),
    "bmp_rle4_1024x1024": lambda: rle_bmp(1024, 1024),
}


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------
def seed_images(n: int = 8) -> list[Image.Image]:
    """`n` real RGB images: 32x32 photo patches and photographs (320-640 px, real_images.py)."""
    patches = real_images.photo_patches()
    out = [Image.fromarray(patches[i]) for i in range(n // 2)]
    out += [Image.open(io.BytesIO(b)).convert("RGB") for b in raw_jpeg_files(n - n // 2)]
    return out


def raw_jpeg_files(n: int = 4) -> list[bytes]:
    """The bytes of `n` (<= 100) real JPEG files: the two sample photographs as scikit-learn ships
    them (camera encodings, not re-encoded), then re-encoded crops (real_images.photo_jpegs)."""
    return real_images.photo_jpegs(n)


def _truncations(name: str, data: bytes, forgiving_tail: int) -> list[HostileCase]:
    """Cut `data` at several points; the last `forgiving_tail` bytes may be missing harmlessly."""
    n = len(data)
    cuts = sorted({1, 4, 8, 16, 33, 64, n // 4, n // 2, (3 * n) // 4, n - 1 - forgiving_tail,
                   n - 1, n - 2})
    return [HostileCase(f"{name}.cut{c}", data[:c],
                        "either" if c >= n - forgiving_tail - 1 else "error")
            for c in cuts if 0 < c < n]


def build_hostile_corpus(seed: int = 0) -> list[HostileCase]:
    """The hostile corpus, built from real images shipped with scikit-learn (deterministic for a
    seed): 32x32 photo patches and a 427x640 camera JPEG."""
    rng = np.random.default_rng(seed)
    patches = real_images.photo_patches()[:4]
    small = Image.fromarray(patches[0])
    photo_jpeg = raw_jpeg_files(1)[0]
    photo = Image.open(io.BytesIO(photo_jpeg)).convert("RGB")
    png = encode(small, "PNG")
    gray = np.asarray(photo.convert("L"))
    gif = animated_gif([Image.fromarray(a) for a in patches])
    cases = [
        # good references in many encodings: all must score
        HostileCase("good.png", png, "score"),
        HostileCase("good_photo.jpg", photo_jpeg, "score"),
        HostileCase("good.bmp", encode(small, "BMP"), "score"),
        HostileCase("good.webp", encode(photo, "WEBP", quality=80), "score"),
        HostileCase("good.tiff", encode(photo, "TIFF"), "score"),
        HostileCase("good_gray.png", encode(photo.convert("L"), "PNG"), "score"),
        HostileCase("good_1bit.png", encode(photo.convert("1"), "PNG"), "score"),
        HostileCase("good_la.png", encode(photo.convert("LA"), "PNG"), "score"),
        HostileCase("good_rgba.png", encode(photo.convert("RGBA"), "PNG"), "score"),
        HostileCase("good_float.tiff", encode(Image.fromarray(gray.astype(np.float32) / 255, "F"),
                                              "TIFF"), "score"),
        HostileCase("good_i32.tiff", encode(Image.fromarray(gray.astype(np.int32) * 1000, "I"),
                                            "TIFF"), "score"),
        HostileCase("not_accepted.ico", encode(small, "ICO"), "error"),  # ICO: not an accepted format
        HostileCase("tiny_1x1.png", encode(small.resize((1, 1)), "PNG"), "score"),
        HostileCase("wide_10000x1.png", encode(photo.resize((10000, 1)), "PNG"), "score"),
        HostileCase("tall_1x10000.png", encode(photo.resize((1, 10000)), "PNG"), "score"),
        HostileCase("animated.gif", gif, "score"),
        HostileCase("sixteen_bit.png", sixteen_bit_png(gray), "score"),
        HostileCase("cmyk.jpg", encode(photo.convert("CMYK"), "JPEG", quality=90), "score"),
        HostileCase("palette_transparent.png", palette_with_transparency(photo), "score"),
        HostileCase("palette_transparent.gif", encode(small.convert("P"), "GIF", transparency=3),
                    "score"),
        HostileCase("exif_rotated.jpg", exif_rotated_jpeg(photo), "score"),
        HostileCase("png_with_html_tail.png", png + b"<html><script>alert(1)</script></html>",
                    "score"),
        # empty, random and mislabelled bytes: all must be per-item errors
        HostileCase("zero_bytes.png", b"", "error"),
        HostileCase("one_byte.jpg", b"\xff", "error"),
        HostileCase("nul_bytes.png", b"\x00" * 4096, "error"),
        HostileCase("random_16.png", rng.bytes(16), "error"),
        HostileCase("random_4k.jpg", rng.bytes(4096), "error"),
        HostileCase("random_256k.gif", rng.bytes(256 * 1024), "error"),
        HostileCase("png_header_garbage.png", png[:33] + rng.bytes(2000), "error"),
        HostileCase("jpeg_header_garbage.jpg", photo_jpeg[:600] + rng.bytes(4000), "error"),
        HostileCase("gif_header_garbage.gif", b"GIF89a" + rng.bytes(500), "error"),
        HostileCase("bmp_header_garbage.bmp", b"BM" + rng.bytes(500), "error"),
        HostileCase("webp_header_garbage.webp", b"RIFF\x00\x10\x00\x00WEBPVP8 " + rng.bytes(500),
                    "error"),
        HostileCase("svg_as.png", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" '
                    b'width="100000" height="100000"><rect width="1" height="1"/></svg>', "error"),
        HostileCase("html_as.jpg", b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)>"
                    b"</body></html>", "error"),
        HostileCase("text_as.gif", "just some text, ünïcødé too\n".encode() * 50, "error"),
        HostileCase("pdf_as.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", "error"),
        HostileCase("zip_as.png", b"PK\x03\x04" + rng.bytes(200), "error"),
        # decompression bombs: refused from the header, before pixels are decoded
        HostileCase("bomb_100000x100000.png", png_bomb(100_000, 100_000), "error"),
        HostileCase("bomb_65500x65500.jpg", jpeg_bomb(photo_jpeg), "error"),
        HostileCase("bomb_65535x65535.gif", gif_bomb(), "error"),
        HostileCase("bomb_100000x100000.bmp", bmp_bomb(), "error"),
        HostileCase("bomb_100000x100000.tiff", tiff_bomb(), "error"),
        HostileCase("bad_crc.png", png[:29] + bytes([png[29] ^ 0xFF]) + png[30:], "error"),
    ]
    cases += _truncations("trunc_png", png, forgiving_tail=12)        # IEND is 12 bytes
    cases += _truncations("trunc_jpg", photo_jpeg, forgiving_tail=2)  # EOI is 2 bytes
    cases += _truncations("trunc_gif", encode(photo, "GIF"), forgiving_tail=2)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "corpus names must be unique"
    return cases


HOSTILE_IDS = ["", "", "dup", "dup", "ünïcødé-画像-😀", "x" * 10_000, "new\nline\ttab",
               "../../etc/passwd", "\x00nul", "' OR 1=1 --"]


def check_result(case_expect: str, r, class_count: int) -> None:
    """Assert an ItemResult-like `r` is consistent and meets `case_expect`."""
    if r.error:
        assert case_expect in ("error", "either"), f"{r.id!r} should have scored: {r.error}"
        assert math.isnan(r.score) and r.predicted_class == -1 and not r.is_ood, r
        assert r.predicted_label == ""
    else:
        assert case_expect in ("score", "either"), f"{r.id!r} should have been refused"
        assert math.isfinite(r.score), r
        assert 0 <= r.predicted_class < class_count and r.predicted_label, r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: the repo importable, one thread per library."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


PYTHON = sys.executable
