"""Labelled image sets an operator brings to a bundle: an image folder or an npz, at model input.

Use `read_image_set(path, prepare)` where images must enter a bundle exactly as the runtime sees
them (`rwood-bank add` DATA and `--calibration`): every image goes through `prepare`, the bundle's
own `Detector.prepare` (decode, EXIF, RGB, resize by the bundle's rule), never a second copy of
the preprocessing. Layouts:
- a folder `ROOT/<class>/<images>` (any depth below the class folder): the class is the first
  path component; a flat folder of images when every image gets one `label`;
- an `.npz` with `images` uint8 [N, H, W(, C)], `labels` int [N] and `classes` str [C]
  (`labels` and `classes` are optional when `label` is given or no labels are needed).
Each image keeps where it came from: its relative path ("/"-separated) in a folder, its row in
an npz. Folders are listed and read as every command does (`listing`: symlinks followed, hidden
entries left out). Errors are `DataError`s naming the file (and the key). Numpy and Pillow only.
Test: tests/runtime/test_bank_edit.py.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DataError, InputError
from .listing import IMAGE_EXTENSIONS, list_files, read_file

__all__ = ["ImageSet", "read_image_set"]

Prepare = Callable[[Any], np.ndarray]   # one item (bytes or uint8 array) -> uint8 [S, S, 3]


@dataclass(frozen=True)
class ImageSet:
    """Images at model input with their class names and where each came from."""

    images: np.ndarray          # uint8 [N, S, S, 3]
    labels: tuple[str, ...]     # class name per image; "" where the set carries none
    index: np.ndarray           # int64 [N], the row in the npz or the position in the folder
    paths: tuple[str, ...]      # file relative to the folder, "/"-separated; "" for npz rows
    source: str                 # "folder:/abs/path" or "npz:/abs/path"

    def __len__(self) -> int:
        return int(self.images.shape[0])


def read_image_set(path: str | os.PathLike, prepare: Prepare, *, label: str | None = None,
                   need_labels: bool = True) -> ImageSet:
    """Read the folder or npz at `path` (see the module docstring) through `prepare`.

    label: the class of every image (a flat folder, or an npz without labels);
    need_labels: False to read images whose classes do not matter (calibration): a folder is
    then searched recursively whatever its layout.
    DataError naming the path for a missing, empty or malformed set, or an image that cannot be
    decoded; InputError (field `label`) for an empty label.
    """
    p = Path(path)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise InputError(f"expected a class name, got {label!r}", field="label")
    if p.is_dir():
        out = _from_folder(p, prepare, label, need_labels)
    elif p.is_file() and p.suffix.lower() == ".npz":
        out = _from_npz(p, prepare, label, need_labels)
    else:
        raise DataError("expected an image folder or an .npz file", path=p)
    if not len(out):
        raise DataError("holds no images", path=p)
    return out


def _from_folder(root: Path, prepare: Prepare, label: str | None, need_labels: bool) -> ImageSet:
    listing = list_files(root, suffixes=IMAGE_EXTENSIONS, hidden=False)
    if listing.broken:                  # a bank edit takes every image it was given, or none
        rel, why = listing.broken[0]
        raise DataError(f"cannot read: {why}", path=root / rel)
    files = listing.files
    labels: list[str] = []
    for f in files:
        if label is not None or not need_labels:
            labels.append(label or "")
        elif "/" not in f:
            raise DataError("an image at the top level: expected ROOT/<class>/<images>, or pass "
                            "--label NAME for a folder of one class", path=root / f)
        else:
            labels.append(f.split("/", 1)[0])
    images = []
    for f in files:
        try:
            images.append(prepare(read_file(root / f)))
        except InputError as e:
            raise DataError(f"cannot use this image: {e.message}", path=root / f) from None
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror}", path=root / f) from None
    return ImageSet(_stack(images), tuple(labels), np.arange(len(files), dtype=np.int64),
                    tuple(files), f"folder:{root.resolve()}")


def _from_npz(path: Path, prepare: Prepare, label: str | None, need_labels: bool) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("images", "labels", "classes") if k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read: {e}", path=path) from None
    if "images" not in arrays:
        raise DataError("missing array", path=path, field="images")
    images = arrays["images"]
    if label is not None or not need_labels:
        names = (label or "",) * len(images)
    else:
        names = _npz_labels(path, arrays, len(images))
    prepared = []
    for i, a in enumerate(images):
        try:
            prepared.append(prepare(a))
        except InputError as e:
            raise DataError(f"row {i}: {e}", path=path, field="images") from None
    return ImageSet(_stack(prepared), names, np.arange(len(images), dtype=np.int64),
                    ("",) * len(images), f"npz:{path.resolve()}")


def _npz_labels(path: Path, arrays: dict[str, np.ndarray], n: int) -> tuple[str, ...]:
    """Class names per row from `labels` (int) and `classes` (str)."""
    if "labels" not in arrays or "classes" not in arrays:
        raise DataError("expected arrays labels and classes (or pass --label NAME)", path=path,
                        field="labels" if "labels" not in arrays else "classes")
    labels, classes = arrays["labels"], [str(c) for c in arrays["classes"]]
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise DataError(f"expected integer labels [{n}], got {labels.dtype} {labels.shape}",
                        path=path, field="labels")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"labels outside [0, {len(classes)}) (the classes array)", path=path,
                        field="labels")
    return tuple(classes[int(c)] for c in labels)


def _stack(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images) if images else np.empty((0, 1, 1, 3), np.uint8)
