"""trainer/data.py: the npz / folder / digits / CIFAR loaders and their errors, the calibration
split, class selection, statistics and fingerprints. Real pixels: the digits scans and the
photographs that ship with scikit-learn (tests/real_images.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import real_images
from PIL import Image

from detector_server.errors import DataError, InputError
from detector_server.preprocess import PreprocessSpec, prepare_arrays, to_model_array
from trainer.data import (
    calibration_split,
    dataset_stats,
    fingerprint,
    list_datasets,
    load_dataset,
    parse_classes,
    read_folder,
    read_npz,
    select_classes,
)

WORDS = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


@pytest.fixture(scope="module")
def d300(digits_small) -> dict[str, np.ndarray]:
    """300 real digits (30 per class, round-robin rows) with labels and class names that are not
    the label numbers ("zero" ... "nine"), so names read from a file differ from inferred ones."""
    return {"images": digits_small["images"][:300], "labels": digits_small["labels"][:300],
            "classes": WORDS}


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------ npz
def test_npz_round_trip_keeps_pixels_labels_and_class_names(tmp_path, d300):
    f = _npz(tmp_path / "c.npz", images=d300["images"], labels=d300["labels"], classes=d300["classes"])
    d = load_dataset("npz", str(f))
    assert d.images.dtype == np.uint8 and d.images.shape == (300, 32, 32, 3)
    np.testing.assert_array_equal(d.images, d300["images"])
    assert d.labels.dtype == np.int64
    np.testing.assert_array_equal(d.labels, d300["labels"])
    assert d.class_names == [str(c) for c in d300["classes"]] and d.class_names[0] == "zero"
    assert d.source == str(f)


def test_npz_without_classes_infers_them_from_labels(tmp_path, d300):
    f = _npz(tmp_path / "c.npz", images=d300["images"][:20], labels=d300["labels"][:20] % 3)
    d = read_npz(f, 32)
    assert d.class_names == ["0", "1", "2"]


def test_npz_resizes_to_the_requested_size(tmp_path, d300):
    f = _npz(tmp_path / "c.npz", images=d300["images"][:4], labels=d300["labels"][:4])
    d = load_dataset("npz", str(f), size=48)
    assert d.images.shape == (4, 48, 48, 3)
    spec = PreprocessSpec(size=48, mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_array_equal(d.images, prepare_arrays(d300["images"][:4], spec))


def test_gray_8x8_becomes_rgb_32_through_the_shared_preprocessing(tmp_path):
    gray, labels = real_images.digits_gray()
    f = _npz(tmp_path / "gray.npz", images=gray, labels=labels)           # no `classes`
    raw = gray[:50]                                                      # (50, 8, 8, 1)
    assert raw.shape[1:] == (8, 8, 1)
    d = read_npz(f, 32)
    assert d.images.shape == (1797, 32, 32, 3) and d.images.dtype == np.uint8
    assert (d.images[..., 0] == d.images[..., 1]).all() and (d.images[..., 1] == d.images[..., 2]).all()
    spec = PreprocessSpec(size=32, mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_array_equal(d.images[:50], prepare_arrays(raw, spec))
    one = to_model_array(Image.fromarray(raw[7, ..., 0], mode="L"), spec)   # the runtime's path
    np.testing.assert_array_equal(d.images[7], one)
    assert d.class_names == [str(c) for c in range(10)]  # no `classes`: inferred from labels


def _bad(tmp_path: Path, d300: dict, what: str) -> Path:
    imgs, labels = d300["images"][:10], d300["labels"][:10]
    p = tmp_path / f"{what}.npz"
    if what == "no_images":
        return _npz(p, pixels=imgs, labels=labels)
    if what == "no_labels":
        return _npz(p, images=imgs)
    if what == "float_images":
        return _npz(p, images=imgs.astype(np.float32), labels=labels)
    if what == "shape_2d":
        return _npz(p, images=imgs.reshape(10, -1), labels=labels)
    if what == "shape_4_channels":
        return _npz(p, images=np.concatenate([imgs, imgs[..., :1]], axis=-1), labels=labels)
    if what == "float_labels":
        return _npz(p, images=imgs, labels=labels.astype(np.float64))
    if what == "label_too_big":
        return _npz(p, images=imgs, labels=np.full(10, 5), classes=np.array(["a", "b", "c"]))
    if what == "label_negative":
        return _npz(p, images=imgs, labels=np.r_[labels[:9], -1])
    if what == "label_count":
        return _npz(p, images=imgs, labels=labels[:7])
    if what == "object_classes":
        return _npz(p, images=imgs, labels=labels % 2, classes=np.array(["a", 1], dtype=object))
    raise AssertionError(what)


@pytest.mark.parametrize("what,field,words", [
    ("no_images", "images", "missing key"),
    ("no_labels", "labels", "missing key"),
    ("float_images", "images", "uint8"),
    ("shape_2d", "images", "shape"),
    ("shape_4_channels", "images", "shape"),
    ("float_labels", "labels", "integer"),
    ("label_too_big", "labels", "[0, 2]"),
    ("label_negative", "labels", "found [-1"),
    ("label_count", "labels", "(10,)"),
    ("object_classes", "classes", "cannot read"),
])
def test_npz_errors_name_file_and_field(tmp_path, d300, what, field, words):
    f = _bad(tmp_path, d300, what)
    with pytest.raises(DataError) as e:
        load_dataset("npz", str(f))
    assert e.value.path == str(f) and e.value.field == field
    assert str(f) in str(e.value) and f"'{field}'" in str(e.value) and words in str(e.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        read_npz(tmp_path / "nope.npz", 32)
    assert "not found" in str(e.value) and e.value.path == str(tmp_path / "nope.npz")


def test_npz_truncated_file_and_plain_npy(tmp_path):
    gray, labels = real_images.digits_gray()
    np.savez_compressed(tmp_path / "whole.npz", images=gray, labels=labels)
    blob = (tmp_path / "whole.npz").read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as e:
        read_npz(cut, 32)
    assert e.value.path == str(cut)
    npy = tmp_path / "plain.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="npz archive"):
        read_npz(npy, 32)


def test_npz_and_folder_need_a_path():
    for name in ("npz", "folder", "cifar10"):
        with pytest.raises(DataError) as e:
            load_dataset(name, None)
        assert e.value.field == "data" and "--data" in str(e.value)


def test_unknown_dataset_and_split_are_input_errors():
    with pytest.raises(InputError) as e:
        load_dataset("imagenet", "x")
    assert e.value.field == "dataset" and "cifar10" in str(e.value)
    with pytest.raises(InputError) as e:
        load_dataset("digits", None, split="val")
    assert e.value.field == "split"
    assert {"digits", "cifar10", "cifar100", "npz", "folder"} <= set(list_datasets())


# ------------------------------------------------------------------------------ folder
def _image_folder(root: Path, d300: dict, per_class: int = 4, classes=(3, 0, 7)) -> dict:
    """ROOT/<class name>/<n>.png written from real digit pixels (PNG is lossless)."""
    expected = {}
    for c in classes:
        name = str(d300["classes"][c])
        (root / name).mkdir(parents=True)
        rows = np.flatnonzero(d300["labels"] == c)[:per_class]
        for i, r in enumerate(rows):
            Image.fromarray(d300["images"][r]).save(root / name / f"{i:03d}.png")
        expected[name] = d300["images"][rows]
    return expected


def test_folder_loader_reads_real_pngs_sorted_by_class_name(tmp_path, d300):
    expected = _image_folder(tmp_path / "root", d300)
    (tmp_path / "root" / "three" / "notes.txt").write_text("not an image")    # ignored
    (tmp_path / "root" / ".cache").mkdir()                                     # hidden: ignored
    d = load_dataset("folder", str(tmp_path / "root"))
    assert d.class_names == sorted(expected) == ["seven", "three", "zero"]
    assert d.images.shape == (12, 32, 32, 3) and d.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for label, name in enumerate(d.class_names):
        np.testing.assert_array_equal(d.images[d.labels == label], expected[name])
    assert d.files[:2] == ("seven/000.png", "seven/001.png") and len(d.files) == 12
    kept = select_classes(d, [2, 0])                  # each image keeps its file
    assert kept.files == d.files[:4] + d.files[8:]     # dataset order, classes 0 and 2
    for image, f in zip(kept.images, kept.files):
        np.testing.assert_array_equal(image, d.images[d.files.index(f)])


def test_folder_loader_resizes_other_sizes_and_modes(tmp_path, ood_images):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    big = Image.fromarray(ood_images[0]).resize((64, 48))                # colour photo patches
    big.save(root / "a" / "big.jpg", quality=95)
    Image.fromarray(ood_images[1]).convert("L").save(root / "a" / "gray.png")
    d = read_folder(root, 32)
    assert d.images.shape == (2, 32, 32, 3)
    spec = PreprocessSpec(size=32, mean=(0, 0, 0), std=(1, 1, 1))
    want = to_model_array(Image.open(root / "a" / "big.jpg").convert("RGB"), spec)
    np.testing.assert_array_equal(d.images[0], want)
    assert (d.images[1, ..., 0] == d.images[1, ..., 2]).all()


def test_folder_errors(tmp_path, d300):
    with pytest.raises(DataError, match="folder not found"):
        read_folder(tmp_path / "missing", 32)
    (tmp_path / "flat").mkdir()
    Image.fromarray(d300["images"][0]).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="sub-folder per class"):
        read_folder(tmp_path / "flat", 32)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        read_folder(tmp_path / "empty", 32)
    bad = tmp_path / "corrupt" / "a" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError) as e:
        read_folder(tmp_path / "corrupt", 32)
    assert e.value.path == str(bad)


# ------------------------------------------------------------------------------ digits (offline)
def test_digits_is_offline_rgb_32_with_disjoint_stratified_splits():
    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    for d in (train, test):
        assert d.images.dtype == np.uint8 and d.images.shape[1:] == (32, 32, 3)
        assert d.class_names == [str(c) for c in range(10)]
        assert set(d.labels.tolist()) == set(range(10))
    assert len(train.images) + len(test.images) == 1797
    assert 0.18 < len(test.images) / 1797 < 0.22
    train_rows = {r.tobytes() for r in train.images}
    assert len(train_rows) == len(train.images)
    assert not any(r.tobytes() in train_rows for r in test.images)
    again = load_dataset("digits", None, "test")           # fixed split for every user
    np.testing.assert_array_equal(again.images, test.images)


# ------------------------------------------------------------------------------ CIFAR (no download)
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_with_missing_root_names_the_folder_and_never_downloads(tmp_path, monkeypatch, name):
    import torchvision.datasets.utils as tvu

    def no_network(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(tvu, "download_url", no_network)
    monkeypatch.setattr(tvu, "download_and_extract_archive", no_network)
    root = tmp_path / "cifar_root"
    with pytest.raises(DataError) as e:
        load_dataset(name, str(root))
    assert e.value.path == str(root) and str(root) in str(e.value)
    assert "--download" in str(e.value)
    assert not root.exists() or not any(root.iterdir())


# ------------------------------------------------------------------------------ calibration split
def test_calibration_split_is_stratified_seeded_disjoint_and_complete(d300):
    labels = d300["labels"]                       # 30 per class
    train, cal = calibration_split(labels, 0.1, seed=5)
    assert train.dtype == np.int64 and cal.dtype == np.int64
    assert (np.diff(train) > 0).all() and (np.diff(cal) > 0).all()
    assert np.intersect1d(train, cal).size == 0
    np.testing.assert_array_equal(np.union1d(train, cal), np.arange(len(labels)))
    assert np.bincount(labels[cal], minlength=10).tolist() == [3] * 10
    again = calibration_split(labels, 0.1, seed=5)
    np.testing.assert_array_equal(again[1], cal)
    other = calibration_split(labels, 0.1, seed=6)[1]
    assert not np.array_equal(other, cal)


def test_calibration_split_edge_cases():
    labels = np.array([0] * 40 + [1] * 3 + [2])
    train, cal = calibration_split(labels, 0.05, seed=0)
    counts = np.bincount(labels[cal], minlength=3).tolist()
    assert counts == [2, 1, 0]          # round(2.0); at least one of a small class; a singleton stays
    assert 43 in train
    train0, cal0 = calibration_split(labels, 0.0, seed=0)
    assert cal0.size == 0 and train0.tolist() == list(range(44))


# ------------------------------------------------------------------------------ classes
@pytest.mark.parametrize("text,expected", [
    ("0-5", [0, 1, 2, 3, 4, 5]), ("0,2,4", [0, 2, 4]), ("1-3,8", [1, 2, 3, 8]),
    (" 2 - 3 , 9 ", [2, 3, 9]), ("4,4,3", [3, 4]), ("7", [7]),
])
def test_parse_classes(text, expected):
    assert parse_classes(text, 10) == expected


@pytest.mark.parametrize("text", ["", "a", "0-", "5-2", "0-10", "10", "-1", "1;2"])
def test_parse_classes_errors(text):
    with pytest.raises(InputError) as e:
        parse_classes(text, 10)
    assert e.value.field == "classes"


def test_select_classes_relabels_in_the_given_order(tmp_path, d300):
    f = _npz(tmp_path / "c.npz", images=d300["images"], labels=d300["labels"], classes=d300["classes"])
    d = load_dataset("npz", str(f))
    s = select_classes(d, [7, 2])
    assert s.class_names == [d.class_names[7], d.class_names[2]]
    assert len(s.images) == 60 and set(s.labels.tolist()) == {0, 1}
    np.testing.assert_array_equal(s.images[s.labels == 0], d.images[d.labels == 7])
    np.testing.assert_array_equal(s.images[s.labels == 1], d.images[d.labels == 2])


# ------------------------------------------------------------------------------ stats, fingerprint
def test_dataset_stats_match_numpy(d300):
    mean, std = dataset_stats(d300["images"])
    x = d300["images"].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-9)
    np.testing.assert_allclose(std, x.std(0), atol=1e-7)


def test_fingerprint_changes_with_one_pixel(tmp_path, d300):
    f = _npz(tmp_path / "c.npz", images=d300["images"][:20], labels=d300["labels"][:20])
    a, b = read_npz(f, 32), read_npz(f, 32)
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 64
    imgs = d300["images"][:20].copy()
    imgs[3, 4, 5, 1] ^= 1
    g = _npz(tmp_path / "d.npz", images=imgs, labels=d300["labels"][:20])
    assert fingerprint(read_npz(g, 32)) != fingerprint(a)
