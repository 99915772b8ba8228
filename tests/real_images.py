"""The tests' real images, all of which ship inside scikit-learn: nothing is downloaded or committed.

- In-distribution: the handwritten digits of `sklearn.datasets.load_digits` (1,797 real 8x8 scans),
  read through the project's own offline dataset (`trainer.data`, "digits": upsampled to 32x32 RGB,
  fixed stratified 80/20 split). `digits_round_robin()` lays the training split out like the
  CIFAR pack's files (row k*10+c is the k-th image of class c), so any prefix is class-balanced;
  the tiny run of tests/conftest.py trains on its first `TINY_RUN_ROWS` rows and
  `digits_unseen()` is every digit it never saw.
- Out-of-distribution and "a real photo": the two sample photographs (china.jpg, flower.jpg,
  427x640). `photo_patches()` are 32x32 crops of them (`trainer.ood_sets.photo_patches`, the far-OOD
  set of `make demo`); `photo_jpegs()` are JPEG files of various sizes: the two files exactly as
  shipped, then re-encoded crops; `write_photo_classes()` lays out an image folder of large JPEGs
  (320-640 px) with one class per region of the two photographs, as a user's own data would be.

Every function is deterministic and cached (the arrays are shared: do not modify them in place).
Used by tests/conftest.py's fixtures and by tests/reliability/hostile_corpus.py (and so bench/).
"""
from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

__all__ = ["TINY_RUN_ROWS", "png_bytes", "digits_split", "digits_round_robin", "digits_unseen", "digits_gray",
           "photo_patches", "gray_photo_patches", "photo_jpegs", "PHOTO_CLASSES",
           "write_photo_classes"]

TINY_RUN_ROWS = 1000        # the tiny run trains on (and holds out calibration from) these rows
N_JPEGS = 100


def png_bytes(a: np.ndarray) -> bytes:
    """A uint8 image array ([H, W] or [H, W, 3]) as an encoded PNG file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def digits_split(split: str):
    """trainer.data's "digits", split "train" (1,442) or "test" (355): an ImageArrays with images
    uint8 [N, 32, 32, 3], labels int64 [N] in file order, class_names "0".."9"."""
    from trainer.data import load_dataset

    return load_dataset("digits", None, split)


@functools.cache
def digits_round_robin() -> dict[str, np.ndarray]:
    """The digits training split, round-robin by class: 1,400 rows (140 per class).

    Keys: images uint8 [1400, 32, 32, 3] (grey scans as RGB), labels int64 [1400], classes
    str [10] ("0".."9") -- the keys and layout of the data pack's cifar10_train.npz.
    """
    d = digits_split("train")
    per_class = [np.flatnonzero(d.labels == c) for c in range(len(d.class_names))]
    n = min(len(rows) for rows in per_class)
    order = np.stack([rows[:n] for rows in per_class], axis=1).reshape(-1)
    return {"images": d.images[order], "labels": d.labels[order],
            "classes": np.asarray(d.class_names)}


@functools.cache
def digits_unseen() -> np.ndarray:
    """Every digit the tiny run never saw (not trained on, not banked, not its calibration split):
    the round-robin rows after TINY_RUN_ROWS (400, 40 per class), then the test split (355).
    uint8 [755, 32, 32, 3]."""
    rest = digits_round_robin()["images"][TINY_RUN_ROWS:]
    return np.concatenate([rest, digits_split("test").images])


@functools.cache
def digits_gray() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scans at their native size with one grey channel, 0-16 scaled to 0-255 as
    trainer.data does before upsampling: (uint8 [1797, 8, 8, 1], int64 labels [1797])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.clip(d.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    return gray[..., None], d.target.astype(np.int64)


@functools.cache
def photo_patches() -> np.ndarray:
    """300 far-OOD colour images: crops of the two photographs, uint8 [300, 32, 32, 3]."""
    from trainer.ood_sets import photo_patches as patches

    return patches(per_photo=150, seed=0)


@functools.cache
def gray_photo_patches() -> np.ndarray:
    """300 other crops (another seed), converted to one grey channel: uint8 [300, 32, 32, 1]."""
    from trainer.ood_sets import photo_patches as patches

    rgb = patches(per_photo=150, seed=1).astype(np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    return np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None]


@functools.cache
def _jpegs() -> tuple[bytes, ...]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    files = load_sample_images().filenames                  # china.jpg, flower.jpg
    out = [Path(f).read_bytes() for f in files]
    photos = [Image.open(io.BytesIO(b)).convert("RGB") for b in out]
    rng = np.random.default_rng(2024)
    for i in range(N_JPEGS - len(out)):
        img = photos[i % 2]
        w, h = int(rng.integers(320, img.width + 1)), int(rng.integers(240, img.height + 1))
        x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        buf = io.BytesIO()
        img.crop((x, y, x + w, y + h)).save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
        out.append(buf.getvalue())
    return tuple(out)


def photo_jpegs(n: int = N_JPEGS) -> list[bytes]:
    """The bytes of `n` (<= 100) real JPEG files: china.jpg and flower.jpg as shipped (427x640
    camera JPEGs, about 200 and 140 KB), then crops of them (320-640 x 240-427 px) re-encoded at
    quality 70-95."""
    if not 0 < n <= N_JPEGS:
        raise ValueError(f"n must be in [1, {N_JPEGS}], got {n}")
    return list(_jpegs()[:n])


# One class per quadrant of each photograph: temple roof, sky and trees, petals, leaves, ...
PHOTO_CLASSES = tuple(f"{photo}_{corner}" for photo in ("china", "flower")
                      for corner in ("top_left", "top_right", "bottom_left", "bottom_right"))


def write_photo_classes(root: Path, per_class: int = 12, classes: tuple[str, ...] = PHOTO_CLASSES,
                        seed: int = 0) -> dict[str, list[Path]]:
    """An image folder of real photographs as a user's own data: ROOT/<class>/<n>.jpg.

    Each class is one quadrant of china.jpg or flower.jpg (`PHOTO_CLASSES`); the photograph is
    scaled up 2x (1280x854) and each image is a random crop around the quadrant's centre, 320 to
    640 px on its long side with a random aspect ratio, sometimes mirrored, saved as JPEG quality
    75-95: mixed sizes, all larger than any default input size. Deterministic for a seed.
    Returns {class: [paths]}.
    """
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_images

    photos = {name: Image.fromarray(a).resize((1280, 854), Image.BILINEAR)
              for name, a in zip(("china", "flower"), load_sample_images().images)}
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {}
    for name in classes:
        photo, corner = name.split("_", 1)
        img = photos[photo]
        cx = img.width * (0.25 if corner.endswith("left") else 0.75)
        cy = img.height * (0.25 if corner.startswith("top") else 0.75)
        (root / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for i in range(per_class):
            long = int(rng.integers(320, 641))
            short = int(long * rng.uniform(0.6, 1.0))
            w, h = (long, short) if rng.random() < 0.5 else (short, long)
            x = int(np.clip(cx - w / 2 + rng.integers(-60, 61), 0, img.width - w))
            y = int(np.clip(cy - h / 2 + rng.integers(-60, 61), 0, img.height - h))
            crop = img.crop((x, y, x + w, y + h))
            if rng.random() < 0.5:
                crop = ImageOps.mirror(crop)
            path = root / name / f"{i:03d}.jpg"
            crop.save(path, format="JPEG", quality=int(rng.integers(75, 96)))
            out[name].append(path)
    return out
