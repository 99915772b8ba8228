"""In-distribution datasets as uint8 arrays, a registry of loaders, and the calibration split.

Use this module to turn a dataset name and path into `ImageArrays` (uint8 RGB NHWC images at the
model input size, int64 labels, class names). Every image goes through
`detector_server.preprocess` so training-time evaluation and the runtime see the same pixels.

Registered datasets (`list_datasets()`):
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real scans), upsampled to 32x32
  RGB. Ships inside scikit-learn, so it works offline: the default. Split 80/20 by a fixed seed.
- ``cifar10`` / ``cifar100``: torchvision datasets under a local root folder; downloaded only with
  `download=True`, otherwise a missing folder is a DataError naming it.
- ``npz``: a numpy file with `images` uint8 (N,H,W[,C]), `labels` int (N,), optional `classes`.
  Without `classes` the labels must be 0..C-1 with every class present and C <= `max_classes`.
- ``folder``: an ImageFolder layout (`root/<class>/<image>`), any format Pillow decodes; listed by
  `detector_server.listing` (symlinks followed, loops cut, hidden entries left out); class index =
  position of the sub-folder's name in sorted order (torchvision's ImageFolder rule).

Input size when none is given (`choose_image_size`): the native size of the dataset (digits and
CIFAR 32; an npz its arrays' shorter side); for a folder the shorter side of its smallest image, at
most 224 (ImageNet's); never below 32 (the networks need 28). Logged with the reason.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import zipfile
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from detector_server.errors import DataError, InputError
from detector_server.listing import IMAGE_EXTENSIONS, list_files, read_file
from detector_server.preprocess import PreprocessSpec, decode_image, prepare_arrays, to_model_array

from .progress import Progress

__all__ = ["ImageArrays", "register_dataset", "list_datasets", "has_test_split", "load_dataset",
           "dataset_stats", "choose_image_size", "MIN_IMAGE_SIZE", "PHOTO_SIZE", "IMAGENET_STATS",
           "calibration_split", "parse_classes", "select_classes", "fingerprint", "read_npz",
           "read_folder", "MAX_CLASSES", "describe_classes"]

log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 32     # smallest default input side (the networks need 28 px)
PHOTO_SIZE = 224        # largest default side for a folder of photos (ImageNet's input size)
MAX_CLASSES = 1000      # default bound on the labels of an npz without class names
# mean/std of ImageNet in [0, 1] units, RGB: what torchvision's pretrained weights expect
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ImageArrays:
    """A labelled image set at model input size."""

    images: np.ndarray         # uint8 [N, S, S, 3], RGB
    labels: np.ndarray         # int64 [N], in [0, len(class_names))
    class_names: list[str]     # index = label
    source: str                # where the pixels came from (path or package)
    files: tuple[str, ...] | None = None  # each image's file relative to the folder root
                                          # ("/"-separated; folder datasets only)


# (path, split, size or None = choose_image_size's rule, download, max_classes)
Loader = Callable[[str | None, str, int | None, bool, int], ImageArrays]
_DATASETS: dict[str, Loader] = {}
_NATIVE_SIZE: dict[str, int] = {}
_WITH_TEST_SPLIT: set[str] = set()


def register_dataset(native_size: int | None = None,
                     test_split: bool = False) -> Callable[[Loader], Loader]:
    """Register a loader under its function name; `native_size` is its default input side and
    `test_split` says whether it has a distinct "test" split (else "test" returns the same data)."""
    def wrap(fn: Loader) -> Loader:
        _DATASETS[fn.__name__] = fn
        if native_size is not None:
            _NATIVE_SIZE[fn.__name__] = native_size
        if test_split:
            _WITH_TEST_SPLIT.add(fn.__name__)
        return fn
    return wrap


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def has_test_split(name: str) -> bool:
    """True when dataset `name` has its own test split (digits, cifar10, cifar100)."""
    return name in _WITH_TEST_SPLIT


def load_dataset(name: str, path: str | None, split: str = "train", size: int | None = None,
                 download: bool = False, max_classes: int = MAX_CLASSES) -> ImageArrays:
    """Load split "train" or "test" of a registered dataset at input side `size` (None: the rule
    of `choose_image_size`, logged). `max_classes` bounds the labels of an npz without names."""
    if name not in _DATASETS:
        raise InputError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}",
                         field="dataset")
    if split not in ("train", "test"):
        raise InputError(f"expected train or test, got {split!r}", field="split")
    if size is None and name in _NATIVE_SIZE:
        size = choose_image_size([_NATIVE_SIZE[name]], f"the native size of {name}")
    data = _DATASETS[name](path, split, size, download, max_classes)
    _validate(data, path or name)
    return data


def choose_image_size(shorter_sides: list[int] | np.ndarray, why: str, cap: int | None = None) -> int:
    """The input side used when none is given: the smallest of `shorter_sides` (image shorter
    sides in pixels), at most `cap` when given, at least MIN_IMAGE_SIZE. Logs the choice and
    `why` (where the sides came from)."""
    side = int(min(shorter_sides))
    size = max(MIN_IMAGE_SIZE, min(side, cap) if cap else side)
    note = ""
    if size > side:
        note = f"; upsampled from {side} px, the networks need at least {MIN_IMAGE_SIZE}"
    elif cap and side > cap:
        note = f" ({side} px) capped at {cap}"
    log.info("image size %d: %s%s (--image-size sets another)", size, why, note)
    return size


def _validate(d: ImageArrays, where: str) -> None:
    if len(d.images) == 0:
        raise DataError("no images found", path=where)
    if d.labels.shape != (len(d.images),):
        raise DataError(f"labels have shape {d.labels.shape}, expected ({len(d.images)},)",
                        path=where, field="labels")
    if d.labels.min() < 0 or d.labels.max() >= len(d.class_names):
        raise DataError(f"labels must be in [0, {len(d.class_names) - 1}], found "
                        f"[{d.labels.min()}, {d.labels.max()}]", path=where, field="labels")


def _spec(size: int) -> PreprocessSpec:
    # mean/std are filled later from the training data; resizing needs only the size.
    return PreprocessSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------- loaders
@register_dataset(native_size=32, test_split=True)
def digits(path: str | None, split: str, size: int, download: bool,
           max_classes: int) -> ImageArrays:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - sklearn is in the [train] extra
        raise DataError("the offline default needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    gray = np.clip(d.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)   # [1797, 8, 8]
    rng = np.random.default_rng(1797)
    test = np.zeros(len(gray), dtype=bool)
    for c in range(10):  # stratified 80/20 split, fixed for every user
        idx = np.flatnonzero(d.target == c)
        test[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    keep = test if split == "test" else ~test
    # 8 -> 32 px: PIL bilinear upsampling through the shared resize rule.
    images = prepare_arrays(gray[keep], _spec(size))
    return ImageArrays(images, d.target[keep].astype(np.int64), [str(c) for c in range(10)],
                       "scikit-learn load_digits (bundled UCI handwritten digits)")


def _cifar(cls_name: str, path: str | None, split: str, size: int, download: bool) -> ImageArrays:
    import torchvision

    if path is None:
        raise DataError(f"{cls_name} needs --data ROOT: the folder that holds (or will hold, with "
                        "--download) the torchvision files", field="data")
    cls = getattr(torchvision.datasets, cls_name.upper())
    try:
        ds = cls(root=path, train=(split == "train"), download=download)
    except RuntimeError as e:
        hint = f"{cls.base_folder} not found in {path}" if "not found" in str(e).lower() else str(e)
        raise DataError(f"{hint}. Put the extracted python version of {cls_name} there "
                        f"({cls.filename} from the CIFAR page) or pass --download on a machine with "
                        "internet access", path=path) from None
    except OSError as e:  # network failure during an explicit download
        raise DataError(f"download failed ({e}); fetch {cls.url} by hand and extract it here",
                        path=path) from None
    images = prepare_arrays(np.asarray(ds.data, dtype=np.uint8), _spec(size))
    return ImageArrays(images, np.asarray(ds.targets, dtype=np.int64), list(ds.classes), str(path))


@register_dataset(native_size=32, test_split=True)
def cifar10(path: str | None, split: str, size: int, download: bool,
            max_classes: int) -> ImageArrays:
    return _cifar("cifar10", path, split, size, download)


@register_dataset(native_size=32, test_split=True)
def cifar100(path: str | None, split: str, size: int, download: bool,
             max_classes: int) -> ImageArrays:
    return _cifar("cifar100", path, split, size, download)


@register_dataset()
def npz(path: str | None, split: str, size: int | None, download: bool,
        max_classes: int) -> ImageArrays:
    if path is None:
        raise DataError("the npz dataset needs --data FILE.npz", field="data")
    return read_npz(path, size, max_classes)


@register_dataset()
def folder(path: str | None, split: str, size: int | None, download: bool,
           max_classes: int) -> ImageArrays:
    if path is None:
        raise DataError("the folder dataset needs --data ROOT (ROOT/<class>/<image files>)",
                        field="data")
    return read_folder(path, size)


def read_npz(path: str | Path, size: int | None, max_classes: int = MAX_CLASSES) -> ImageArrays:
    """Read an npz with `images` uint8 (N,H,W[,C]) and `labels` int (N,), optional `classes`.

    size None: the arrays' shorter side (at least MIN_IMAGE_SIZE). With `classes`, labels must be
    in [0, len(classes)); without, they must be 0..C-1, every class present, C <= max_classes
    (a stray label must not silently add classes). DataError naming the file and key otherwise.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", path=str(p))
    try:
        f = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # BadZipFile: truncated download
        raise DataError(f"not a readable .npz file ({e})", path=str(p)) from None
    if not isinstance(f, np.lib.npyio.NpzFile):  # a plain .npy array
        raise DataError("expected an .npz archive with keys images and labels", path=str(p))
    with f:
        for key in ("images", "labels"):
            if key not in f.files:
                raise DataError(f"missing key; found {f.files}", path=str(p), field=key)
        arrays = {}
        for key in ("images", "labels", "classes"):
            try:  # members are read lazily: corrupt members and object arrays fail here
                arrays[key] = f[key] if key in f.files else np.zeros(0, dtype=str)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"cannot read ({e})", path=str(p), field=key) from None
    images, labels = arrays["images"], arrays["labels"]
    classes = [str(c) for c in arrays["classes"]]
    if images.dtype != np.uint8:
        raise DataError(f"expected dtype uint8, got {images.dtype}", path=str(p), field="images")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"expected shape (N,H,W), (N,H,W,1) or (N,H,W,3), got {images.shape}",
                        path=str(p), field="images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"expected integer labels, got {labels.dtype}", path=str(p), field="labels")
    if labels.shape != (len(images),):
        raise DataError(f"expected shape ({len(images)},) (one per image), got {labels.shape}",
                        path=str(p), field="labels")
    labels = labels.astype(np.int64)
    if not classes and len(labels):
        classes = _unnamed_classes(labels, max_classes, str(p))
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"labels must be in [0, {len(classes) - 1}], found "
                        f"[{labels.min()}, {labels.max()}]", path=str(p), field="labels")
    if size is None:
        size = choose_image_size([min(images.shape[1:3])], f"the native size of {p.name}")
    return ImageArrays(prepare_arrays(images, _spec(size)), labels, classes, str(p))


def _unnamed_classes(labels: np.ndarray, max_classes: int, where: str) -> list[str]:
    """Class names "0".."C-1" for labels without names, after checking that the labels are a
    plausible class range: none negative, C = max + 1 <= max_classes, every class present."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise DataError(f"labels must be in [0, C), found [{lo}, {hi}]", path=where, field="labels")
    if hi >= max_classes:
        raise DataError(f"label {hi} would make {hi + 1:,} classes (no 'classes' array names "
                        f"them), over the limit of {max_classes}: add a 'classes' array with one "
                        "name per class, or pass --max-classes if the data has that many",
                        path=where, field="labels")
    found = np.unique(labels)
    if len(found) < hi + 1:
        raise DataError(f"labels found: {_ranges(found)}; {hi + 1 - len(found)} of the classes "
                        f"0-{hi} have no image (a stray label?): relabel them 0-{len(found) - 1}, "
                        "or add a 'classes' array naming every class", path=where, field="labels")
    log.info("%s: no 'classes' array; %d classes found (labels 0-%d), named by number",
             where, hi + 1, hi)
    return [str(c) for c in range(hi + 1)]


def _ranges(values: np.ndarray) -> str:
    """Sorted distinct ints as runs: [0, 1, 2, 9] -> "0-2, 9"."""
    vals = [int(v) for v in values]
    runs = [[v for _, v in g] for _, g in groupby(enumerate(vals), key=lambda iv: iv[1] - iv[0])]
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def read_folder(root: str | Path, size: int | None) -> ImageArrays:
    """Read ImageFolder layout `root/<class>/**/<image>`; class index = position of the folder
    name in sorted order (torchvision's rule). `root` is walked once by
    `detector_server.listing.list_files` (symlinked folders followed, each real folder once, so a
    link back up cannot feed one class another's images; an entry that cannot be read is skipped
    with a warning); its image files (by `IMAGE_EXTENSIONS`) below a class folder are read. An
    image that does not decode is a DataError naming it. size None: the shorter side of the
    smallest image, at most PHOTO_SIZE (read from the file headers first)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("folder not found", path=str(root))
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError("expected one sub-folder per class (ROOT/<class>/<images>)", path=str(root))
    index = {name: i for i, name in enumerate(classes)}
    listed = [(index[name], rel) for rel in list_files(root, suffixes=IMAGE_EXTENSIONS,
                                                       hidden=False).files
              for name, sep, _ in [rel.partition("/")] if sep and name in index]
    if not listed:   # (files beside the class folders are no class's)
        raise DataError("no image files found under the class folders", path=str(root))
    if size is None:
        size = choose_image_size([_shorter_side(root / rel) for _, rel in listed],
                                 f"the shorter side of the smallest of the {len(listed)} images "
                                 f"in {root}", cap=PHOTO_SIZE)
    images, spec = [], _spec(size)
    for _, rel in Progress(listed, desc=f"reading {root}", unit="images", logger=log):
        f = root / rel
        try:
            images.append(to_model_array(decode_image(read_file(f)), spec))
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror}", path=str(f)) from None
        except InputError as e:
            raise DataError(e.message, path=str(f)) from None
    labels = np.asarray([label for label, _ in listed], dtype=np.int64)
    return ImageArrays(np.stack(images), labels, classes, str(root),
                       tuple(rel for _, rel in listed))


def _shorter_side(f: Path) -> int:
    """An image file's shorter side from its header (no pixels decoded); DataError if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(read_file(f))) as img:
            return min(img.size)
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=str(f)) from None
    except Exception as e:  # PIL raises many types for files it cannot identify
        raise DataError(f"cannot read the image header: {type(e).__name__}", path=str(f)) from None


# ---------------------------------------------------------------------------------- helpers
def parse_classes(text: str, classes: int | Sequence[str]) -> list[int]:
    """Parse a class selection into sorted class indices in [0, C).

    text: comma-separated items, each a class name (exactly as in `classes`: folder names, an
    npz's `classes` array) or an index or index range ("0-5", "2"); a name wins over an index
    that reads the same. classes: the dataset's class names, or just their number C (indices
    only). InputError naming `classes` for an item that is neither.
    """
    names = [str(c) for c in range(classes)] if isinstance(classes, int) else list(classes)
    by_name = {n: i for i, n in enumerate(names)}
    out: set[int] = set()
    for part in text.split(","):
        item = part.strip()
        if item in by_name and not isinstance(classes, int):
            out.add(by_name[item])
            continue
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", item)
        if not m:
            known = f"; classes: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}" \
                if not isinstance(classes, int) else ""
            raise InputError(f"{item!r} is no class name, index or range like '0-5' (in "
                             f"{text!r}){known}", field="classes")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi >= len(names):
            raise InputError(f"range {item!r} is outside [0, {len(names) - 1}]", field="classes")
        out.update(range(lo, hi + 1))
    return sorted(out)


def describe_classes(names: Sequence[str]) -> str:
    """"0 cat, 1 dog, ..." (index and name; the first 30)."""
    shown = ", ".join(f"{i} {n}" for i, n in enumerate(names[:30]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > 30 else "")


def select_classes(d: ImageArrays, keep: list[int]) -> ImageArrays:
    """Keep only classes `keep`, relabelled 0..len(keep)-1 in that order."""
    remap = np.full(len(d.class_names), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    mask = remap[d.labels] >= 0
    files = None if d.files is None else tuple(f for f, m in zip(d.files, mask) if m)
    return ImageArrays(d.images[mask], remap[d.labels[mask]], [d.class_names[c] for c in keep],
                       d.source, files)


def dataset_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of uint8 images [N, S, S, 3] (in chunks)."""
    s = np.zeros(3)
    ss = np.zeros(3)
    for i in range(0, len(images), 4096):
        x = images[i:i + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        s += x.sum(0)
        ss += (x * x).sum(0)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std)


def calibration_split(labels: np.ndarray, fraction: float, seed: int,
                      minimum: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split: returns (train_indices, calibration_indices), both sorted int64.

    Each class gives round(fraction * count) samples (at least one when fraction > 0 and the class
    has two or more), so the threshold sees every class. When that totals fewer than `minimum`
    (and fraction > 0), classes give one more in turn, the least represented first, until the
    minimum is reached or every class has given half of its samples (half always stays to train).
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    counts = [int(np.sum(labels == c)) for c in classes]
    take = [0] * len(classes)
    if fraction > 0:
        take = [max(int(round(fraction * n)), 1) if n >= 2 else 0 for n in counts]
        while sum(take) < minimum:
            room = [i for i, n in enumerate(counts) if take[i] < n // 2]
            if not room:
                break
            i = min(room, key=lambda i: ((take[i] + 1) / counts[i], i))
            take[i] += 1
    calib = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False)
             for c, n in zip(classes, take) if fraction > 0]
    cal = np.sort(np.concatenate(calib)).astype(np.int64) if calib else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), cal).astype(np.int64)
    return train, cal


def fingerprint(d: ImageArrays) -> str:
    """SHA-256 over the images and labels: the same data gives the same fingerprint."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(d.images).tobytes())
    h.update(np.ascontiguousarray(d.labels).tobytes())
    h.update("\n".join(d.class_names).encode())
    return h.hexdigest()
