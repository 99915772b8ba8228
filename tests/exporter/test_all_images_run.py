"""A run trained with --calibration-fraction 0 (the benchmark presets' setting), end to end:

- training uses and banks every image, writes no calibration.npz (--force removes one an earlier
  run left in the folder, whose images would now be in the bank), and follows the released
  learning-rate schedule step by step;
- `rwood-export` without --calibration stops with one line saying how to give a calibration set
  (never a threshold taken from the bank); with --calibration it writes a bundle calibrated on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from detector_server.bundle import load_bundle
from exporter.cli import export_main
from trainer.config import resolve_config
from trainer.schedule import learning_rate
from trainer.train import train

N_IMAGES, BATCH, EPOCHS, WARMUP = 96, 32, 3, 1          # 3 steps per epoch, all 96 images


@pytest.fixture(scope="module")
def all_images_run(tmp_path_factory, digits_small) -> Path:
    root = tmp_path_factory.mktemp("all_images")
    np.savez(root / "digits.npz", images=digits_small["images"][:N_IMAGES],
             labels=digits_small["labels"][:N_IMAGES], classes=digits_small["classes"])
    out = root / "run"
    out.mkdir()
    np.savez(out / "calibration.npz", images=digits_small["images"][:30])    # an earlier run's
    torch.set_num_threads(2)
    cfg = resolve_config(overrides=dict(
        dataset="npz", data=str(root / "digits.npz"), arch="small_cnn", epochs=EPOCHS,
        batch_size=BATCH, lr=0.05, lr_schedule="released", warmup_epochs=WARMUP,
        calibration_fraction=0.0, out=str(out), device="cpu", seed=0, log_every=1, k=10))
    return train(cfg, force=True)


def test_every_image_is_trained_and_banked(all_images_run: Path, digits_small) -> None:
    run = all_images_run
    assert not (run / "calibration.npz").exists()
    rec = json.loads((run / "config.json").read_text())
    assert rec["data"]["n_train"] == N_IMAGES and rec["data"]["n_calibration"] == 0
    assert rec["runtime"]["steps_per_epoch"] == N_IMAGES // BATCH
    with np.load(run / "bank.npz") as bank:
        np.testing.assert_array_equal(bank["indices"], np.arange(N_IMAGES))
        np.testing.assert_array_equal(bank["labels"], digits_small["labels"][:N_IMAGES])


def test_training_follows_the_released_schedule(all_images_run: Path) -> None:
    lines = [json.loads(x) for x in (all_images_run / "metrics.jsonl").read_text().splitlines()]
    steps = N_IMAGES // BATCH
    assert [r["global_step"] for r in lines] == list(range(1, EPOCHS * steps + 1))
    for r in lines[:-1]:   # the rate logged after step s is the one step s + 1 will use
        want = learning_rate(r["global_step"], schedule="released", steps_per_epoch=steps,
                             epochs=EPOCHS, warmup_epochs=WARMUP, lr=0.05, warmup_from=1e-3,
                             min_lr_ratio=1e-3)
        assert abs(r["lr"] - want) <= 1e-12
    assert lines[steps - 2]["lr"] == 1e-3                     # epoch 0 held at warmup_from


def test_export_needs_calibration_and_says_how(all_images_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(export_main, [str(all_images_run), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "--calibration PATH" in line
    assert str(all_images_run / "calibration.npz") in line
    assert not (tmp_path / "b").exists()


def test_export_with_calibration_writes_a_bundle(all_images_run: Path, tmp_path: Path,
                                                 id_images: np.ndarray) -> None:
    cal = tmp_path / "held_out.npz"
    np.savez(cal, images=id_images[:200])          # digits this run never saw
    result = CliRunner().invoke(export_main, [str(all_images_run), "--out", str(tmp_path / "b"),
                                              "--calibration", str(cal), "--k", "10",
                                              "--threads", "2"])
    assert result.exit_code == 0, result.output
    m = load_bundle(tmp_path / "b").manifest
    assert m.threshold.source == f"npz:{cal.resolve()}" and m.threshold.n_samples == 200
    assert m.training["data"]["n_calibration"] == 0
