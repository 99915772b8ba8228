"""`Detector`: scores equal brute-force KNN over the bank, calibrated decision, items."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import real_images
from PIL import Image

from detector_server.bundle import load_bundle
from detector_server.detector import Detector, ItemResult, ScoreBatch
from detector_server.errors import InputError


@pytest.fixture(scope="module")
def detector(tiny_bundle: Path) -> Detector:
    return Detector(tiny_bundle, device="cpu", threads=2)


@pytest.fixture(scope="module")
def test_images(id_images: np.ndarray, ood_images: np.ndarray) -> np.ndarray:
    """256 digits (ID, not banked) + 128 photo patches (OOD): uint8 [384, 32, 32, 3]."""
    return np.concatenate([id_images[:256], ood_images[:128]])


def brute_force_knn(emb: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """-(Euclidean distance to the k-th nearest bank row), float64 numpy, no faiss."""
    d2 = np.maximum(0.0, 2.0 - 2.0 * emb.astype(np.float64) @ bank.astype(np.float64).T)
    return -np.sqrt(np.sort(d2, axis=1)[:, k - 1])


def test_attributes(detector: Detector, tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    assert detector.model_version == m.model_version and detector.k == m.k
    assert detector.threshold == m.threshold.value and detector.class_names == m.class_names
    assert detector.providers == ["CPUExecutionProvider"] and detector.device == "cpu"
    assert detector.spec.size == 32 and detector.info()["input_size"] == 32


def test_scores_equal_brute_force_knn(detector: Detector, tiny_run: Path,
                                      test_images: np.ndarray) -> None:
    bank = np.load(tiny_run / "bank.npz")
    emb = detector.embed(test_images)
    assert emb.dtype == np.float32 and emb.shape == (len(test_images), 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    batch = detector.score_arrays(test_images)
    assert isinstance(batch, ScoreBatch) and len(batch) == len(test_images)
    assert batch.scores.dtype == np.float32 and batch.predicted.dtype == np.int64
    ref = brute_force_knn(emb, bank["penultimate"], detector.k)
    np.testing.assert_allclose(batch.scores, ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(batch.is_ood, batch.scores < np.float32(detector.threshold))
    # The vote: the predicted class is among the labels of the k nearest bank rows.
    nn = np.argsort(-(emb @ bank["penultimate"].T), axis=1)[:, :detector.k]
    assert all(p in bank["labels"][row] for p, row in zip(batch.predicted, nn))


def test_calibrated_decision_reproduced(detector: Detector, tiny_run: Path,
                                        tiny_bundle: Path) -> None:
    """The runtime accepts exactly the recorded fraction of the calibration images."""
    t = load_bundle(tiny_bundle).manifest.threshold
    images = np.load(tiny_run / "calibration.npz")["images"]
    accepted = ~detector.score_arrays(images).is_ood
    assert t.n_samples == len(images)
    assert accepted.mean() == pytest.approx(t.achieved_tpr, abs=1e-12)
    assert t.achieved_tpr >= t.target_tpr and t.achieved_tpr - t.target_tpr <= 1.0 / len(images)


def test_tpr_on_id_test_split(detector: Detector, id_images: np.ndarray) -> None:
    """Report the TPR on the 755 digits never seen in training or bank (0.91 measured).

    The tiny run holds out only 50 calibration images, so its threshold is coarse: loose bound.
    """
    tpr = float(np.mean(~detector.score_arrays(id_images).is_ood))
    print(f"\nTPR on 755 unseen digits (tiny bundle, 50 calibration images): {tpr:.4f}")
    assert 0.85 <= tpr <= 1.0


def test_score_images_mixed_items(detector: Detector, test_images: np.ndarray,
                                  photo_jpeg_files: list[Path]) -> None:
    gray = real_images.digits_gray()[0][0]                                # 8x8x1 gray scan
    photo = photo_jpeg_files[0].read_bytes()                              # 427x640 camera JPEG
    items = [real_images.png_bytes(test_images[0]), b"not an image", test_images[1], b"",
             Image.fromarray(test_images[2]), gray, photo, 42, test_images[3].astype(np.float32)]
    ids = [f"img{i}" for i in range(len(items))]
    res = detector.score_images(items, ids)
    assert [r.id for r in res] == ids and all(isinstance(r, ItemResult) for r in res)
    bad = {1, 3, 7, 8}
    for i, r in enumerate(res):
        if i in bad:
            assert r.error and math.isnan(r.score) and not r.is_ood
            assert r.predicted_class == -1 and r.predicted_label == ""
        else:
            assert r.error == "" and math.isfinite(r.score)
            assert r.predicted_label == detector.class_names[r.predicted_class]
            assert r.is_ood == (r.score < detector.threshold)
    assert "empty" in res[3].error and "cannot decode" in res[1].error
    # PNG is lossless: bytes, array and PIL paths score as score_arrays on the same pixels.
    direct = detector.score_arrays(test_images[:3])
    np.testing.assert_allclose([res[0].score, res[2].score, res[4].score], direct.scores, atol=1e-6)


def test_prepare(detector: Detector, photo_jpeg_files: list[Path]) -> None:
    raw = photo_jpeg_files[0].read_bytes()
    a = detector.prepare(raw)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    gray = np.zeros((40, 50), np.uint8)
    assert detector.prepare(gray).shape == (32, 32, 3)
    with pytest.raises(InputError, match="expected encoded image bytes"):
        detector.prepare("some/path.png")
    with pytest.raises(InputError, match="uint8"):
        detector.prepare(np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(InputError, match="empty"):
        detector.prepare(np.zeros((0, 32, 3), np.uint8))


def test_pixel_limit(tiny_bundle: Path, test_images: np.ndarray) -> None:
    small = Detector(tiny_bundle, device="cpu", threads=1, max_pixels=32 * 32)
    big = np.zeros((33, 32, 3), np.uint8)
    for item in (real_images.png_bytes(big), Image.fromarray(big), big):
        with pytest.raises(InputError, match="over the limit"):
            small.prepare(item)
    res = small.score_images([real_images.png_bytes(big), real_images.png_bytes(test_images[0])])
    assert "over the limit" in res[0].error and res[1].error == ""


def test_score_arrays_order_and_chunking(tiny_bundle: Path, detector: Detector,
                                         test_images: np.ndarray) -> None:
    chunked = Detector(tiny_bundle, device="cpu", threads=1, max_batch=7)
    a, b = detector.score_arrays(test_images[:50]), chunked.score_arrays(test_images[:50])
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    np.testing.assert_array_equal(a.predicted, b.predicted)
    res = chunked.score_images(list(test_images[:20]))
    np.testing.assert_allclose([r.score for r in res], a.scores[:20], atol=1e-6)


def test_empty_batches(detector: Detector) -> None:
    assert detector.embed(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 128)
    assert len(detector.score_arrays(np.zeros((0, 32, 32, 3), np.uint8))) == 0
    assert detector.score_images([]) == []


@pytest.mark.parametrize("images", [
    np.zeros((2, 32, 32, 3), np.float32), np.zeros((2, 28, 28, 3), np.uint8),
    np.zeros((32, 32, 3), np.uint8), [[0]],
])
def test_array_input_refused(detector: Detector, images) -> None:
    with pytest.raises(InputError, match="field 'images'"):
        detector.score_arrays(images)


def test_item_list_errors(detector: Detector) -> None:
    with pytest.raises(InputError, match="field 'ids'"):
        detector.score_images([b"x", b"y"], ids=["a"])
    with pytest.raises(InputError, match="field 'items'"):
        detector.score_images(b"raw bytes is one item, not a list")


@pytest.mark.parametrize("kwargs,field", [
    ({"device": "tpu"}, "device"), ({"threads": 0}, "threads"), ({"max_pixels": 0}, "max_pixels"),
    ({"max_batch": -1}, "max_batch"),
])
def test_bad_options_refused(tiny_bundle: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(InputError, match=f"field '{field}'"):
        Detector(tiny_bundle, **kwargs)


def test_cuda_without_provider_refused(tiny_bundle: Path) -> None:
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.raises(InputError, match="CUDA"):
        Detector(tiny_bundle, device="cuda")


def test_public_api() -> None:
    import detector_server
    from detector_server import Detector as D
    from detector_server import load_bundle as lb
    assert D is Detector and lb is load_bundle
    assert detector_server.__all__ == ["load_bundle", "Detector", "DetectorClient"]
    with pytest.raises(AttributeError):
        _ = detector_server.no_such_name


def test_thread_budget_applied(tiny_bundle: Path) -> None:
    """ONNX Runtime and FAISS get the same thread count (they run one after the other)."""
    import faiss
    det = Detector(tiny_bundle, device="cpu", threads=1)
    assert det.threads == 1 and faiss.omp_get_max_threads() == 1
    Detector(tiny_bundle, device="cpu", threads=2)
    assert faiss.omp_get_max_threads() == 2
