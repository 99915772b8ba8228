"""The one definition of image preprocessing, shared by training-time evaluation and the runtime.

Use this module whenever images (encoded bytes, PIL images, or uint8 arrays of any size) must become
model input. The model input is always uint8 RGB, NHWC, `spec.size x spec.size`; casting, scaling
and mean/std normalisation happen inside the model (the ONNX graph and `trainer`'s deploy wrapper
read `spec.mean`/`spec.std`), so this module never produces floats.

Resize rules (`PreprocessSpec.resize`):
- ``"shorter_center_crop"``: scale the shorter side to `size` (PIL bilinear, antialiased), then
  centre-crop `size x size` (like torchvision's Resize(size) + CenterCrop(size), with the long
  side rounded half up and the crop offset floored). The default.
- ``"stretch"``: resize both sides to `size` directly (aspect ratio not kept).
Images already `size x size` pass through untouched under both rules.
"""
from __future__ import annotations

import io
import re
import unicodedata
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .image_guard import check_image_work
from .validate import check_int

__all__ = ["PreprocessSpec", "RESIZE_RULES", "decode_image", "to_model_array", "prepare_arrays",
           "DEFAULT_MAX_PIXELS", "ACCEPTED_FORMATS", "MAX_ERROR_CHARS", "safe_message"]

RESIZE_RULES = ("shorter_center_crop", "stretch")
DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard: larger images are refused
# The only formats decoded (Pillow names). Each is parsed by Pillow itself or a C library it links;
# none is handed to an external program (Pillow runs Ghostscript for EPS when `gs` is installed).
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
MAX_ERROR_CHARS = 200            # longest per-image error message (it is echoed to clients)


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes model input; stored verbatim in the bundle manifest and run config."""

    size: int                               # square input side in pixels (32 for CIFAR)
    mean: tuple[float, float, float]        # per-channel mean in [0, 1] units, RGB order
    std: tuple[float, float, float]         # per-channel std in [0, 1] units, RGB order
    resize: str = "shorter_center_crop"     # one of RESIZE_RULES
    channel_order: str = "RGB"              # the model input's channel order (always RGB)
    layout: str = "NHWC"                    # the model input's layout (always NHWC uint8)

    def __post_init__(self) -> None:
        check_int(self.size, "size", minimum=1)
        if self.resize not in RESIZE_RULES:
            raise InputError(f"expected one of {RESIZE_RULES}, got {self.resize!r}", field="resize")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) != 3:
                raise InputError(f"expected 3 values, got {v!r}", field=name)
            object.__setattr__(self, name, tuple(float(x) for x in v))
        if min(self.std) <= 0:
            raise InputError(f"expected positive values, got {self.std!r}", field="std")
        if self.channel_order != "RGB" or self.layout != "NHWC":
            raise InputError("only RGB channel order and NHWC layout are supported", field="layout")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        try:
            return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                       resize=d.get("resize", "shorter_center_crop"),
                       channel_order=d.get("channel_order", "RGB"), layout=d.get("layout", "NHWC"))
        except KeyError as e:
            raise InputError(f"missing key {e.args[0]!r}", field="preprocess") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an encoded image file to an RGB PIL image.

    Only `ACCEPTED_FORMATS` are decoded (never a format Pillow hands to an external program,
    such as EPS to Ghostscript). Before Pillow parses anything, `image_guard.check_image_work`
    refuses files whose headers would cost more than their size justifies, and the declared size
    is checked against `max_pixels` before any pixel is decoded.
    The EXIF (or XMP) orientation is applied; grayscale, palette (with transparency), RGBA/LA,
    16-bit and CMYK become RGB (transparent pixels over black, as PIL's convert does). Animated
    images use frame 0. Raises InputError for empty, undecodable, truncated or oversized input;
    its message is at most MAX_ERROR_CHARS long and names no path of this machine.
    """
    if not data:
        raise InputError("empty image data", field="data")
    check_image_work(data)
    try:
        with warnings.catch_warnings():
            # Pillow warns once per odd tag or chunk: thousands of lines for a crafted file.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
                                 field="data")
            img.load()
            return _to_rgb(_apply_orientation(img))
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(safe_message(f"image too large: {e}"), field="data") from None
    except UnidentifiedImageError:  # PIL's message names a memory address: keep ours stable
        raise InputError(f"cannot decode image: not one of the accepted formats "
                         f"({', '.join(ACCEPTED_FORMATS)})", field="data") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise InputError(safe_message(f"cannot decode image: {type(e).__name__}: {e}"),
                         field="data") from None


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _apply_orientation(img: Image.Image) -> Image.Image:
    """The pixels of `img` turned upright by its EXIF (or XMP) orientation tag.

    Not ImageOps.exif_transpose: that one also rewrites the EXIF block, decoding every tag, which
    for a 10 MB EXIF chunk of one long tag costs seconds and hundreds of MB. Only the orientation
    tag is decoded here; the metadata of the returned image is not needed.
    """
    method = _ORIENTATION.get(img.getexif().get(0x0112))
    return img if method is None else img.transpose(method)


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;()\[\]]+){2,}[\\/]?")


def safe_message(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` fit to show a client: anything shaped like a file path (two or more components)
    replaced by "<path>", control characters by spaces, other non-ASCII characters escaped, cut
    to `limit` characters (so at most `limit` bytes in UTF-8)."""
    text = _PATH.sub("<path>", text)
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits by the type's range instead of clipping at 255.
        # Integer rescaling in row blocks: a float64 copy of a 40-Mpx image would cost ~1 GB.
        a = np.asarray(img)
        scale = 65535 if img.mode.startswith("I;16") or a.max() > 255 else 255
        out = np.empty(a.shape, np.uint8)
        for r in range(0, a.shape[0], 512):
            blk = np.clip(a[r:r + 512].astype(np.int64), 0, scale)
            out[r:r + 512] = (blk * 255 + scale // 2) // scale
        img = Image.fromarray(out, mode="L")
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def to_model_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Apply the resize rule to one RGB PIL image. Returns uint8 `(size, size, 3)`."""
    img = _to_rgb(img)
    s = spec.size
    w, h = img.size
    if (w, h) != (s, s):
        if spec.resize == "stretch":
            img = img.resize((s, s), Image.BILINEAR)
        else:
            # Long side rounded half up, crop offset floored: PIL's usual convention (torchvision
            # truncates the long side and rounds the offset; the two differ by at most a pixel).
            if w <= h:
                nw, nh = s, max(s, int(s * h / w + 0.5))
            else:
                nw, nh = max(s, int(s * w / h + 0.5)), s
            left, top = (nw - s) // 2, (nh - s) // 2
            # Resize only the source region that lands in the crop (PIL's `box`): the same pixels as
            # resize-then-crop, without a (long side x size) intermediate for extreme aspect ratios.
            sx, sy = w / nw, h / nh
            img = img.resize((s, s), Image.BILINEAR,
                             box=(left * sx, top * sy, (left + s) * sx, (top + s) * sy))
    return np.asarray(img, dtype=np.uint8).reshape(s, s, 3)


def prepare_arrays(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Bring a uint8 array of images `(N, H, W)`, `(N, H, W, 1)` or `(N, H, W, 3)` to model input.

    Returns uint8 `(N, size, size, 3)`. Arrays already at the input size and RGB are returned
    without copying; others go image by image through `to_model_array` (the runtime's path).
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InputError(f"expected a uint8 numpy array, got {getattr(images, 'dtype', type(images))}",
                         field="images")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise InputError(f"expected shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}",
                         field="images")
    n, h, w, c = images.shape
    if (h, w, c) == (spec.size, spec.size, 3):
        return images
    out = np.empty((n, spec.size, spec.size, 3), dtype=np.uint8)
    for i in range(n):
        a = images[i]
        img = Image.fromarray(a[..., 0], mode="L") if c == 1 else Image.fromarray(a, mode="RGB")
        out[i] = to_model_array(img, spec)
    return out
