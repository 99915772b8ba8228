"""The first hour on your own data, as a script: a folder of large photographs arranged as
classes, two classes held out as near-OOD, rwood-train at 64 px, rwood-eval, rwood-export; and
the imagenet100-finetune preset with a local ResNet-50 weights file. Each step goes through the
command a user types (click's runner) and checks what the user is told.

Real JPEGs of 320-640 px cut from the photographs that ship with scikit-learn
(tests/real_images.py write_photo_classes); the ResNet-50 file is torchvision's architecture
saved by the test (randomly initialised: nothing is downloaded). Small and fast: 96 images,
one epoch.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import real_images
import torch
from click.testing import CliRunner

from detector_server.bundle import load_bundle
from exporter.cli import export_main
from trainer.cli import train_main
from trainer.cli_eval import eval_main

pytestmark = pytest.mark.timeout(600)

HELD_OUT = ("china_bottom_right", "flower_top_left")
KEPT = tuple(c for c in real_images.PHOTO_CLASSES if c not in HELD_OUT)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """ROOT/photos/<8 classes>/<12 JPEGs>, and ROOT/near_ood holding the two held-out classes."""
    root = tmp_path_factory.mktemp("journey")
    real_images.write_photo_classes(root / "photos", per_class=12)
    for name in HELD_OUT:
        shutil.copytree(root / "photos" / name, root / "near_ood" / name)
    return {"root": root, "photos": root / "photos", "near_ood": root / "near_ood"}


def _ok(result) -> str:
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return result.output


def test_folder_of_photos_to_a_bundle(photos, caplog):
    caplog.set_level(logging.INFO)
    root, run, bundle = photos["root"], photos["root"] / "run", photos["root"] / "bundle"
    torch.set_num_threads(2)

    # train: the held-out classes by name, at 64 px, one epoch
    _ok(CliRunner().invoke(train_main, [
        "--dataset", "folder", "--data", str(photos["photos"]), "--classes", ",".join(KEPT),
        "--image-size", "64", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
        "--out", str(run)]))
    log = caplog.text
    assert "training on 6 of 8 classes" in log and "china_bottom_right, flower_top_left" in log
    assert "calibration split: 20 held-out images" in log          # 5% of 72 = 6, raised to 20
    info = json.loads((run / "config.json").read_text())
    assert info["preprocess"]["size"] == 64 and info["class_names"] == sorted(KEPT)
    assert info["data"]["n_calibration"] == 20 and info["data"]["n_train"] == 52

    # evaluate: the held-out classes as near-OOD; K by the small-bank rule (52 rows, ~9 a class)
    caplog.clear()
    out = _ok(CliRunner().invoke(eval_main, [
        str(run), "--ood", f"near={photos['near_ood']}", "--device", "cpu",
        "--out", str(root / "report")]))
    assert "| near | 24 |" in out
    assert "K=1: the default K=100" in caplog.text and "--k" in caplog.text
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["settings"]["k"] == 1 and report["settings"]["id_test"]["n"] == 20
    radii = report["embedding_quality"]["penultimate"]["radius_per_class"]
    assert sorted(radii) == sorted(KEPT)                          # keyed by class name
    for plot in ("score_histograms.png", "roc.png", "embedding_2d.png"):
        assert (root / "report" / plot).is_file()

    # the whole folder as ID test set: the two held-out classes are named
    caplog.clear()
    _ok(CliRunner().invoke(eval_main, [str(run), "--id-test", str(photos["photos"]),
                                       "--device", "cpu", "--out", str(root / "report_all")]))
    assert "never trained on: china_bottom_right (12), flower_top_left (12)" in caplog.text

    # export: the run's own split is enough; the training images themselves are refused
    _ok(CliRunner().invoke(export_main, [str(run), "--out", str(bundle)]))
    manifest = load_bundle(bundle).manifest
    assert manifest.k == 1 and manifest.input_size == 64 and manifest.threshold.n_samples == 20
    r = CliRunner().invoke(export_main, [str(run), "--out", str(root / "b2"), "--calibration",
                                         str(photos["photos"] / KEPT[0])])
    assert r.exit_code == 2 and "calibration images are training images" in r.stderr
    n_banked = len(np.load(run / "bank.npz")["labels"])
    assert n_banked == 52 and not (root / "b2").exists()


def test_finetune_preset_with_a_local_resnet50_file(photos, caplog):
    from torchvision.models import resnet50

    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    weights = photos["root"] / "resnet50.pth"
    state = resnet50(weights=None).state_dict()
    torch.save(state, weights)
    run = photos["root"] / "run_ft"
    _ok(CliRunner().invoke(train_main, [
        "--preset", "imagenet100-finetune", "--pretrained", str(weights), "--dataset", "folder",
        "--data", str(photos["photos"]), "--classes", ",".join(KEPT), "--image-size", "64",
        "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(run)]))
    encoder_tensors = len(state) - 2
    assert (f"loaded {encoder_tensors} tensors into the ResNet50Encoder encoder; left out 2: "
            "fc.bias, fc.weight") in caplog.text
    assert "ImageNet's mean/std (the pretrained weights expect them" in caplog.text
    info = json.loads((run / "config.json").read_text())
    assert info["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert info["preprocess"]["std"] == [0.229, 0.224, 0.225]
    model = torch.load(run / "model.pt", weights_only=True)["model"]
    torch.testing.assert_close(model["encoder.conv1.weight"], state["conv1.weight"],
                               atol=0, rtol=0)                   # frozen: exactly the file's
    assert not torch.equal(model["encoder.layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
