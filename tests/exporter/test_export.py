"""export_bundle end to end on the tiny run: index, threshold, int8, metadata, and every refusal."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import exporter.export as export_mod
from detector_server.bundle import derive_model_version, load_bundle
from detector_server.detector import Detector
from detector_server.errors import BundleError, CheckpointError, DataError, InputError
from detector_server.preprocess import PreprocessSpec
from exporter.calibrate import load_calibration_images
from exporter.export import export_bundle

N_CAL = 378                 # user calibration images of the custom bundle


@pytest.fixture(scope="module")
def id_pool(id_images: np.ndarray) -> np.ndarray:
    """The 755 digits the tiny run never saw in a fixed random order: [:N_CAL] and [N_CAL:] are
    two random halves of the same pool (378 and 377 images)."""
    return id_images[np.random.default_rng(0).permutation(len(id_images))]


@pytest.fixture(scope="module")
def custom_bundle(tiny_run: Path, id_pool: np.ndarray, tmp_path_factory) -> Path:
    """Non-default options in one export: projection index, k=20, int8, 378 user calibration
    images (the first half of the unseen digits; never in the bank), and a bank whose rows name
    their files (as a folder dataset's do)."""
    root = tmp_path_factory.mktemp("custom")
    np.savez(root / "calib.npz", images=id_pool[:N_CAL])
    run = root / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    with np.load(run / "bank.npz") as f:
        bank = {k: f[k] for k in f.files}
    bank["files"] = np.array([f"{bank['class_names'][c]}/{i:04d}.png"
                              for c, i in zip(bank["labels"], bank["indices"])])
    np.savez(run / "bank.npz", **bank)
    return export_bundle(run, root / "bundle", feature="projection", k=20,
                         calibration=root / "calib.npz", quantize="int8", threads=2)


def _half_run(tiny_run: Path, dst: Path, names: tuple[str, ...]) -> Path:
    dst.mkdir()
    for n in names:
        shutil.copy(tiny_run / n, dst / n)
    return dst


def test_default_bundle_contents(tiny_run: Path, tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    run_cfg = json.loads((tiny_run / "config.json").read_text())
    assert m.k == 10 and m.index.feature == "penultimate" and m.index.factory == "Flat"
    assert m.model_version == derive_model_version(tiny_run.name, m.to_dict())
    assert m.training["data"]["fingerprint"] == run_cfg["data"]["fingerprint"]
    assert m.training["config"] == run_cfg["config"] and m.quantization is None
    assert m.preprocess == run_cfg["preprocess"] and list(m.class_names) == run_cfg["class_names"]
    t = m.threshold
    assert t.source == "run:calibration.npz" and t.n_samples == run_cfg["data"]["n_calibration"]
    # The index holds exactly the bank's penultimate rows, with their labels.
    bank = np.load(tiny_run / "bank.npz")
    index = faiss.read_index(str(tiny_bundle / "index.faiss"))
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), bank["penultimate"])
    np.testing.assert_array_equal(np.load(tiny_bundle / "labels.npy"), bank["labels"])
    # Every row's source is its training-set index; the calibration embeddings are kept.
    b = load_bundle(tiny_bundle)
    sources = b.sources()
    np.testing.assert_array_equal(sources.index, bank["indices"])
    assert sources.describe(0) == f"train#{bank['indices'][0]}" and sources.counts() == {
        "train": index.ntotal}
    det = Detector(b, device="cpu", threads=2)
    calibration = np.load(tiny_run / "calibration.npz")["images"]
    np.testing.assert_allclose(b.calibration_embeddings(), det.embed(calibration), atol=1e-5)


def test_custom_bundle_threshold_and_int8(custom_bundle: Path, tiny_run: Path,
                                          id_pool: np.ndarray) -> None:
    m = load_bundle(custom_bundle).manifest
    assert m.index.feature == "projection" and m.k == 20
    assert m.served_file == "model.int8.onnx" and m.quantization["type"] == "int8"
    assert set(m.files) == {"model.onnx", "model.int8.onnx", "index.faiss", "labels.npy",
                            "calibration_scores.npy", "sources.json",
                            "calibration_embeddings.npy"}
    assert m.model_version == derive_model_version(tiny_run.name, m.to_dict())
    t = m.threshold
    assert t.source.startswith("npz:") and t.n_samples == N_CAL
    assert abs(t.achieved_tpr - t.target_tpr) <= 0.005           # within 0.5 points
    det = Detector(custom_bundle, device="cpu", threads=2)
    assert np.mean(~det.score_arrays(id_pool[:N_CAL]).is_ood) == pytest.approx(t.achieved_tpr)
    held_out = float(np.mean(~det.score_arrays(id_pool[N_CAL:]).is_ood))
    print(f"\nTPR on the held-out half of the unseen digits (int8, {N_CAL} calibration "
          f"images): {held_out:.4f} (calibration {t.achieved_tpr:.4f})")
    # two samples of ~378: the sampling s.d. of their TPR difference is ~0.016; 0.05 is ~3 s.d.
    # (measured 0.018 off)
    assert abs(held_out - t.target_tpr) <= 0.05
    index = faiss.read_index(str(custom_bundle / "index.faiss"))
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal),
                                  np.load(tiny_run / "bank.npz")["projection"])
    sources, bank = load_bundle(custom_bundle).sources(), np.load(tiny_run / "bank.npz")
    np.testing.assert_array_equal(sources.index, bank["indices"])
    c, i = bank["class_names"][bank["labels"][5]], bank["indices"][5]
    assert sources.describe(5) == f"train/{c}/{i:04d}.png" and sources.path[5] == f"{c}/{i:04d}.png"


def test_int8_model_close_to_float(custom_bundle: Path, id_pool: np.ndarray) -> None:
    x = id_pool[:128]
    outs = [ort.InferenceSession(str(custom_bundle / f), providers=["CPUExecutionProvider"])
            .run(["projection"], {"image": x})[0] for f in ("model.onnx", "model.int8.onnx")]
    cos = np.sum(outs[0] * outs[1], axis=1)
    np.testing.assert_allclose(np.linalg.norm(outs[1], axis=1), 1.0, atol=1e-4)
    assert cos.mean() > 0.98, cos.mean()


def test_interrupted_export_leaves_nothing(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    def fake_onnx(model, path, size, *, opset):
        Path(path).write_bytes(b"half-written model")
        return {"feature": 128, "projection": 128}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export_onnx", fake_onnx)
    monkeypatch.setattr(export_mod, "Embedder", interrupt)      # after model.onnx is staged
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tiny_run: Path, tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="already exists") as e:
        export_bundle(tiny_run, tiny_bundle)
    assert e.value.path == str(tiny_bundle)


def test_run_dir_without_checkpoint_or_bank(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        export_bundle(tmp_path / "no_run", tmp_path / "out")
    run = _half_run(tiny_run, tmp_path / "no_model", ("config.json", "bank.npz"))
    with pytest.raises(CheckpointError, match="no final model") as e:
        export_bundle(run, tmp_path / "out")
    assert e.value.path == str(run / "model.pt")
    run = _half_run(tiny_run, tmp_path / "no_bank", ("config.json", "model.pt"))
    with pytest.raises(CheckpointError, match="no embedding bank") as e:
        export_bundle(run, tmp_path / "out")
    assert e.value.path == str(run / "bank.npz")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bank,match", [
    ({"labels": np.zeros(4, np.int64)}, "missing array"),
    ({"penultimate": np.ones((4, 64), np.float32) / 8, "labels": np.zeros(4, np.int64)},
     "from another model"),
    ({"penultimate": np.ones((4, 128), np.float32), "labels": np.full(4, 99, np.int64)},
     "labels outside"),
])
def test_bad_bank_refused(tiny_run: Path, tmp_path: Path, bank: dict, match: str) -> None:
    run = _half_run(tiny_run, tmp_path / "run", ("config.json", "model.pt", "calibration.npz"))
    np.savez(run / "bank.npz", **bank)
    with pytest.raises(CheckpointError, match=match) as e:
        export_bundle(run, tmp_path / "out")
    assert e.value.path == str(run / "bank.npz")


@pytest.mark.parametrize("kwargs,field", [
    ({"feature": "logits"}, "feature"), ({"k": 0}, "k"), ({"tpr": 1.0}, "tpr"),
    ({"tpr": 0.0}, "tpr"), ({"quantize": "int4"}, "quantize"), ({"opset": 17}, "opset"),
    ({"index_factory": " "}, "index"), ({"k": 10_000}, "k"), ({"threads": 0}, "threads"),
])
def test_bad_options_refused(tiny_run: Path, tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(InputError, match=f"field '{field}'"):
        export_bundle(tiny_run, tmp_path / "out", **kwargs)


def test_calibration_sources(tiny_run: Path, tmp_path: Path, id_pool: np.ndarray) -> None:
    spec = PreprocessSpec(32, (0.5,) * 3, (0.25,) * 3)
    images, source = load_calibration_images(tiny_run, None, spec)
    assert source == "run:calibration.npz" and images.shape[1:] == (32, 32, 3)
    folder = tmp_path / "id"
    (folder / "sub").mkdir(parents=True)
    for i, a in enumerate(id_pool[:25]):
        Image.fromarray(a).save(folder / ("sub" if i % 2 else "") / f"{i:02d}.png")
    (folder / "README.txt").write_text("not an image: skipped by extension")
    images, source = load_calibration_images(tiny_run, folder, spec)
    assert images.shape == (25, 32, 32, 3) and source.startswith("folder:")
    np.testing.assert_array_equal(images[0], id_pool[0])
    # 64x64 images in an npz are resized by the spec
    np.savez(tmp_path / "big.npz", images=np.zeros((30, 64, 64, 3), np.uint8))
    assert load_calibration_images(tiny_run, tmp_path / "big.npz", spec)[0].shape == (30, 32, 32, 3)


def _bad_folder(tmp_path: Path, id_pool: np.ndarray) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    for i, a in enumerate(id_pool[:25]):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    return folder


@pytest.mark.parametrize("make,match", [
    (lambda p, c: p / "missing.npz", "expected an .npz file"),
    (lambda p, c: (np.savez(p / "x.npz", pixels=c[:30]), p / "x.npz")[1], "no 'images' array"),
    (lambda p, c: (np.savez(p / "f.npz", images=c[:30].astype(np.float32)), p / "f.npz")[1],
     "uint8"),
    (lambda p, c: (np.savez(p / "few.npz", images=c[:5]), p / "few.npz")[1], "need at least"),
    (_bad_folder, "cannot decode"),
])
def test_bad_calibration_refused(tiny_run: Path, tmp_path: Path, id_pool: np.ndarray,
                                 make, match: str) -> None:
    path = make(tmp_path, id_pool)
    spec = PreprocessSpec(32, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(DataError, match=match) as e:
        load_calibration_images(tiny_run, path, spec)
    assert e.value.path.startswith(str(path))


def test_run_without_calibration_split_refused(tiny_run: Path, tmp_path: Path) -> None:
    run = _half_run(tiny_run, tmp_path / "run", ("config.json", "model.pt", "bank.npz"))
    with pytest.raises(DataError, match="--calibration") as e:
        export_bundle(run, tmp_path / "out")
    assert e.value.path == str(run / "calibration.npz")
