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
- ``folder``: an ImageFolder layout (`root/<class>/<image>`), any format Pillow decodes; listed by
  `detector_server.listing` (symlinks followed, loops cut, hidden entries left out).
"""
from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from detector_server.errors import DataError, InputError
from detector_server.listing import IMAGE_EXTENSIONS, list_files, read_file
from detector_server.preprocess import PreprocessSpec, decode_image, prepare_arrays, to_model_array

__all__ = ["ImageArrays", "register_dataset", "list_datasets", "has_test_split", "load_dataset",
           "dataset_stats",
           "calibration_split", "parse_classes", "select_classes", "fingerprint", "read_npz",
           "read_folder"]


@dataclass(frozen=True)
class ImageArrays:
    """A labelled image set at model input size."""

    images: np.ndarray         # uint8 [N, S, S, 3], RGB
    labels: np.ndarray         # int64 [N], in [0, len(class_names))
    class_names: list[str]     # index = label
    source: str                # where the pixels came from (path or package)
    files: tuple[str, ...] | None = None  # each image's file relative to the folder root
                                          # ("/"-separated; folder datasets only)


Loader = Callable[[str | None, str, int, bool], ImageArrays]  # (path, split, size, download)
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
                 download: bool = False) -> ImageArrays:
    """Load split "train" or "test" of a registered dataset at input side `size` (None = native)."""
    if name not in _DATASETS:
        raise InputError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}",
                         field="dataset")
    if split not in ("train", "test"):
        raise InputError(f"expected train or test, got {split!r}", field="split")
    size = size or _NATIVE_SIZE.get(name, 32)
    data = _DATASETS[name](path, split, size, download)
    _validate(data, path or name)
    return data


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
def digits(path: str | None, split: str, size: int, download: bool) -> ImageArrays:
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
def cifar10(path: str | None, split: str, size: int, download: bool) -> ImageArrays:
    return _cifar("cifar10", path, split, size, download)


@register_dataset(native_size=32, test_split=True)
def cifar100(path: str | None, split: str, size: int, download: bool) -> ImageArrays:
    return _cifar("cifar100", path, split, size, download)


@register_dataset()
def npz(path: str | None, split: str, size: int, download: bool) -> ImageArrays:
    if path is None:
        raise DataError("the npz dataset needs --data FILE.npz", field="data")
    return read_npz(path, size)


@register_dataset()
def folder(path: str | None, split: str, size: int, download: bool) -> ImageArrays:
    if path is None:
        raise DataError("the folder dataset needs --data ROOT (ROOT/<class>/<image files>)",
                        field="data")
    return read_folder(path, size)


def read_npz(path: str | Path, size: int) -> ImageArrays:
    """Read an npz with `images` uint8 (N,H,W[,C]) and `labels` int (N,), optional `classes`."""
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
    if not classes:
        classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"labels must be in [0, {len(classes) - 1}], found "
                        f"[{labels.min()}, {labels.max()}]", path=str(p), field="labels")
    return ImageArrays(prepare_arrays(images, _spec(size)), labels, classes, str(p))


def read_folder(root: str | Path, size: int) -> ImageArrays:
    """Read ImageFolder layout `root/<class>/**/<image>`; classes sorted by name (torchvision's
    rule). `root` is walked once by `detector_server.listing.list_files` (symlinked folders
    followed, each real folder once, so a link back up cannot feed one class another's images;
    an entry that cannot be read is skipped with a warning); its image files (by
    `IMAGE_EXTENSIONS`) below a class folder are read. An image that does not decode is a
    DataError naming it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("folder not found", path=str(root))
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError("expected one sub-folder per class (ROOT/<class>/<images>)", path=str(root))
    index = {name: i for i, name in enumerate(classes)}
    images, labels, files = [], [], []
    spec = _spec(size)
    for rel in list_files(root, suffixes=IMAGE_EXTENSIONS, hidden=False).files:
        name, sep, _ = rel.partition("/")
        if not sep or name not in index:
            continue                                    # a file beside the class folders
        f = root / rel
        try:
            images.append(to_model_array(decode_image(read_file(f)), spec))
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror}", path=str(f)) from None
        except InputError as e:
            raise DataError(e.message, path=str(f)) from None
        labels.append(index[name])
        files.append(rel)
    if not images:
        raise DataError("no image files found under the class folders", path=str(root))
    return ImageArrays(np.stack(images), np.asarray(labels, dtype=np.int64), classes, str(root),
                       tuple(files))


# ---------------------------------------------------------------------------------- helpers
def parse_classes(text: str, num_classes: int) -> list[int]:
    """Parse "0-5" / "0,2,7" / "1-3,8" into sorted class indices in [0, num_classes)."""
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise InputError(f"expected indices like '0-5' or '0,2,4', got {text!r}", field="classes")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi >= num_classes:
            raise InputError(f"range {part.strip()!r} is outside [0, {num_classes - 1}]",
                             field="classes")
        out.update(range(lo, hi + 1))
    return sorted(out)


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


def calibration_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split: returns (train_indices, calibration_indices), both sorted int64.

    Each class gives round(fraction * count) samples (at least one when fraction > 0 and the class
    has two or more), so the threshold sees every class.
    """
    rng = np.random.default_rng(seed)
    calib = []
    if fraction > 0:
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            n = int(round(fraction * len(idx)))
            n = max(n, 1) if len(idx) >= 2 else 0
            calib.append(rng.choice(idx, size=n, replace=False))
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
