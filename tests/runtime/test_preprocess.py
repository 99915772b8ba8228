"""detector_server.preprocess: decoding, mode conversion, the resize rule and its parity with the
data pack's own 32x32 textures (made with PIL Resize(32) + CenterCrop(32) from the raw JPEGs; runs
when the pack is present). Otherwise on a real colour photo patch and real grey digit scans."""
from __future__ import annotations

import io

import numpy as np
import pytest
import real_images
from PIL import Image

from detector_server.errors import InputError
from detector_server.preprocess import PreprocessSpec, decode_image, prepare_arrays, to_model_array

SPEC = PreprocessSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_img(ood_images) -> np.ndarray:
    """A real 32x32 colour image (a photo patch)."""
    return ood_images[7]


@pytest.mark.cifar_pack
def test_raw_textures_match_data_pack(shared_data):
    """Decoding the original DTD JPEGs + our resize rule gives the pack's 32x32 arrays (<= 1 level)."""
    pack = np.load(shared_data / "ood_textures.npz")
    index = {str(f): i for i, f in enumerate(pack["filenames"])}
    files = sorted((shared_data / "raw_textures").glob("*.jpg"))
    assert len(files) == 100
    exact = 0
    for f in files:
        cls = f.name.rsplit("_", 1)[0]
        expected = pack["images"][index[f"images/{cls}/{f.name}"]].astype(int)
        got = to_model_array(decode_image(f.read_bytes()), SPEC)
        assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
        # resizing only the cropped source box rounds PIL's fixed-point sums differently by <= 1
        assert np.abs(got.astype(int) - expected).max() <= 1, f.name
        exact += np.array_equal(got, expected)
    assert exact >= 80


def test_lossless_roundtrip_is_identity(photo_img):
    for fmt in ("PNG", "BMP", "TIFF", "WEBP"):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        got = to_model_array(decode_image(_encode(Image.fromarray(photo_img), fmt, **kw)), SPEC)
        np.testing.assert_array_equal(got, photo_img, err_msg=fmt)


def test_modes_become_rgb(photo_img):
    rgb = Image.fromarray(photo_img)
    cases = {
        "L": rgb.convert("L"),
        "P": rgb.convert("P"),
        "RGBA": rgb.convert("RGBA"),
        "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257),
    }
    for mode, img in cases.items():
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        out = to_model_array(decode_image(_encode(img, fmt)), SPEC)
        assert out.shape == (32, 32, 3), mode
    gray16 = decode_image(_encode(cases["I;16"], "PNG"))
    # 16-bit values v*257 map back to v, not clipped to white
    np.testing.assert_array_equal(np.asarray(gray16)[..., 0], np.asarray(rgb.convert("L")))


def test_exif_orientation_applied(photo_img):
    img = Image.fromarray(photo_img).resize((64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (32, 64)


def test_shorter_side_center_crop_and_stretch(photo_img):
    wide = Image.fromarray(photo_img).resize((96, 48), Image.BILINEAR)
    a = to_model_array(wide, SPEC)
    b = to_model_array(wide, PreprocessSpec(32, SPEC.mean, SPEC.std, resize="stretch"))
    assert a.shape == b.shape == (32, 32, 3)
    assert not np.array_equal(a, b)
    expected = np.asarray(wide.resize((64, 32), Image.BILINEAR).crop((16, 0, 48, 32)))
    np.testing.assert_array_equal(a, expected)


def test_prepare_arrays_gray_and_passthrough():
    gray = real_images.digits_gray()[0][:5]                  # [5, 8, 8, 1]
    out = prepare_arrays(gray, SPEC)
    assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all()
    same = np.zeros((2, 32, 32, 3), np.uint8)
    assert prepare_arrays(same, SPEC) is same


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n garbage", "cannot decode"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "cannot decode"),
])
def test_bad_bytes(data, match):
    with pytest.raises(InputError, match=match):
        decode_image(data)


def test_truncated_png(photo_img):
    data = _encode(Image.fromarray(photo_img), "PNG")
    with pytest.raises(InputError, match="cannot decode"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_checked_before_decoding():
    big = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(InputError, match="over the limit"):
        decode_image(big, max_pixels=1_000_000)


@pytest.mark.parametrize("kwargs, field", [
    (dict(size=0), "size"), (dict(resize="nearest"), "resize"), (dict(std=(1, 0, 1)), "std"),
    (dict(mean=(1, 2)), "mean"),
])
def test_spec_validation(kwargs, field):
    base = dict(size=32, mean=(0.5,) * 3, std=(0.2,) * 3)
    with pytest.raises(InputError, match=field):
        PreprocessSpec(**{**base, **kwargs})


def test_spec_roundtrip():
    assert PreprocessSpec.from_dict(SPEC.to_dict()) == SPEC
    with pytest.raises(InputError, match="missing key"):
        PreprocessSpec.from_dict({"size": 32})


def test_prepare_arrays_rejects_bad_input():
    with pytest.raises(InputError, match="uint8"):
        prepare_arrays(np.zeros((1, 32, 32, 3), np.float32), SPEC)
    with pytest.raises(InputError, match="shape"):
        prepare_arrays(np.zeros((1, 32, 32, 4), np.uint8), SPEC)
