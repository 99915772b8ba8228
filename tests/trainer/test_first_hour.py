"""The first hour on your own data (issue points 15.1-15.9, 15.16-15.20, 15.22, 16.8, 16.14): no
silent defaults, no late failures, errors that name the flag, plots that tell the truth.

CLI behaviour goes through click's runner (one subprocess for logging); plots are checked
through their data (bar positions against the threshold, legend labels). Real pixels: digits
and the photographs that ship with scikit-learn (tests/real_images.py). The whole journey (a
folder of photos to a bundle, and the fine-tuning preset) is tests/exporter/test_journey.py.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import real_images
import torch
from click.testing import CliRunner
from PIL import Image

from detector_server.errors import CheckpointError, DataError, InputError
from detector_server.knn import default_k
from detector_server.metrics import threshold_at_tpr
from trainer import progress
from trainer.cli import train_main
from trainer.cli_eval import eval_main
from trainer.config import resolve_config
from trainer.data import calibration_split, load_dataset, parse_classes
from trainer.evaluate import Evaluation
from trainer.networks import create_model
from trainer.networks.weights import load_state_dict_file
from trainer.prepare import normalization, prepare_data
from trainer.report import _embedding_figure, _histogram_figure, class_colours

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _error_line(result) -> str:
    """The single 'error:' line of a CLI that exited 2 without a traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _train(args: list[str]):
    return CliRunner().invoke(train_main, [*args, "--device", "cpu"])


@pytest.fixture(scope="module")
def digits100(digits_small, tmp_path_factory) -> Path:
    """100 real digits (10 per class) with class names."""
    return _npz(tmp_path_factory.mktemp("d100") / "d100.npz", images=digits_small["images"][:100],
                labels=digits_small["labels"][:100], classes=digits_small["classes"])


# ------------------------------------------------------------------------------ 15.1 input size
def test_npz_default_size_is_its_native_size_and_logged(tmp_path, digits_small, caplog):
    caplog.set_level(logging.INFO)
    big = np.stack([np.asarray(Image.fromarray(a).resize((64, 64))) for a in
                    digits_small["images"][:20]])
    f = _npz(tmp_path / "d64.npz", images=big, labels=digits_small["labels"][:20],
             classes=digits_small["classes"])
    d = load_dataset("npz", str(f))
    assert d.images.shape[1:] == (64, 64, 3)               # was 32
    np.testing.assert_array_equal(d.images, big)           # native: not resized at all
    assert "image size 64: the native size of d64.npz" in caplog.text


def test_folder_default_size_follows_the_documented_rule(tmp_path, ood_images, caplog):
    caplog.set_level(logging.INFO)
    photos = tmp_path / "photos"
    real_images.write_photo_classes(photos, per_class=2, classes=real_images.PHOTO_CLASSES[:2])
    assert load_dataset("folder", str(photos)).images.shape[1:] == (224, 224, 3)   # was 32
    assert "image size 224" in caplog.text and "capped at 224" in caplog.text
    small = tmp_path / "small"
    for c in ("a", "b"):
        (small / c).mkdir(parents=True)
        for i, side in enumerate((48, 80)):
            Image.fromarray(ood_images[i]).resize((side, side)).save(small / c / f"{i}.png")
    assert load_dataset("folder", str(small)).images.shape[1:] == (48, 48, 3)  # smallest image
    tiny = tmp_path / "tiny"
    (tiny / "a").mkdir(parents=True)
    Image.fromarray(ood_images[0]).resize((8, 8)).save(tiny / "a" / "x.png")
    assert load_dataset("folder", str(tiny)).images.shape[1:] == (32, 32, 3)   # never below 32
    assert "upsampled from 8" in caplog.text


def test_rwood_train_records_the_native_size(tmp_path, digits_small):
    big = np.stack([np.asarray(Image.fromarray(a).resize((40, 40))) for a in
                    digits_small["images"][:100]])
    f = _npz(tmp_path / "d40.npz", images=big, labels=digits_small["labels"][:100],
             classes=digits_small["classes"])
    r = _train(["--dataset", "npz", "--data", str(f), "--epochs", "1", "--batch-size", "32",
                "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preprocess"]["size"] == 40


# ------------------------------------------------------------------------------ 15.2 fine-tuning
def test_finetune_preset_without_pretrained_weights_is_refused(tmp_path, digits100):
    r = _train(["--preset", "imagenet100-finetune", "--dataset", "npz", "--data", str(digits100),
                "--out", str(tmp_path / "run")])
    line = _error_line(r)
    assert "--pretrained" in line and "random" in line
    assert not (tmp_path / "run").exists()                  # refused before anything is written


def test_normalisation_follows_the_weights_unless_chosen(digits_small, caplog):
    caplog.set_level(logging.INFO)
    images = digits_small["images"][:50]
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization(None, "weights.pth", images) == imagenet
    assert normalization("imagenet", None, images) == imagenet
    data_stats = normalization(None, None, images)
    assert normalization("data", "weights.pth", images) == data_stats != imagenet
    assert "ImageNet's mean/std" in caplog.text


# ------------------------------------------------------------------------------ 15.3 K
def test_default_k_bites_only_when_k_is_a_large_share_of_a_class(caplog):
    caplog.set_level(logging.INFO)
    assert default_k(10, 50_000, [5000] * 10) == 100          # CIFAR-10: CIDER's K
    assert default_k(10, 9_500, [950] * 10) == 100            # the paper-table runs: unchanged
    assert default_k(100, 50_000, [500] * 100) == 300         # CIFAR-100: 60% of a class, kept
    assert "K=" not in caplog.text
    assert default_k(6, 827, [137, 138, 138, 138, 138, 138]) == 13   # the demo's bank
    assert default_k(8, 72, [9] * 8) == 1                     # the 72-row bank
    assert "--k" in caplog.text and "smallest class" in caplog.text
    assert default_k(10, 40) == 40                            # no class sizes: capped at the bank


def test_eval_and_export_choose_k_by_the_rule(tiny_run, tmp_path, caplog):
    """The tiny run's bank has 95 rows per class: K=100 would be past two thirds of a class."""
    import shutil

    from trainer.run_dir import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["k"] = None
    (run / "config.json").write_text(json.dumps(cfg))
    caplog.set_level(logging.INFO)
    assert RunDir(run).choose_k(None, 950) == 9
    assert "K=9: the default K=100 would be 105% of the smallest class" in caplog.text
    caplog.clear()
    assert RunDir(run).choose_k(80, 950) == 80                 # an explicit K is kept, with advice
    assert "smaller --k (about 9)" in caplog.text


# ------------------------------------------------------------------------------ 15.4 --id-test
def test_id_test_with_classes_the_model_never_saw_warns_naming_them(tiny_run, id_images,
                                                                     ood_images, tmp_path, caplog):
    root = tmp_path / "id_test"
    for name, images in (("3", id_images[:5]), ("cats", ood_images[:4]), ("dogs", ood_images[4:7])):
        (root / name).mkdir(parents=True)
        for i, a in enumerate(images):
            Image.fromarray(a).save(root / name / f"{i}.png")
    caplog.set_level(logging.WARNING)
    r = CliRunner().invoke(eval_main, [str(tiny_run), "--id-test", str(root), "--device", "cpu",
                                       "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    warning = [m for m in caplog.messages if "never trained on" in m]
    assert len(warning) == 1 and "cats (4), dogs (3)" in warning[0] and "3 (" not in warning[0]
    npz = _npz(tmp_path / "id.npz", images=ood_images[:6], labels=np.array([0, 0, 1, 1, 2, 2]),
               classes=np.array(["3", "zebra", "yak"]))
    caplog.clear()
    from trainer.ood_sets import load_image_set
    from trainer.run_dir import RunDir
    info = RunDir(tiny_run).info
    _, labels = load_image_set("id", npz, info.preprocess, list(info.class_names))
    assert labels.tolist() == [3, 3, -1, -1, -1, -1]         # mapped by name
    assert "yak (2), zebra (2)" in caplog.text


# ------------------------------------------------------------------------------ 15.5 calibration
def test_calibration_split_reaches_the_export_minimum_when_the_data_allows(digits_small):
    labels = digits_small["labels"][:100]                     # 10 per class
    assert len(calibration_split(labels, 0.05, seed=0)[1]) == 10   # 5%, one per class
    train, cal = calibration_split(labels, 0.05, seed=0, minimum=20)
    assert len(cal) == 20 and np.bincount(labels[cal]).tolist() == [2] * 10
    assert np.intersect1d(train, cal).size == 0 and len(train) + len(cal) == 100
    few = labels[:30]                                         # 3 per class: at most 1 each
    assert len(calibration_split(few, 0.05, seed=0, minimum=20)[1]) == 10


def test_training_warns_when_the_split_is_too_small_for_export(tmp_path, digits_small, caplog):
    caplog.set_level(logging.INFO)
    f = _npz(tmp_path / "d30.npz", images=digits_small["images"][:30],
             labels=digits_small["labels"][:30], classes=digits_small["classes"])
    cfg = resolve_config(overrides=dict(dataset="npz", data=str(f), batch_size=8))
    d = prepare_data(cfg)
    assert len(d.cal_idx) == 10
    assert "fewer than the 20 rwood-export needs" in caplog.text
    assert "rwood-export --calibration PATH" in caplog.text
    caplog.clear()
    f100 = _npz(tmp_path / "d100.npz", images=digits_small["images"][:100],
                labels=digits_small["labels"][:100], classes=digits_small["classes"])
    d = prepare_data(resolve_config(overrides=dict(dataset="npz", data=str(f100), batch_size=8)))
    assert len(d.cal_idx) == 20
    assert "raised to about --calibration-fraction 0.20" in caplog.text


# ------------------------------------------------------------------------------ 15.7 flags
def test_errors_name_the_flag_and_a_value_that_works(tiny_run, tiny_bundle, tmp_path,
                                                     photo_jpeg_files):
    r = CliRunner().invoke(eval_main, [str(tiny_run), "--batch-size", "0", "--device", "cpu"])
    assert "--batch-size" in _error_line(r) and "'batch_size'" not in r.stderr
    from exporter.cli import export_main
    r = CliRunner().invoke(export_main, [str(tiny_run), "--out", str(tmp_path / "b"),
                                         "--k", "5000"])
    line = _error_line(r)
    assert "--k" in line and "use 950 or less" in line
    from detector_server.score_cli import score_main
    r = CliRunner().invoke(score_main, [str(tiny_bundle), str(photo_jpeg_files[0].parent),
                                        "--out", str(tmp_path / "s.csv"), "--batch-size", "0"])
    assert "--batch-size" in _error_line(r)


# ------------------------------------------------------------------------------ 15.8 bundle/run
def test_a_bundle_where_a_run_is_expected_and_the_reverse(tiny_run, tiny_bundle, tmp_path,
                                                          photo_jpeg_files):
    from detector_server.score_cli import score_main
    from detector_server.serve_cli import serve_main
    from exporter.cli import export_main

    for cmd, args in ((eval_main, [str(tiny_bundle), "--device", "cpu"]),
                      (export_main, [str(tiny_bundle), "--out", str(tmp_path / "b")])):
        line = _error_line(CliRunner().invoke(cmd, args))
        assert "this is a bundle" in line and "take a run directory" in line
    for cmd, args in ((serve_main, [str(tiny_run), "--address", "127.0.0.1:0"]),
                      (score_main, [str(tiny_run), str(photo_jpeg_files[0].parent),
                                    "--out", str(tmp_path / "s.csv")])):
        line = _error_line(CliRunner().invoke(cmd, args))
        assert "training run directory" in line and "rwood-export RUN_DIR --out BUNDLE" in line


# ------------------------------------------------------------------------------ 15.9 weights
@pytest.fixture(scope="module")
def encoder_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=2).encoder.state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module", "lightning", "ours"])
def test_common_weight_file_wrappers_are_accepted(tmp_path, encoder_state, wrap, caplog):
    caplog.set_level(logging.INFO)
    prefixed = {f"module.{k}": v for k, v in encoder_state.items()}
    obj = {"plain": encoder_state, "state_dict": {"state_dict": encoder_state, "epoch": 3},
           "model": {"model": encoder_state}, "module": prefixed,
           "lightning": {"state_dict": {f"backbone.{k}": v for k, v in encoder_state.items()},
                         "optimizer_states": []},
           "ours": {"format_version": 1, "model": {
               **{f"encoder.{k}": v for k, v in encoder_state.items()},
               "head.0.weight": torch.zeros(4, 4)}}}[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    net = create_model("small_cnn", num_classes=3, pretrained=str(path))
    for k, v in encoder_state.items():
        torch.testing.assert_close(net.encoder.state_dict()[k], v, atol=0, rtol=0)
    assert f"loaded {len(encoder_state)} tensors" in caplog.text
    if wrap == "ours":
        assert "left out 1: head.0.weight" in caplog.text


def test_weight_files_that_are_not_state_dicts_say_what_is_expected(tmp_path):
    text = tmp_path / "weights.txt"
    text.write_text("conv1.weight: 0.1 0.2 0.3\n")
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(text)
    assert "not a PyTorch weights file" in str(e.value) and "weights_only=False" not in str(e.value)
    assert "torch.save(model.state_dict(), PATH)" in str(e.value)
    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), whole)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(whole)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("run code from the file)")      # not cut off
    assert "torch.nn.modules.linear.Linear" in msg and "model.state_dict()" in msg
    assert "weights_only=False" not in msg


def test_pretrained_help_says_what_format_is_expected():
    help_text = " ".join(CliRunner().invoke(train_main, ["--help"]).output.split())
    assert "torch.save(model.state_dict(), PATH)" in help_text and "'module.'" in help_text


# ------------------------------------------------------------------------------ 15.16 output
def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    bar = progress.Progress(range(4), desc="embedding x", unit="batches")
    bar.set_postfix(loss="0.5")
    assert list(bar) == [0, 1, 2, 3]
    lines = [m for m in caplog.messages if m.startswith("embedding x:")]
    assert lines[0].startswith("embedding x: 1/4 batches (25%)") and "loss=0.5" in lines[0]
    assert lines[-1].startswith("embedding x: done, 4 batches")


def test_rwood_eval_logs_progress_off_a_terminal(tiny_run, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    r = CliRunner().invoke(eval_main, [str(tiny_run), "--device", "cpu", "--batch-size", "16",
                                       "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    assert any(m.startswith("embedding calibration (50 images): 1/4 batches")
               for m in caplog.messages)


def test_train_with_ood_prints_the_table_and_names_no_foreign_flag(tmp_path, digits100,
                                                                   ood_images, caplog):
    caplog.set_level(logging.INFO)
    ood = _npz(tmp_path / "photos.npz", images=ood_images[:40], labels=np.full(40, -1))
    r = _train(["--dataset", "npz", "--data", str(digits100), "--epochs", "1", "--batch-size",
                "32", "--k", "3", "--out", str(tmp_path / "run"), "--ood", f"photos={ood}"])
    assert r.exit_code == 0, r.output
    assert "| OOD set | N | FPR@95" in r.output and "| photos | 40 |" in r.output
    warnings = [m for m in caplog.messages if "no test split" in m]
    assert warnings and all("rwood-eval --id-test" in m for m in warnings)


def test_verbose_means_this_projects_debug_lines(tmp_path):
    png = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(png)
    code = ("import logging; from detector_server.cli_common import setup_logging; "
            "setup_logging(True); logging.getLogger('trainer.x').debug('ours'); "
            "from PIL import Image; Image.open(%r).load()" % str(png))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "DEBUG trainer.x: ours" in r.stderr
    assert "PIL" not in r.stderr, r.stderr[:500]


# ------------------------------------------------------------------------------ 15.18 classes
def test_classes_by_name_or_index():
    names = ["banded", "braided", "dotted", "zigzag"]
    assert parse_classes("dotted,banded", names) == [0, 2]
    assert parse_classes("braided, 3", names) == [1, 3] == parse_classes("1,zigzag", names)
    assert parse_classes("1-2", names) == [1, 2]
    with pytest.raises(InputError) as e:
        parse_classes("banded,striped", names)
    assert e.value.field == "classes" and "'striped'" in str(e.value) and "braided" in str(e.value)
    assert parse_classes("2", ["10", "2", "3"]) == [1]       # a name wins over an index


def test_training_logs_the_classes_kept_and_left_out(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "photos"
    real_images.write_photo_classes(root, per_class=2, classes=real_images.PHOTO_CLASSES[:3])
    cfg = resolve_config(overrides=dict(dataset="folder", data=str(root), image_size=32,
                                        classes="china_top_right,china_bottom_left",
                                        batch_size=2, calibration_fraction=0.0))
    d = prepare_data(cfg)
    assert d.full.class_names == ["china_bottom_left", "china_top_right"]
    assert ("training on 2 of 3 classes, relabelled: 0 china_bottom_left, 1 china_top_right; "
            "left out (usable as near-OOD): china_top_left") in caplog.text


# ------------------------------------------------------------------------------ 15.19, 15.20 plots
def _evaluation(id_scores, ood_scores, embeddings=None, labels=None, names=("a", "b")):
    thr = threshold_at_tpr(id_scores, 0.95)
    report = {"id": {"threshold@95": thr}, "ood": {"photos": {"fpr@95": 0.5}},
              "settings": {"feature": "penultimate"}}
    emb = embeddings or {"id": np.zeros((len(id_scores), 4), np.float32),
                         "photos": np.zeros((len(ood_scores), 4), np.float32)}
    return Evaluation(report, {"id": id_scores, "photos": ood_scores}, emb,
                      labels if labels is not None else np.zeros(len(id_scores), np.int64),
                      list(names))


def test_histogram_counts_images_and_the_threshold_matches_the_bars():
    """The issue's case: 24 ID images, one far below the rest, and 1,000 OOD images. The first-bin
    clipping used to move that image right of the threshold line, left of every bar."""
    rng = np.random.default_rng(0)
    id_scores = np.r_[-1.30, rng.uniform(-0.35, -0.2, 23)].astype(np.float32)
    ood_scores = rng.uniform(-1.2, -0.5, 1000).astype(np.float32)
    ev = _evaluation(id_scores, ood_scores)
    thr = ev.report["id"]["threshold@95"]
    assert int(np.sum(id_scores < thr)) == 1
    ax = _histogram_figure(ev).axes[0]
    assert "count" in ax.get_ylabel()
    bars = {label: [] for label in ("ID", "photos")}
    for container, label in zip(ax.containers, ("ID", "photos")):
        bars[label] = [(p.get_x(), p.get_x() + p.get_width(), p.get_height()) for p in container]
    line_x = [ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == "--"][0]
    assert line_x == pytest.approx(thr)
    for label, scores in (("ID", id_scores), ("photos", ood_scores)):
        assert sum(h for *_, h in bars[label]) == len(scores)              # counts, not density
        left = sum(h for lo, hi, h in bars[label] if hi <= thr + 1e-9)
        straddle = [b for b in bars[label] if b[0] < thr - 1e-9 < b[1] - 2e-9 and b[2]]
        assert left == int(np.sum(scores < thr)) and not straddle, label


def test_embedding_plot_has_a_discrete_legend_of_class_names():
    rng = np.random.default_rng(1)
    names = ["banded", "braided", "dotted", "zigzag", "woven", "pitted"]
    labels = np.repeat(np.arange(6), 4)                      # 24 ID points, 6 classes
    emb = {"id": rng.normal(size=(24, 8)).astype(np.float32),
           "photos": rng.normal(size=(1000, 8)).astype(np.float32)}
    ev = _evaluation(np.zeros(24, np.float32), np.zeros(1000, np.float32), emb, labels, names)
    fig = _embedding_figure(ev)
    assert len(fig.axes) == 1                                # no continuous colour bar
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("OOD: photos (100 of 1000)") and legend[1:] == names
    ood, *classes = ax.collections
    assert len(ood.get_offsets()) == 100                    # subsampled: 1,000 would hide 24
    assert ood.get_zorder() < min(c.get_zorder() for c in classes)
    assert ood.get_alpha() < min(c.get_alpha() for c in classes)
    ood_rgb = tuple(ood.get_edgecolor()[0][:3])
    for c in classes:
        r, g, b = c.get_facecolor()[0][:3]
        assert not (r == g == b) and (r, g, b) != ood_rgb    # no class is grey like the OOD
    colours = [tuple(c) for c in class_colours(18)]
    assert len(set(colours)) == 18 and all(not (c[0] == c[1] == c[2]) for c in colours)


# ------------------------------------------------------------------------------ 15.22 docs
def test_ood_and_k_help_are_the_same_and_readable():
    from exporter.cli import export_main

    def option(cmd, name):
        return next(p for p in cmd.params if p.name == name).help

    assert option(train_main, "ood") == option(eval_main, "ood")
    ks = {option(cmd, "k") for cmd in (train_main, eval_main, export_main)}
    assert len(ks) == 1 and "(100 / 300)" not in ks.pop()


def test_readme_mentions_the_extras_and_predicted_class():
    readme = (REPO / "README.md").read_text()
    for words in ("`[parquet]`", "`[plot]`", "predicted_class", "radius_per_class",
                  "torch.save(model.state_dict()"):
        assert words in readme, words


# ------------------------------------------------------------------------------ 16.8 labels
@pytest.mark.parametrize("labels,words", [
    (np.r_[np.arange(10).repeat(2)[:19], 99], ["labels found: 0-9, 99", "89 of the classes 0-99"]),
    (np.r_[np.zeros(19, np.int64), 5_000_000], ["label 5000000", "over the limit of 1000",
                                                "--max-classes"]),
])
def test_npz_labels_without_names_must_be_a_plausible_class_range(tmp_path, digits_small,
                                                                  labels, words):
    f = _npz(tmp_path / "l.npz", images=digits_small["images"][:20], labels=labels)
    with pytest.raises(DataError) as e:
        load_dataset("npz", str(f))
    assert e.value.field == "labels" and all(w in str(e.value) for w in words)
    r = _train(["--dataset", "npz", "--data", str(f), "--out", str(tmp_path / "run")])
    assert all(w in _error_line(r) for w in words)


def test_a_label_of_a_billion_is_refused_at_once(tmp_path, digits_small):
    f = _npz(tmp_path / "l.npz", images=digits_small["images"][:2], labels=np.array([0, 10**9]))
    with pytest.raises(DataError, match="over the limit of 1000"):
        load_dataset("npz", str(f))


def test_max_classes_admits_more_classes(tmp_path, digits_small):
    f = _npz(tmp_path / "many.npz", images=digits_small["images"][:1200], labels=np.arange(1200))
    with pytest.raises(DataError, match="label 1199 would make 1,200 classes"):
        load_dataset("npz", str(f))
    assert len(load_dataset("npz", str(f), max_classes=2000).class_names) == 1200


# ------------------------------------------------------------------------------ 16.14 non-finite
@pytest.mark.parametrize("name,text", [("c.json", '{"lr": 1e999}'), ("c.toml", "lr = inf"),
                                       ("n.toml", "temperature = nan")])
def test_non_finite_settings_in_a_config_file_are_refused(tmp_path, digits100, name, text):
    cfg = tmp_path / name
    cfg.write_text(text)
    r = _train(["--config", str(cfg), "--dataset", "npz", "--data", str(digits100),
                "--out", str(tmp_path / "run")])
    line = _error_line(r)
    assert str(cfg) in line and "finite" in line
    with pytest.raises(InputError, match="finite"):
        resolve_config(overrides={"m_b": float("inf")})


def test_a_diverging_run_stops_with_the_last_good_checkpoint(tmp_path, digits100, monkeypatch):
    """The loss turns NaN in the second epoch: training stops with an error, the epoch-1
    checkpoint is kept (finite weights), and no model.pt or bank is written."""
    from trainer import train as train_module

    real = train_module.create_loss

    def nan_in_epoch_two(name, **kw):
        loss, calls = real(name, **kw), [0]
        forward = loss.forward

        def wrapped(*a, **k):
            calls[0] += 1
            out = forward(*a, **k)
            return out * float("nan") if calls[0] > 2 else out    # 2 steps per epoch
        loss.forward = wrapped
        return loss
    monkeypatch.setattr(train_module, "create_loss", nan_in_epoch_two)
    out = tmp_path / "run"
    r = _train(["--dataset", "npz", "--data", str(digits100), "--epochs", "3", "--batch-size",
                "32", "--out", str(out)])
    line = _error_line(r)
    assert "the loss became nan at epoch 2" in line and "end of epoch 1" in line
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists() and not (out / "bank.npz").exists()


def test_an_infinite_learning_rate_from_the_flag_is_refused(tmp_path, digits100):
    line = _error_line(_train(["--dataset", "npz", "--data", str(digits100), "--lr", "inf",
                               "--out", str(tmp_path / "run")]))
    assert "--lr" in line and "finite" in line
