"""Image folders with symlinked class folders, and outputs that already exist, through the CLIs of
rwood-train, rwood-eval and rwood-export (click's runner, PNGs of real digit scans).

Every command lists a folder with detector_server.listing, so a symlinked class folder is read by
all of them (rwood-eval used to say "no image files found", rwood-export found 0 calibration
images), a link loop ends, and an earlier run or report is never replaced without a flag.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import real_images
import torch
from click.testing import CliRunner
from PIL import Image

from detector_server.errors import DataError
from detector_server.preprocess import PreprocessSpec
from exporter.cli import export_main
from trainer.cli import train_main
from trainer.cli_eval import eval_main
from trainer.data import read_folder
from trainer.ood_sets import load_image_set
from trainer.train import RUN_ENTRIES

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(2)
SPEC = PreprocessSpec(size=32, mean=(0.0,) * 3, std=(1.0,) * 3)


@pytest.fixture(scope="module")
def linked(tmp_path_factory, digits_small) -> Path:
    """ROOT/<class> -> STORE/<class> (symlinks), 12 PNGs per class for classes 3, 0 and 7, a link
    loop inside one class (STORE/3/back -> ROOT) and a dangling link. The digits are ones the
    tiny run never saw, so rwood-export accepts them as calibration images."""
    base = tmp_path_factory.mktemp("linked")
    root, store = base / "root", base / "store"
    root.mkdir()
    for c in (3, 0, 7):
        name = str(digits_small["classes"][c])
        (store / name).mkdir(parents=True)
        unseen = np.flatnonzero(digits_small["labels"] == c)
        unseen = unseen[unseen >= real_images.TINY_RUN_ROWS]
        for i, r in enumerate(unseen[:12]):
            Image.fromarray(digits_small["images"][r]).save(store / name / f"{i:02d}.png")
        (root / name).symlink_to(store / name, target_is_directory=True)
    (store / "3" / "back").symlink_to(root, target_is_directory=True)
    (store / "7" / "gone.png").symlink_to("missing.png")
    return root


def _ok(res) -> str:
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def _refused(res, *words: str) -> str:
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), res.stderr
    for w in words:
        assert w in line, (w, line)
    return line


def test_every_reader_follows_symlinked_class_folders(linked: Path, tmp_path: Path, caplog):
    d = read_folder(linked, 32)
    assert d.class_names == ["0", "3", "7"] and len(d.images) == 36
    assert "symlink to 'missing.png'" in caplog.text, "the dangling link is named in the log"
    images, labels = load_image_set("linked", linked, SPEC, class_names=d.class_names)
    assert sorted(labels.tolist()) == sorted(d.labels.tolist())
    assert sorted(map(bytes, images)) == sorted(map(bytes, d.images))
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").symlink_to(empty / "a", target_is_directory=True)
    with pytest.raises(DataError, match="no image files"):
        read_folder(empty, 32)


def test_train_refuses_an_existing_run_and_force_replaces_it(linked: Path, tiny_run: Path,
                                                              tmp_path: Path):
    """Before: --out of a finished run trained over it without a word."""
    model = tiny_run / "model.pt"
    stamp = model.stat().st_mtime_ns
    _refused(CliRunner().invoke(train_main, ["--out", str(tiny_run), "--device", "cpu",
                                             "--dataset", "folder", "--data", str(linked)]),
             "already holds a run", "--resume", "--force")
    assert model.stat().st_mtime_ns == stamp
    # a stale run: its metrics and eval report must not survive --force
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"stale": true}\n')
    (out / "notes.txt").write_text("the user's own file\n")
    args = ["--out", str(out), "--device", "cpu", "--dataset", "folder", "--data", str(linked),
            "--arch", "small_cnn", "--epochs", "1", "--batch-size", "16",
            "--calibration-fraction", "0.2", "--seed", "0"]
    _refused(CliRunner().invoke(train_main, args), "metrics.jsonl, eval")
    _ok(CliRunner().invoke(train_main, [*args, "--force"]))
    assert "stale" not in (out / "metrics.jsonl").read_text() and not (out / "eval").exists()
    assert (out / "notes.txt").exists(), "--force deletes only what a run writes"
    info = json.loads((out / "config.json").read_text())
    assert info["class_names"] == ["0", "3", "7"]
    assert info["data"]["n_train"] + info["data"]["n_calibration"] == 36
    assert set(RUN_ENTRIES) >= {p.name for p in out.iterdir()} - {"notes.txt"}


def test_eval_reads_a_symlinked_folder_and_refuses_an_existing_report(linked: Path,
                                                                      tiny_run: Path,
                                                                      tmp_path: Path):
    """Before: "no image files found" for the same folder rwood-train had read."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text("{}")
    args = [str(tiny_run), "--ood", f"linked={linked}", "--out", str(out), "--device", "cpu"]
    _refused(CliRunner().invoke(eval_main, args), "already holds a report", "--force")
    assert (out / "report.json").read_text() == "{}"
    _ok(CliRunner().invoke(eval_main, [*args, "--force"]))
    report = json.loads((out / "report.json").read_text())
    assert "linked" in json.dumps(report)


def test_export_calibrates_on_a_symlinked_folder(linked: Path, tiny_run: Path, tmp_path: Path):
    """Before: 0 calibration images (rglob does not enter symlinked folders)."""
    text = _ok(CliRunner().invoke(export_main, [str(tiny_run), "--out", str(tmp_path / "b"),
                                                "--calibration", str(linked), "--k", "5"]))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["threshold"]["n_samples"] == 36, text
    assert os.path.realpath(linked) in manifest["threshold"]["source"]
