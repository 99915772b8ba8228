"""Evaluation image sets given as `name=path`: npz files, image folders, torchvision roots.

Use `parse_set_arg("svhn=/data/svhn")` for a CLI argument and `load_image_set(name, path, spec)` to
get the images at the run's model input (uint8 [N, S, S, 3]). Every image goes through
`detector_server.preprocess` (`prepare_arrays` / `decode_image` + `to_model_array`) with the run's
PreprocessSpec, so grayscale becomes RGB and other sizes are resized by the rule recorded in the
run, exactly as the runtime would.

How `path` is read:
- a file ending `.npz`: keys `images` uint8 (N,H,W[,C]) and optional `labels` int (N,) (the
  trainer's npz format; `../shared/data/ood_*.npz` are in it);
- a folder, when `name` is a torchvision set below and the folder holds that set's files: the
  torchvision dataset (never downloaded): svhn (split test), mnist (test), dtd / textures (split
  test, partition 1), places365 (val, 256-px "small" images), cifar10 / cifar100 (test);
- any other folder: every file under it that Pillow decodes, listed by
  `detector_server.listing.list_files` (recursively, sorted; symlinks followed, loops cut, hidden
  entries left out); labels are the class index of the first-level sub-folder when `class_names`
  names it, else -1.

`photo_patches()` is a far-OOD set that needs no files at all: crops of the two photographs that
ship inside scikit-learn (`make demo` and the tests use it).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from detector_server.errors import DataError, InputError
from detector_server.listing import list_files, read_file
from detector_server.preprocess import PreprocessSpec, decode_image, prepare_arrays, to_model_array
from detector_server.validate import check_int

from .progress import Progress

__all__ = ["parse_set_arg", "load_image_set", "list_torchvision_sets", "read_npz_set",
           "read_image_folder", "photo_patches", "OOD_HELP"]

# --ood's help, the same in rwood-train and rwood-eval
OOD_HELP = ("OOD set (repeatable): an .npz (key images, uint8), an image folder (searched "
            "recursively), or a torchvision root for svhn/mnist/dtd(textures)/places365/cifar10/"
            "cifar100 (never downloaded).")

log = logging.getLogger(__name__)

ImageSet = tuple[np.ndarray, np.ndarray]        # (uint8 [N, S, S, 3], int64 [N]; -1 = no label)
TorchvisionLoader = Callable[[str, PreprocessSpec], ImageSet]
_TORCHVISION: dict[str, TorchvisionLoader] = {}
_HOW_TO_FILL: dict[str, str] = {}


def parse_set_arg(text: str, field: str = "ood") -> tuple[str, str]:
    """Split "name=path" into (name, path). InputError naming `field` (the option) when malformed."""
    name, sep, path = str(text).partition("=")
    if not sep or not name.strip() or not path.strip():
        raise InputError(f"expected NAME=PATH (e.g. textures=../shared/data/ood_textures.npz), "
                         f"got {text!r}", field=field)
    return name.strip(), path.strip()


def load_image_set(name: str, path: str | Path, spec: PreprocessSpec,
                   class_names: list[str] | None = None) -> ImageSet:
    """Load an evaluation set at model input.

    Returns (images uint8 [N, spec.size, spec.size, 3], labels int64 [N], -1 where unknown).
    class_names: the model's classes, for an in-distribution set: labels follow them, and images
    of other classes are named in a warning (they count as in-distribution all the same).
    Raises DataError naming the path when it is missing, empty or not in a known layout.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise DataError("expected an .npz file or a folder", path=str(p))
        return read_npz_set(p, spec, class_names)
    key = name.lower()
    if not p.is_dir():
        hint = f" {_HOW_TO_FILL[key]}" if key in _TORCHVISION else ""
        raise DataError(f"not found: expected an .npz file or a folder.{hint}", path=str(p))
    if key in _TORCHVISION:
        try:
            return _TORCHVISION[key](str(p), spec)
        except (RuntimeError, FileNotFoundError) as e:
            if not _has_images(p):
                raise DataError(f"no {key} files here ({e}). {_HOW_TO_FILL[key]}",
                                path=str(p)) from None
            log.info("%s: no torchvision %s layout in %s; reading it as an image folder",
                     name, key, p)
    return read_image_folder(p, spec, class_names)


def list_torchvision_sets() -> list[str]:
    return sorted(_TORCHVISION)


# ------------------------------------------------------------------------ npz and image folders
def read_npz_set(path: str | Path, spec: PreprocessSpec,
                 class_names: list[str] | None = None) -> ImageSet:
    """Read `images` uint8 (N,H,W[,C]) and optional `labels` (N,) from an .npz (no pickles).

    With `class_names` (the model's): labels of an npz with a `classes` array are mapped by name
    (-1 for names the model does not have), and labels or names the model never saw are named in
    a warning.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as f:
            if "images" not in f.files:
                raise DataError(f"missing key; found {f.files}", path=str(p), field="images")
            images = f["images"]
            labels = f["labels"] if "labels" in f.files else np.full(len(images), -1)
            names = [str(c) for c in f["classes"]] if "classes" in f.files else None
    except (OSError, ValueError) as e:
        raise DataError(f"not a readable .npz file ({e})", path=str(p)) from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(f"expected non-empty uint8 (N,H,W[,C]), got {images.dtype} {images.shape}",
                        path=str(p), field="images")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise DataError(f"expected integer labels of shape ({len(images)},), got {labels.dtype} "
                        f"{labels.shape}", path=str(p), field="labels")
    labels = labels.astype(np.int64)
    if class_names is not None:
        labels = _known_labels(labels, names, list(class_names), p)
    try:
        return prepare_arrays(images, spec), labels
    except InputError as e:
        raise DataError(str(e), path=str(p), field="images") from None


def _known_labels(labels: np.ndarray, names: list[str] | None, class_names: list[str],
                  where: Path) -> np.ndarray:
    """Labels in the model's class indices (-1: none); warns naming the classes it never saw."""
    index = {c: i for i, c in enumerate(class_names)}
    if names is not None:   # the file's own classes: map them by name
        lut = np.asarray([index.get(n, -1) for n in names] + [-1], dtype=np.int64)
        unseen = {names[v]: int(np.sum(labels == v)) for v in np.unique(labels)
                  if 0 <= v < len(names) and names[v] not in index}
        labels = lut[np.where((labels >= 0) & (labels < len(names)), labels, len(names))]
    else:
        unseen = {f"label {v}": int(np.sum(labels == v)) for v in np.unique(labels)
                  if v >= len(class_names)}
        labels = np.where(labels < len(class_names), labels, -1)
    _warn_unseen(where, unseen)
    return labels


def _warn_unseen(where: Path, unseen: dict[str, int]) -> None:
    if unseen:
        log.warning("%s: %d images of classes the model was never trained on: %s; they are scored "
                    "as in-distribution here (pass them with --ood NAME=PATH to evaluate them as "
                    "OOD)", where, sum(unseen.values()),
                    ", ".join(f"{k} ({n})" for k, n in sorted(unseen.items())))


def _has_images(root: Path) -> bool:
    return bool(list_files(root, hidden=False).files)


def read_image_folder(root: str | Path, spec: PreprocessSpec,
                      class_names: list[str] | None = None) -> ImageSet:
    """Every decodable file under `root` (as `list_files` walks it; hidden entries left out,
    files Pillow cannot read or that cannot be read skipped with a count in the log). Labels:
    index in `class_names` of the first-level sub-folder's name, -1 when absent or not a class
    name (with `class_names`, such sub-folders are named in a warning)."""
    root = Path(root)
    index = {c: i for i, c in enumerate(class_names or [])}
    images, labels, skipped, unseen = [], [], 0, {}
    files = list_files(root, hidden=False).files
    for rel in Progress(files, desc=f"reading {root}", unit="files", logger=log):
        try:
            images.append(to_model_array(decode_image(read_file(root / rel)), spec))
        except (InputError, OSError):
            skipped += 1
            continue
        parts = rel.split("/")
        labels.append(index.get(parts[0], -1) if len(parts) > 1 else -1)
        if class_names is not None and len(parts) > 1 and parts[0] not in index:
            unseen[parts[0]] = unseen.get(parts[0], 0) + 1
    if skipped:
        log.warning("%s: skipped %d files Pillow cannot decode", root, skipped)
    if not images:
        raise DataError("no image files found (any format Pillow decodes, searched recursively)",
                        path=str(root))
    _warn_unseen(root, unseen)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------ offline far-OOD set
def photo_patches(per_photo: int = 150, seed: int = 0, size: int = 32) -> np.ndarray:
    """Square crops (48-199 px, uniform random side and position) of scikit-learn's two sample
    photographs (china.jpg, flower.jpg, 427x640), each resized to `size` with PIL bilinear.

    Real photographs, far from any digit or object-class training set, available offline.
    Returns uint8 [2 * per_photo, size, size, 3], china's crops first; the same array for the
    same arguments on every machine. InputError naming `per_photo` / `size` when not >= 1.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    check_int(per_photo, "per_photo", minimum=1)
    check_int(size, "size", minimum=1)
    rng = np.random.default_rng(seed)
    patches = []
    for photo in load_sample_images().images:
        img = Image.fromarray(photo)
        for _ in range(per_photo):
            side = int(rng.integers(48, 200))
            x, y = int(rng.integers(0, img.width - side)), int(rng.integers(0, img.height - side))
            patches.append(np.asarray(img.crop((x, y, x + side, y + side)).resize(
                (size, size), Image.BILINEAR)))
    return np.stack(patches)


# ------------------------------------------------------------------------ torchvision roots
def _register(*names: str, fill: str) -> Callable[[TorchvisionLoader], TorchvisionLoader]:
    """Register a torchvision loader under its function name and `names` (aliases)."""
    def wrap(fn: TorchvisionLoader) -> TorchvisionLoader:
        for n in (fn.__name__, *names):
            _TORCHVISION[n], _HOW_TO_FILL[n] = fn, fill
        return fn
    return wrap


def _from_pil(ds, spec: PreprocessSpec) -> ImageSet:
    """Iterate a torchvision dataset of PIL images through the shared resize rule."""
    from tqdm.auto import tqdm

    images = np.empty((len(ds), spec.size, spec.size, 3), dtype=np.uint8)
    labels = np.empty(len(ds), dtype=np.int64)
    for i in tqdm(range(len(ds)), desc=type(ds).__name__, unit="img", leave=False,
                  disable=len(ds) < 5000):
        img, y = ds[i]
        images[i], labels[i] = to_model_array(img, spec), int(y)
    return images, labels


@_register(fill="Put test_32x32.mat (from http://ufldl.stanford.edu/housenumbers/) in this folder.")
def svhn(root: str, spec: PreprocessSpec) -> ImageSet:
    from torchvision.datasets import SVHN

    ds = SVHN(root, split="test", download=False)
    return prepare_arrays(np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), spec), \
        np.asarray(ds.labels, dtype=np.int64)


@_register(fill="Expected ROOT/MNIST/raw/t10k-images-idx3-ubyte (torchvision's layout; fill it "
                "once with torchvision.datasets.MNIST(ROOT, train=False, download=True)).")
def mnist(root: str, spec: PreprocessSpec) -> ImageSet:
    from torchvision.datasets import MNIST

    ds = MNIST(root, train=False, download=False)
    return prepare_arrays(ds.data.numpy(), spec), ds.targets.numpy().astype(np.int64)


@_register("textures", fill="Expected ROOT/dtd/dtd/images and ROOT/dtd/dtd/labels (extract "
                            "dtd-r1.0.1.tar.gz into ROOT/dtd), or any folder of texture images.")
def dtd(root: str, spec: PreprocessSpec) -> ImageSet:
    from torchvision.datasets import DTD

    return _from_pil(DTD(root, split="test", partition=1, download=False), spec)


@_register(fill="Expected ROOT/categories_places365.txt, ROOT/places365_val.txt and ROOT/val_256/ "
                "(filelist_places365-standard.tar and val_256.tar from places2.csail.mit.edu).")
def places365(root: str, spec: PreprocessSpec) -> ImageSet:
    from torchvision.datasets import Places365

    return _from_pil(Places365(root, split="val", small=True, download=False), spec)


def _cifar(cls_name: str, root: str, spec: PreprocessSpec) -> ImageSet:
    import torchvision

    ds = getattr(torchvision.datasets, cls_name)(root, train=False, download=False)
    return prepare_arrays(np.asarray(ds.data, dtype=np.uint8), spec), \
        np.asarray(ds.targets, dtype=np.int64)


@_register(fill="Expected ROOT/cifar-10-batches-py (the extracted python version of CIFAR-10).")
def cifar10(root: str, spec: PreprocessSpec) -> ImageSet:
    return _cifar("CIFAR10", root, spec)


@_register(fill="Expected ROOT/cifar-100-python (the extracted python version of CIFAR-100).")
def cifar100(root: str, spec: PreprocessSpec) -> ImageSet:
    return _cifar("CIFAR100", root, spec)
