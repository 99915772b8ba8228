"""`--dataset cifar10/cifar100 --data ROOT`, the path real users take, offline: the test writes a
ROOT in the python-pickle layout of the CIFAR archives (cifar-10-batches-py/, cifar-100-python/)
from the shared data pack's npz files, and torchvision reads it.

torchvision checks each file against the md5 of the official archive, which files written here
cannot match: the tests replace only that checksum with an existence check, and make any download
attempt fail.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
from click.testing import CliRunner

from trainer.cli import train_main
from trainer.cli_eval import eval_main
from trainer.data import load_dataset

N_TRAIN, N_TEST = 200, 100          # first rows of the pack's files (round-robin by class)

pytestmark = pytest.mark.cifar_pack


def _rows(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> [N, 3072]: the archive's rows (1024 red, 1024 green, 1024 blue)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar10(root: Path, train: dict, test: dict) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    parts = np.array_split(np.arange(len(train["labels"])), 5)      # data_batch_1 .. 5
    for i, idx in enumerate(parts, 1):
        _dump(d / f"data_batch_{i}", {"data": _rows(train["images"][idx]),
                                      "labels": train["labels"][idx].tolist()})
    _dump(d / "test_batch", {"data": _rows(test["images"]), "labels": test["labels"].tolist()})
    _dump(d / "batches.meta", {"label_names": [str(c) for c in train["classes"]]})


def _write_cifar100(root: Path, train: dict, test: dict) -> None:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, part in (("train", train), ("test", test)):
        _dump(d / name, {"data": _rows(part["images"]), "fine_labels": part["labels"].tolist()})
    _dump(d / "meta", {"fine_label_names": [str(c) for c in train["classes"]]})


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory, shared_data: Path) -> tuple[Path, dict]:
    """ROOT holding both layouts, and the arrays written: {(name, split): {images, labels, classes}}."""
    root = tmp_path_factory.mktemp("cifar_root")
    written = {}
    for name, write in (("cifar10", _write_cifar10), ("cifar100", _write_cifar100)):
        parts = {}
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            with np.load(shared_data / f"{name}_{split}.npz") as f:
                parts[split] = {"images": f["images"][:n], "labels": f["labels"][:n],
                                "classes": f["classes"]}
        write(root, parts["train"], parts["test"])
        written.update({(name, s): p for s, p in parts.items()})
    return root, written


@pytest.fixture
def offline(monkeypatch):
    """Checksums become existence checks; a download attempt fails the test."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))

    def no_network(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_loader_reads_the_pickle_layout(cifar_root, offline, name, split):
    root, written = cifar_root
    want = written[(name, split)]
    d = load_dataset(name, str(root), split)
    np.testing.assert_array_equal(d.images, want["images"])
    np.testing.assert_array_equal(d.labels, want["labels"])
    assert d.class_names == [str(c) for c in want["classes"]] and d.source == str(root)


def _cli(main, args: list[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_train_and_eval_cifar10_from_root(cifar_root, offline, tmp_path):
    root, _ = cifar_root
    run = tmp_path / "run"
    _cli(train_main, ["--dataset", "cifar10", "--data", str(root), "--arch", "small_cnn",
                      "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", str(run)])
    rec = json.loads((run / "config.json").read_text())
    assert rec["data"]["n_train"] + rec["data"]["n_calibration"] == N_TRAIN
    assert rec["class_names"][:2] == ["airplane", "automobile"]
    report_dir = tmp_path / "eval"
    _cli(eval_main, [str(run), "--k", "5", "--device", "cpu", "--out", str(report_dir)])
    report = json.loads((report_dir / "report.json").read_text())
    assert report["settings"]["id_test"]["n"] == N_TEST                 # ROOT's test_batch
    assert "cifar10 test split" in report["settings"]["id_test"]["source"]


def test_official_preset_on_cifar100_from_root(cifar_root, offline, tmp_path):
    root, _ = cifar_root
    run = tmp_path / "run"
    _cli(train_main, ["--preset", "official", "--dataset", "cifar100", "--data", str(root),
                      "--arch", "small_cnn", "--epochs", "1", "--batch-size", "64",
                      "--device", "cpu", "--out", str(run)])
    rec = json.loads((run / "config.json").read_text())
    cfg = rec["config"]
    assert (cfg["c_b"], cfg["amp"], cfg["sync_bn"], cfg["lr_schedule"]) == (-4.0, False, True,
                                                                              "released")
    assert (rec["data"]["n_train"], rec["data"]["n_calibration"]) == (N_TRAIN, 0)
    assert len(rec["class_names"]) == 100 and not (run / "calibration.npz").exists()
