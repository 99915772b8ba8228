"""Evaluation of a run: end-to-end on the tiny run and real data, and each piece against brute force."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import real_images
from click.testing import CliRunner

from detector_server.errors import CheckpointError, DataError, InputError
from detector_server.knn import KNNScorer, build_index
from detector_server.metrics import ood_metrics
from detector_server.preprocess import PreprocessSpec, decode_image, to_model_array
from trainer.embedding_quality import embedding_quality
from trainer.evaluate import evaluate
from trainer.mahalanobis import MahalanobisScorer
from trainer.ood_sets import load_image_set, parse_set_arg, photo_patches

SPEC = PreprocessSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def small_sets(digits_small, ood_images, tmp_path_factory) -> dict[str, str]:
    """Real sets as npz files: 400 digits the tiny run never saw (ID, with labels), 200 grey photo
    patches (one channel, like MNIST), 200 colour photo patches (OOD, labels -1)."""
    root = tmp_path_factory.mktemp("sets")
    rows = slice(real_images.TINY_RUN_ROWS, real_images.TINY_RUN_ROWS + 400)
    sets = {"id": (digits_small["images"][rows], digits_small["labels"][rows]),
            "gray_photos": (real_images.gray_photo_patches()[:200], np.full(200, -1)),
            "photos": (ood_images[:200], np.full(200, -1))}
    out = {}
    for name, (images, labels) in sets.items():
        np.savez(root / f"{name}.npz", images=images, labels=labels)
        out[name] = str(root / f"{name}.npz")
    return out


@pytest.fixture(scope="module")
def bank(tiny_run: Path) -> dict[str, np.ndarray]:
    with np.load(tiny_run / "bank.npz") as f:
        return {k: f[k] for k in f.files}


def test_rwood_eval_end_to_end_equals_direct_knn(tiny_run, small_sets, tmp_path):
    import torch

    from trainer.bank import embed_arrays
    from trainer.checkpoint import load_model
    from trainer.cli_eval import eval_main

    out = tmp_path / "report"
    res = CliRunner().invoke(eval_main, [str(tiny_run), "--id-test", small_sets["id"],
                                         "--ood", f"gray_photos={small_sets['gray_photos']}",
                                         "--ood", f"photos={small_sets['photos']}",
                                         "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("report.json", "report.md", "score_histograms.png", "roc.png", "embedding_2d.png"):
        assert (out / f).stat().st_size > 1000 or f.endswith(".json"), f
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["k"] == 10 and report["settings"]["id_test"]["n"] == 400
    for name in ("gray_photos", "photos"):
        for m in ("fpr@95", "auroc", "aupr_in", "aupr_out"):
            assert 0.0 <= report["ood"][name][m] <= 1.0
    assert 0.0 <= report["accuracy"]["knn"] <= 1.0 and report["accuracy"]["linear_head"] is None
    md = (out / "report.md").read_text()
    assert "| gray_photos | 200 |" in md and "**average**" in md and "dispersion" in md

    # the same numbers straight from the runtime's scorer on the run's bank
    torch.set_num_threads(2)
    model, info = load_model(tiny_run)
    with np.load(tiny_run / "bank.npz") as f:
        scorer = KNNScorer(build_index(f["penultimate"]), f["labels"], k=10)
    scores = {}
    for name in ("id", "gray_photos", "photos"):
        images, labels = load_image_set(name, small_sets[name], info.preprocess)
        emb = embed_arrays(model, images, batch_size=256)["feature"]
        scores[name], pred = scorer.score(emb)
        if name == "id":
            assert report["accuracy"]["knn"] == pytest.approx(np.mean(pred == labels))
    for name in ("gray_photos", "photos"):
        want = ood_metrics(scores["id"], scores[name])
        for m, v in want.items():
            assert report["ood"][name][m] == pytest.approx(v, abs=1e-6), (name, m)
    assert report["average"]["auroc"] == pytest.approx(
        np.mean([report["ood"][n]["auroc"] for n in ("gray_photos", "photos")]))


def test_mahalanobis_and_projection_feature(tiny_run, small_sets):
    ev = evaluate(tiny_run, id_test=small_sets["id"], ood={"photos": small_sets["photos"]},
                  postprocessor="mahalanobis", feature="projection", device="cpu")
    r = ev.report
    assert r["settings"]["postprocessor"] == "mahalanobis" and r["settings"]["feature"] == "projection"
    assert set(r["accuracy"]) == {"knn", "mahalanobis", "linear_head"}
    assert ev.embeddings["id"].shape == (400, 128) and ev.scores["photos"].shape == (200,)
    assert (ev.scores["id"] <= 0).all()
    assert 0.0 <= r["ood"]["photos"]["auroc"] <= 1.0


def test_default_id_test_is_the_calibration_split(tiny_run):
    ev = evaluate(tiny_run, device="cpu")
    with np.load(tiny_run / "calibration.npz") as f:
        n = len(f["labels"])
    assert ev.report["settings"]["id_test"]["name"] == "calibration"
    assert ev.report["settings"]["id_test"]["n"] == n and ev.report["ood"] == {}


def test_report_without_ood_sets_links_only_the_plots_written(tiny_run, tmp_path):
    """No --ood: no histogram or ROC to draw, so report.md must not link them."""
    from trainer.cli_eval import eval_main

    res = CliRunner().invoke(eval_main, [str(tiny_run), "--device", "cpu", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (tmp_path / "report.md").read_text())
    assert links == ["embedding_2d.png", "neighbors.png"] and (tmp_path / "embedding_2d.png").is_file()
    assert not (tmp_path / "roc.png").exists() and not (tmp_path / "score_histograms.png").exists()


def test_evidence_is_the_scorers_neighbours_with_the_training_images(tiny_run, small_sets,
                                                                      tmp_path):
    """The contact sheet: ID best-scored, each OOD set's worst and best, their nearest bank rows
    as KNNScorer finds them, and the bank images read back from the run's training npz."""
    from trainer.report import write_report

    ev = evaluate(tiny_run, id_test=small_sets["id"], ood={"photos": small_sets["photos"]},
                  device="cpu")
    rows = ev.evidence.rows
    assert [r.group for r in rows] == ["ID, best-scored"] * 3 + ["photos, worst-scored"] * 3 + [
        "photos, best-scored"] * 3
    assert [r.score for r in rows[:3]] == pytest.approx(np.sort(ev.scores["id"])[::-1][:3])
    assert [r.score for r in rows[3:6]] == pytest.approx(np.sort(ev.scores["photos"])[:3])
    with np.load(tiny_run / "bank.npz") as f:
        scorer = KNNScorer(build_index(f["penultimate"]), f["labels"], k=10)
        indices = f["indices"]
    top = np.argsort(ev.scores["id"])[::-1][:3]
    _, _, _, ids = scorer.score_neighbors(ev.embeddings["id"][top], 5)
    np.testing.assert_array_equal(np.stack([r.rows for r in rows[:3]]), ids)
    train = np.load(Path(json.loads((tiny_run / "config.json").read_text())["config"]["data"]))
    for row, image in ev.evidence.bank_images.items():
        np.testing.assert_array_equal(image, train["images"][indices[row]])
    summary = ev.report["evidence"]
    assert summary["note"] == "" and summary["images"][0]["neighbors"][0]["source"] == \
        f"train#{indices[ids[0, 0]]}"
    written = write_report(ev, tmp_path / "report")
    assert tmp_path / "report" / "neighbors.png" in written
    assert "![neighbors](neighbors.png)" in (tmp_path / "report" / "report.md").read_text()


def test_no_contact_sheet_when_the_training_data_is_gone(tiny_run, small_sets, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["data"] = str(tmp_path / "moved.npz")
    (run / "config.json").write_text(json.dumps(cfg))
    ev = evaluate(run, id_test=small_sets["id"], device="cpu")
    assert ev.evidence.bank_images is None and "moved.npz" in ev.evidence.note
    from trainer.report import write_report
    written = write_report(ev, tmp_path / "report")
    assert not any(p.name == "neighbors.png" for p in written)
    assert "No contact sheet: the bank images cannot be read back" in (
        tmp_path / "report" / "report.md").read_text()
    assert ev.report["evidence"]["images"][0]["neighbors"]     # the rows are still listed


def test_mahalanobis_matches_brute_force(bank):
    x, y = bank["penultimate"], bank["labels"]
    scorer = MahalanobisScorer(x[:800], y[:800])
    q = x[800:]
    h = x[:800].astype(np.float64)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    mus = np.stack([h[y[:800] == c].mean(0) for c in range(10)])
    cov = sum(np.outer(v, v) for v in h - mus[y[:800]]) / len(h)
    prec = np.linalg.pinv(cov)
    d = np.array([[(r - m) @ prec @ (r - m) for m in mus] for r in q.astype(np.float64)])
    scores, pred = scorer.score(q)
    np.testing.assert_allclose(scores, -d.min(1), rtol=1e-4, atol=1e-3)
    assert (pred == d.argmin(1)).mean() > 0.99
    with pytest.raises(InputError, match="labels"):
        MahalanobisScorer(x[:20], y[:20], num_classes=30)
    with pytest.raises(InputError, match="emb"):
        scorer.score(q[:, :5])


def test_embedding_quality_matches_brute_force(bank):
    x, y = bank["penultimate"], bank["labels"]
    q = embedding_quality(x, y)
    h = x / np.linalg.norm(x, axis=1, keepdims=True)
    radii, cents = [], []
    for c in range(10):
        mu = h[y == c].mean(0)
        radii.append(max(np.linalg.norm(r - mu) for r in h[y == c]))
        cents.append(mu / np.linalg.norm(mu))
    cos = [cents[a] @ cents[b] for a in range(10) for b in range(10) if a != b]
    assert q["mean_radius"] == pytest.approx(np.mean(radii), rel=1e-6)
    assert q["radius_per_class"][3] == pytest.approx(radii[3], rel=1e-6)
    assert q["dispersion"] == pytest.approx(np.mean(cos), rel=1e-6)
    assert 0.0 < q["mean_radius"] <= 2.0 and -1.0 <= q["dispersion"] <= 1.0
    # perfectly compact, mutually orthogonal classes: radius 0, dispersion 0
    e = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)
    q0 = embedding_quality(e, np.repeat(np.arange(4), 3))
    assert q0["mean_radius"] == pytest.approx(0.0, abs=1e-7) and q0["dispersion"] == pytest.approx(0.0)
    with pytest.raises(InputError, match="labels"):
        embedding_quality(x[:5], np.zeros(5, np.int64))
    with pytest.raises(InputError, match="features"):
        embedding_quality(np.full((4, 3), np.nan), np.arange(4))


def test_linear_head_logits_are_captured():
    import torch

    from trainer.evaluate import _embed
    from trainer.networks import DeployModel, create_model

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, with_classifier=True)
    model = DeployModel(net, SPEC.mean, SPEC.std).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    out = _embed(model, images, "x", batch_size=4, device="cpu", progress=False)
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - model.mean) / model.std
        want = net(x)["logits"].numpy()
    np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-5)


def test_image_folder_is_read_file_by_file_with_class_labels(photo_jpeg_files, tmp_path):
    """Every file under the folder, sorted by path, through the runtime's decode + resize; labels
    from the first-level sub-folder when it names a class, else -1."""
    for i, f in enumerate(photo_jpeg_files[:6]):
        cls = ("banded", "crystalline", "loose")[i % 3]
        (tmp_path / cls).mkdir(exist_ok=True)
        (tmp_path / cls / f.name).write_bytes(f.read_bytes())
    (tmp_path / "banded" / "notes.txt").write_text("not an image")
    (tmp_path / "top.jpg").write_bytes(photo_jpeg_files[6].read_bytes())
    images, labels = load_image_set("id", tmp_path, SPEC, class_names=["banded", "crystalline"])
    files = sorted(p for p in tmp_path.rglob("*.jpg"))
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    for i, f in enumerate(files):
        np.testing.assert_array_equal(images[i], to_model_array(decode_image(f.read_bytes()), SPEC))
    want = {"banded": 0, "crystalline": 1}
    assert labels.tolist() == [want.get(f.parent.name, -1) for f in files]
    assert sorted(labels.tolist()) == [-1, -1, -1, 0, 0, 1, 1]
    _, unlabelled = load_image_set("photos", tmp_path, SPEC)
    assert (unlabelled == -1).all()


@pytest.mark.cifar_pack
def test_image_folder_equals_npz_and_reads_class_labels(shared_data, tmp_path):
    images, labels = load_image_set("textures", shared_data / "raw_textures", SPEC)
    ref = np.load(shared_data / "ood_textures.npz")
    names = list(ref["filenames"])
    files = sorted(p.name for p in (shared_data / "raw_textures").iterdir())
    rows = [names.index(f"images/{f.rsplit('_', 1)[0]}/{f}") for f in files]
    # exactly the runtime's path, file by file, in sorted order ...
    for i in (0, 37, 99):
        raw = (shared_data / "raw_textures" / files[i]).read_bytes()
        np.testing.assert_array_equal(images[i], to_model_array(decode_image(raw), SPEC))
    # ... and the same pictures as the pack's 32x32 rows (exact parity is test_preprocess's job)
    diff = np.abs(images.astype(int) - ref["images"][rows].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05
    assert (labels == -1).all()
    for f in files[:3] + files[-2:]:
        cls = f.rsplit("_", 1)[0]
        (tmp_path / cls).mkdir(exist_ok=True)
        shutil.copy(shared_data / "raw_textures" / f, tmp_path / cls / f)
    (tmp_path / "banded" / "notes.txt").write_text("not an image")
    _, lab = load_image_set("id", tmp_path, SPEC, class_names=["banded", "crystalline"])
    assert sorted(lab.tolist()) == [0, 0, 0, 1, 1]


def test_npz_set_is_brought_to_model_input(tmp_path):
    gray, digits = real_images.digits_gray()                            # [1797, 8, 8, 1]
    np.savez(tmp_path / "gray.npz", images=gray, labels=digits)
    images, labels = load_image_set("mnist", tmp_path / "gray.npz", SPEC)
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert (images[..., 0] == images[..., 2]).all()  # grayscale replicated to RGB
    np.testing.assert_array_equal(labels, digits)


def test_image_set_errors(tmp_path):
    with pytest.raises(InputError, match="ood"):
        parse_set_arg("no_equals_sign")
    with pytest.raises(InputError, match="ood"):
        parse_set_arg("=path")
    assert parse_set_arg(" svhn = /a=b ") == ("svhn", "/a=b")
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_image_set("svhn", tmp_path / "missing", SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="MNIST/raw"):
        load_image_set("mnist", tmp_path / "empty", SPEC)
    with pytest.raises(DataError, match="no image files"):
        load_image_set("other", tmp_path / "empty", SPEC)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=".npz file or a folder"):
        load_image_set("other", tmp_path / "x.txt", SPEC)
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="images"):
        load_image_set("other", tmp_path / "bad.npz", SPEC)
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_image_set("other", tmp_path / "float.npz", SPEC)


def test_photo_patches_are_a_fixed_set_of_real_colour_crops():
    p = photo_patches(per_photo=20, seed=3)
    assert p.dtype == np.uint8 and p.shape == (40, 32, 32, 3)
    np.testing.assert_array_equal(p, photo_patches(per_photo=20, seed=3))    # same on every call
    assert not np.array_equal(p, photo_patches(per_photo=20, seed=4))
    assert len({a.tobytes() for a in p}) == 40                                # distinct crops
    assert np.abs(p[..., 0].astype(int) - p[..., 2]).mean() > 5               # colour, not grey
    assert photo_patches(per_photo=2, size=48).shape == (4, 48, 48, 3)
    for kw, field in [({"per_photo": 0}, "per_photo"), ({"per_photo": 2.0}, "per_photo"),
                      ({"size": 0}, "size")]:
        with pytest.raises(InputError, match=field):
            photo_patches(**kw)


def test_evaluate_errors(tiny_run, small_sets, tmp_path):
    for kw, field in [({"postprocessor": "odin"}, "postprocessor"), ({"feature": "logits"}, "feature"),
                      ({"k": 0}, "k"), ({"batch_size": 0}, "batch_size"), ({"device": "tpu"}, "device"),
                      ({"ood": {"id": small_sets["photos"]}}, "ood"), ({"k": 10**6, "device": "cpu"}, "k")]:
        with pytest.raises(InputError, match=field):
            evaluate(tiny_run, **kw)
    broken = tmp_path / "run"
    shutil.copytree(tiny_run, broken)
    (broken / "calibration.npz").unlink()   # an npz run has no test split: the default ID set
    with pytest.raises(DataError, match="--id-test") as e:
        evaluate(broken, device="cpu")
    assert e.value.path == str(broken / "calibration.npz")
    (broken / "bank.npz").unlink()
    with pytest.raises(CheckpointError, match="bank.npz"):
        evaluate(broken, device="cpu")
    (broken / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="model.pt"):
        evaluate(broken, device="cpu")


def test_cli_reports_errors_in_one_line(tiny_run, tmp_path):
    from trainer.cli_eval import eval_main

    res = CliRunner().invoke(eval_main, [str(tiny_run), "--ood", "mnist", "--device", "cpu"])
    assert res.exit_code == 2 and "NAME=PATH" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(eval_main, [str(tmp_path / "nope"), "--device", "cpu"])
    assert res.exit_code == 2 and "model.pt" in res.output
