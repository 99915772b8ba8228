"""Decoding cost and what decoding may run: the work budget of image headers (image_guard), the
format allow-list (no external programs), the EXIF orientation without a full EXIF decode, and
error messages that are safe to echo.

The server-level consequence (health answers while a crafted image is being decoded) is in
test_server_limits.py.
"""
from __future__ import annotations

import io
import os
import stat
import time
import tracemalloc

import numpy as np
import pytest
from hostile_corpus import WORK_BOMBS, encode, png_with_long_exif, raw_jpeg_files, rle_bmp, tiff_many_strips
from PIL import EpsImagePlugin, Image, ImageOps

from detector_server.errors import InputError
from detector_server.image_guard import check_image_work, work_budget
from detector_server.preprocess import (
    ACCEPTED_FORMATS,
    MAX_ERROR_CHARS,
    PreprocessSpec,
    decode_image,
    safe_message,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(io.BytesIO(raw_jpeg_files(1)[0])).convert("RGB")


@pytest.mark.parametrize("name", list(WORK_BOMBS))
def test_crafted_headers_are_refused_before_pillow_parses_them(name):
    """Each file is a valid image whose header makes Pillow loop per structure (up to 1.7 s for
    these 1 MB files on an idle core; 28 s for the 46 MB JPEG of the report)."""
    data = WORK_BOMBS[name]()
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="work limit|RLE-compressed|scans"):
        decode_image(data)
    assert time.perf_counter() - t0 < 0.5


def test_real_images_of_every_accepted_format_pass(photo):
    big = photo.resize((3000, 2000))
    files = [encode(photo, "PNG"), encode(photo, "JPEG", progressive=True, quality=90),
             encode(photo, "GIF"), encode(photo, "WEBP"), encode(photo, "BMP"),
             encode(photo, "TIFF", compression="tiff_lzw"), encode(big, "TIFF"),
             encode(big.convert("L"), "PNG"), rle_bmp(512, 512), tiff_many_strips(2000, 640)]
    files += raw_jpeg_files(100)
    for data in files:
        check_image_work(data)
        assert decode_image(data).mode == "RGB"


def test_the_budget_grows_with_the_file():
    assert work_budget(0) == 1024 and work_budget(4096 * 1000) == 2024
    for data in (b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n\x00", b"GIF89a", b"II*\x00", b"BM"):
        check_image_work(data)         # cut short: Pillow reports the truncation


# ---------------------------------------------------------------------------------------------
# Formats: an explicit allow-list, nothing handed to an external program
# ---------------------------------------------------------------------------------------------
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
       b"newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill\nshowpage\n%%EOF\n")


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that records its command line and fails (as a real one would on a
    hostile file); returns the file it writes to."""
    calls = tmp_path / "gs_calls"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    gs.chmod(gs.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)   # Pillow caches where gs is
    return calls


def test_postscript_never_reaches_ghostscript(fake_ghostscript):
    with pytest.raises(InputError) as e:
        decode_image(EPS)
    assert "accepted formats" in str(e.value) and "PNG, JPEG" in str(e.value)
    assert not fake_ghostscript.exists(), "Pillow ran gs on client bytes"


def test_rwood_score_refuses_postscript_too(fake_ghostscript):
    from detector_server.score_decode import decode_blobs

    spec = PreprocessSpec(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    arrays, status = decode_blobs([EPS, encode(Image.new("RGB", (40, 30)), "PNG")],
                                  ["figure.eps", "ok.png"], spec)
    assert len(arrays) == 1 and status[1] == ""
    assert "accepted formats" in status[0] and not fake_ghostscript.exists()


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "SGI"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    data = encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
    with pytest.raises(InputError, match="accepted formats"):
        decode_image(data)
    assert fmt not in ACCEPTED_FORMATS


def test_error_messages_are_safe_to_echo():
    text = ("cannot decode image: CalledProcessError: Command '['gs', '-q', "
            "'-sOutputFile=/tmp/tmpab12/out.ppm', '-f', '/var/lib/x y/in.eps']' returned 1\n\x00"
            "ünï" + "x" * 500)
    safe = safe_message(text)
    assert "/tmp" not in safe and "/var/lib" not in safe and "<path>" in safe
    assert "\n" not in safe and "\x00" not in safe and safe.isascii()
    assert len(safe) == MAX_ERROR_CHARS and safe.endswith("...")
    assert safe_message("image is 3x4 = 12 pixels") == "image is 3x4 = 12 pixels"


# ---------------------------------------------------------------------------------------------
# EXIF orientation: the same pixels as ImageOps.exif_transpose, without decoding every tag
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_exif_transpose(photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo.resize((48, 32)), "JPEG", quality=95, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(data)), expected)


def test_a_long_exif_tag_is_not_decoded():
    """exif_transpose decodes every tag to rewrite the EXIF block: for this 4 MB PNG, 2 million
    Python ints (over 70 MB, about a second); only the orientation tag is needed."""
    data = png_with_long_exif(2_000_000)
    tracemalloc.start()
    try:
        img = decode_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert img.size == (32, 32)            # turned by orientation 6, still square
    assert peak < 32 * 2**20, f"decoding took {peak / 2**20:.0f} MB"
