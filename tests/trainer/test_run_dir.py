"""trainer/run_dir.py: the one reader of a run directory, on the tiny run and on damaged copies of
it; every refusal names the file and the key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from detector_server.errors import CheckpointError, DataError, InputError
from trainer.run_dir import (
    BANK_FILE,
    CALIBRATION_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    RunDir,
    RunInfo,
    write_bank,
    write_calibration,
)


@pytest.fixture()
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny run's record, bank and calibration split (no model.pt)."""
    dst = tmp_path / "run"
    dst.mkdir()
    for name in (CONFIG_FILE, BANK_FILE, CALIBRATION_FILE):
        shutil.copy(tiny_run / name, dst / name)
    return dst


def _edit_config(run: Path, **changes) -> None:
    d = json.loads((run / CONFIG_FILE).read_text())
    d.update(changes)
    (run / CONFIG_FILE).write_text(json.dumps(d))


def test_info_is_config_json_flat(tiny_run: Path) -> None:
    raw = json.loads((tiny_run / CONFIG_FILE).read_text())
    info = RunDir(tiny_run).info
    assert info.config == raw["config"] and info.config["k"] == 10
    assert info.model_args == raw["model_args"] and info.data == raw["data"]
    assert info.class_names == tuple(raw["class_names"]) and info.preprocess.size == 32
    assert info.finished is True and info.git_rev == raw["git_rev"]
    assert info.to_dict() == raw and RunInfo.from_dict(raw) == info


def test_bank_and_calibration_are_the_files(tiny_run: Path) -> None:
    r = RunDir(tiny_run)
    with np.load(tiny_run / BANK_FILE) as f:
        for feature in ("penultimate", "projection"):
            emb, labels = r.bank(feature)
            np.testing.assert_array_equal(emb, f[feature])
            np.testing.assert_array_equal(labels, f["labels"])
            assert emb.dtype == np.float32 and labels.dtype == np.int64
    assert r.bank_features() == ["penultimate", "projection"]
    images, labels = r.calibration(instead="x")
    with np.load(tiny_run / CALIBRATION_FILE) as f:
        np.testing.assert_array_equal(images, f["images"])
        np.testing.assert_array_equal(labels, f["labels"])


def test_writers_round_trip(tmp_path: Path) -> None:
    emb = {"feature": np.eye(3, 4, dtype=np.float32), "projection": np.eye(3, 2, dtype=np.float32)}
    write_bank(tmp_path, emb, np.array([0, 1, 1]), np.array([5, 6, 7]), ["a", "b"])
    write_calibration(tmp_path, np.zeros((2, 8, 8, 3), np.uint8), np.array([1, 0]),
                      np.array([0, 1]))
    with np.load(tmp_path / BANK_FILE) as f:
        assert sorted(f.files) == ["class_names", "indices", "labels", "penultimate", "projection"]
        np.testing.assert_array_equal(f["projection"], emb["projection"])
        assert f["labels"].dtype == np.int64 and f["class_names"].tolist() == ["a", "b"]
    with np.load(tmp_path / CALIBRATION_FILE) as f:
        assert f["images"].shape == (2, 8, 8, 3) and f["indices"].dtype == np.int64


def test_bank_sources(tiny_run: Path, tmp_path: Path) -> None:
    indices, files = RunDir(tiny_run).bank_sources()
    with np.load(tiny_run / BANK_FILE) as f:
        np.testing.assert_array_equal(indices, f["indices"])
    assert files is None                               # an npz dataset has rows, not files
    emb = {"feature": np.eye(2, 4, dtype=np.float32), "projection": np.eye(2, 2, dtype=np.float32)}
    write_bank(tmp_path, emb, np.array([0, 1]), np.array([3, 9]), ["a", "b"],
               ["a/x.png", "b/y.jpg"])
    shutil.copy(tiny_run / CONFIG_FILE, tmp_path / CONFIG_FILE)
    indices, files = RunDir(tmp_path).bank_sources()
    assert indices.tolist() == [3, 9] and files == ["a/x.png", "b/y.jpg"]
    with np.load(tmp_path / BANK_FILE) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(tmp_path / BANK_FILE, **{**arrays, "files": arrays["files"][:1]})
    with pytest.raises(CheckpointError, match="file names") as e:
        RunDir(tmp_path).bank_sources()
    assert e.value.field == "files" and e.value.path == str(tmp_path / BANK_FILE)
    np.savez(tmp_path / BANK_FILE, **{**arrays, "indices": arrays["indices"][:1]})
    with pytest.raises(CheckpointError, match="integer indices") as e:
        RunDir(tmp_path).bank_sources()
    assert e.value.field == "indices"


def test_choose_k(run: Path) -> None:
    r = RunDir(run)
    n = len(r.bank("penultimate")[1])
    assert r.choose_k(7, n) == 7 and r.choose_k(None, n) == 10         # explicit, then the run's
    assert r.choose_k(None, 4) == 4                                       # the run's k, capped
    with pytest.raises(InputError, match="exceeds") as e:
        r.choose_k(n + 1, n)
    assert e.value.field == "k"
    with pytest.raises(InputError, match="positive integer"):
        r.choose_k(0, n)
    cfg = r.info.config
    _edit_config(run, config={**cfg, "k": None})
    smallest = int(np.bincount(r.bank("penultimate")[1]).min())           # 95 rows per class
    # default_k's small-bank rule: 100 would be over 2/3 of a class, so a tenth of the smallest
    assert RunDir(run).choose_k(None, n) == smallest // 10 == 9
    _edit_config(run, config={**cfg, "k": "ten"})
    with pytest.raises(CheckpointError) as e:
        RunDir(run).choose_k(None, n)
    assert e.value.field == "config.k" and e.value.path == str(run / CONFIG_FILE)


# ------------------------------------------------------------------------------ refusals
def test_missing_directory_and_files(run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="run directory not found") as e:
        RunDir(tmp_path / "nope")
    assert e.value.path == str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no final model") as e:
        RunDir(run).require(CONFIG_FILE, MODEL_FILE, BANK_FILE)
    assert e.value.path == str(run / MODEL_FILE)
    (run / BANK_FILE).unlink()
    with pytest.raises(CheckpointError, match="no embedding bank") as e:
        RunDir(run).bank("penultimate")
    assert e.value.path == str(run / BANK_FILE)
    (run / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="no run record") as e:
        _ = RunDir(run).info
    assert e.value.path == str(run / CONFIG_FILE)


@pytest.mark.parametrize("changes,field", [
    ({"format": "reweightood-bundle"}, "format"),
    ({"format_version": 2}, "format_version"),
    ({"config": None}, "config"),
    ({"model_args": []}, "model_args"),
    ({"class_names": []}, "class_names"),
    ({"class_names": [1, 2]}, "class_names"),
    ({"preprocess": {"size": 32}}, "preprocess"),
    ({"preprocess": None}, "preprocess"),
    ({"data": "cifar10"}, "data"),
    ({"git_rev": 7}, "git_rev"),
    ({"finished": "yes"}, "finished"),
])
def test_malformed_config_json(run: Path, changes: dict, field: str) -> None:
    _edit_config(run, **changes)
    with pytest.raises(CheckpointError) as e:
        _ = RunDir(run).info
    assert e.value.field == field and e.value.path == str(run / CONFIG_FILE)


def test_unreadable_config_json(run: Path) -> None:
    (run / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable") as e:
        _ = RunDir(run).info
    assert e.value.path == str(run / CONFIG_FILE)


def _bad_banks(n: int = 8) -> list:
    unit = np.eye(n, 4, dtype=np.float32)
    labels = np.arange(n) % 10
    nan = unit.copy()
    nan[3, 0] = np.nan
    return [
        ({"labels": labels}, "penultimate", "missing array"),
        ({"penultimate": unit}, "labels", "missing array"),
        ({"penultimate": unit.astype(np.float64), "labels": labels}, "penultimate", "float32"),
        ({"penultimate": unit[:0], "labels": labels[:0]}, "penultimate", "N, D >= 1"),
        ({"penultimate": nan, "labels": labels}, "penultimate", "NaN"),
        ({"penultimate": unit, "labels": labels[:-1]}, "labels", "integer labels"),
        ({"penultimate": unit, "labels": labels.astype(np.float32)}, "labels", "integer labels"),
        ({"penultimate": unit, "labels": labels + 5}, "labels", "outside"),
    ]


@pytest.mark.parametrize("arrays,field,match", _bad_banks())
def test_bad_bank(run: Path, arrays: dict, field: str, match: str) -> None:
    np.savez(run / BANK_FILE, **arrays)
    with pytest.raises(CheckpointError, match=match) as e:
        RunDir(run).bank("penultimate")
    assert e.value.field == field and e.value.path == str(run / BANK_FILE)


def test_truncated_bank_and_unknown_feature(run: Path) -> None:
    with pytest.raises(InputError) as e:
        RunDir(run).bank("logits")
    assert e.value.field == "feature"
    blob = (run / BANK_FILE).read_bytes()
    (run / BANK_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="cannot read") as e:
        RunDir(run).bank("penultimate")
    assert e.value.path == str(run / BANK_FILE)


@pytest.mark.parametrize("arrays,field,match", [
    ({"images": np.zeros((4, 32, 32, 3), np.uint8)}, "labels", "missing array"),
    ({"images": np.zeros((4, 28, 28, 3), np.uint8), "labels": np.zeros(4)}, "images", "input size"),
    ({"images": np.zeros((4, 32, 32, 3), np.float32), "labels": np.zeros(4)}, "images", "uint8"),
    ({"images": np.zeros((4, 32, 32, 3), np.uint8), "labels": np.zeros(3, int)}, "labels",
     "integer labels"),
    ({"images": np.zeros((0, 32, 32, 3), np.uint8), "labels": np.zeros(0, int)}, "images",
     "empty"),
])
def test_bad_calibration(run: Path, arrays: dict, field: str, match: str) -> None:
    np.savez(run / CALIBRATION_FILE, **arrays)
    with pytest.raises(DataError, match=match) as e:
        RunDir(run).calibration(instead="pass --id-test PATH")
    assert e.value.field == field and e.value.path == str(run / CALIBRATION_FILE)


def test_missing_calibration_says_what_to_do_instead(run: Path) -> None:
    (run / CALIBRATION_FILE).unlink()
    with pytest.raises(DataError, match="calibration_fraction 0.*pass --id-test PATH") as e:
        RunDir(run).calibration(instead="pass --id-test PATH")
    assert e.value.path == str(run / CALIBRATION_FILE)
