"""`rwood-train` (trainer/cli.py): --help lists every choice; bad input ends with exit status 2 and one
"error:" line naming the file/field, never a traceback. Errors are raised before any training step,
so these tests are fast (CliRunner in process; one real subprocess for --help)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer.cli import train_main
from trainer.config import PRESETS
from trainer.data import list_datasets
from trainer.losses import list_losses
from trainer.networks import list_models

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)   # none of these may start a real training run


@pytest.fixture(scope="module")
def images(digits_small) -> dict:
    return {"images": digits_small["images"][:100], "labels": digits_small["labels"][:100],
            "classes": digits_small["classes"]}


def _run(args: list[str]):
    """Invoke in process, on the CPU. Every case here fails before training; to be sure a
    mistake in a test cannot start a long run, the data is never the 10-epoch digits default."""
    if "--device" not in args:
        args = [*args, "--device", "cpu"]
    if "--resume" not in args and "--config" not in args and "--dataset" not in args:
        args = [*args, "--dataset", "npz", "--data", "/nonexistent/never-read.npz"]
    return CliRunner().invoke(train_main, args)


def _assert_one_line_error(result, *words: str) -> str:
    """Exit 2, no traceback, exactly one 'error:' line (the last one), naming `words`."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _assert_usage_error(result, option: str, value: str) -> None:
    """click's own usage errors (bad choice): the same single 'error:' line, naming option/value."""
    line = _assert_one_line_error(result, option, value)
    assert line.endswith("(see --help)"), line


# ------------------------------------------------------------------------------ --help
def test_help_lists_every_choice():
    result = CliRunner().invoke(train_main, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())            # undo click's line wrapping
    for group in (list_datasets(), list_models(), list_losses(), sorted(PRESETS),
                  ["auto", "cpu", "cuda"]):
        assert "|".join(group) in text, group
    for option in ("--dataset", "--data", "--arch", "--loss", "--preset", "--epochs",
                   "--batch-size", "--lr", "--out", "--device", "--resume", "--seed", "--config"):
        assert option in text


def test_help_through_python_m_in_a_real_process():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "trainer.cli", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--preset [demo|imagenet100-finetune|official|paper]" in r.stdout
    assert r.stderr == "" or "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ bad data
def test_missing_data_file(tmp_path):
    f = tmp_path / "nope.npz"
    r = _run(["--dataset", "npz", "--data", str(f), "--out", str(tmp_path / "run")])
    _assert_one_line_error(r, str(f), "not found")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("what,words", [
    ("no_images", ["'images'", "missing key"]),
    ("float_images", ["'images'", "uint8", "float32"]),
    ("label_out_of_range", ["'labels'", "[0, 9]", "12"]),
    ("float_labels", ["'labels'", "integer"]),
])
def test_bad_npz_contents(tmp_path, images, what, words):
    f = tmp_path / f"{what}.npz"
    arrays = dict(images)
    if what == "no_images":
        arrays["pixels"] = arrays.pop("images")
    elif what == "float_images":
        arrays["images"] = arrays["images"].astype(np.float32)
    elif what == "label_out_of_range":
        arrays["labels"] = arrays["labels"].copy()
        arrays["labels"][5] = 12
    elif what == "float_labels":
        arrays["labels"] = arrays["labels"].astype(np.float32)
    np.savez(f, **arrays)
    r = _run(["--dataset", "npz", "--data", str(f), "--out", str(tmp_path / "run")])
    _assert_one_line_error(r, str(f), *words)


def test_missing_cifar_root_names_the_folder(tmp_path):
    r = _run(["--dataset", "cifar10", "--data", str(tmp_path / "cifar"),
              "--out", str(tmp_path / "run")])
    _assert_one_line_error(r, str(tmp_path / "cifar"), "--download")


def test_batch_size_larger_than_the_data(tmp_path, images):
    f = tmp_path / "c.npz"
    np.savez(f, **images)
    r = _run(["--dataset", "npz", "--data", str(f), "--batch-size", "128",
              "--out", str(tmp_path / "run")])
    # 100 images, 20 held out (10% raised to the 20 rwood-export needs); the flag and a value
    # that works are named
    _assert_one_line_error(r, "--batch-size", "128", "80 training images", "use 80 or less")


# ------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("option,value", [("--preset", "offical"), ("--arch", "resnet9000"),
                                          ("--loss", "triplet"), ("--dataset", "svhn"),
                                          ("--device", "tpu")])
def test_unknown_choice_on_the_command_line(tmp_path, option, value):
    r = _run([option, value, "--out", str(tmp_path / "run")])
    _assert_usage_error(r, option, value)


@pytest.mark.parametrize("key,value,words", [
    ("arch", "resnet9000", ["'arch'", "resnet9000", "small_cnn"]),
    ("loss", "triplet", ["'loss'", "triplet", "reweightood"]),
    ("learning_rate", 0.1, ["'learning_rate'", "unknown setting"]),
    ("epochs", "ten", ["'epochs'", "expected int"]),
    ("image_size", "big", ["'image_size'", "expected int or null"]),
])
def test_bad_values_in_a_config_file(tmp_path, images, key, value, words):
    data = tmp_path / "c.npz"
    np.savez(data, **images)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"dataset": "npz", "data": str(data), "batch_size": 32, key: value}))
    r = _run(["--config", str(cfg), "--out", str(tmp_path / "run")])
    _assert_one_line_error(r, *words)


@pytest.mark.parametrize("args,words", [
    (["--epochs", "0"], ["--epochs", ">= 1"]),
    (["--calibration-fraction", "0.7"], ["--calibration-fraction"]),
    (["--classes", "0-20"], ["--classes", "0-20"]),
    (["--config", "/nonexistent/cfg.toml"], ["/nonexistent/cfg.toml", "not found"]),
])
def test_invalid_settings(tmp_path, images, args, words):
    data = tmp_path / "c.npz"
    np.savez(data, **images)
    r = _run(["--dataset", "npz", "--data", str(data), *args, "--out", str(tmp_path / "run")])
    _assert_one_line_error(r, *words)


def test_resume_without_a_checkpoint(tmp_path):
    r = _run(["--resume", "--out", str(tmp_path / "run")])
    _assert_one_line_error(r, str(tmp_path / "run" / "checkpoints" / "last.pt"), "--resume")


def test_resume_from_a_corrupt_checkpoint(tmp_path):
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"\x80\x02 truncated")
    r = _run(["--resume", "--out", str(tmp_path / "run")])
    _assert_one_line_error(r, str(ck), "cannot read checkpoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_a_gpu(tmp_path):
    r = _run(["--device", "cuda", "--out", str(tmp_path / "run")])
    _assert_one_line_error(r, "--device", "CUDA")


def test_bad_ood_option():
    r = _run(["--ood", "no-equals-sign"])
    _assert_one_line_error(r, "--ood", "NAME=PATH", "no-equals-sign")
