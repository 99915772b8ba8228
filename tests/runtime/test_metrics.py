"""detector_server.metrics against scikit-learn and brute force, on real KNN score arrays."""
from __future__ import annotations

import numpy as np
import pytest
import real_images
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from detector_server.errors import InputError
from detector_server.knn import KNNScorer, build_index
from detector_server.metrics import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics, threshold_at_tpr
from detector_server.preprocess import PreprocessSpec, prepare_arrays

SPEC = PreprocessSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _features(images: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Random projection of centred flattened pixels, L2-normalised (float32 [N, 64])."""
    x = prepare_arrays(images, SPEC).reshape(len(images), -1).astype(np.float32) / 255.0
    f = (x - x.mean(axis=1, keepdims=True)) @ proj
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def real_scores(digits_small) -> dict[str, np.ndarray]:
    """KNN scores (k=10) against 840 training digits 0-5: "id" the 214 test-split digits 0-5,
    "digits6-9" the 141 test-split digits 6-9 (held-out classes: near-OOD, overlapping), "photos"
    300 photo patches (far-OOD)."""
    proj = np.random.default_rng(0).standard_normal((32 * 32 * 3, 64)).astype(np.float32)
    keep = digits_small["labels"] < 6
    bank = _features(digits_small["images"][keep], proj)
    scorer = KNNScorer(build_index(bank), digits_small["labels"][keep], k=10)
    test = real_images.digits_split("test")
    sets = {"id": test.images[test.labels < 6], "digits6-9": test.images[test.labels >= 6],
            "photos": real_images.photo_patches()}
    return {name: scorer.score(_features(images, proj))[0] for name, images in sets.items()}


def _brute_fpr(id_s: np.ndarray, ood_s: np.ndarray, tpr: float = 0.95) -> float:
    """Largest candidate threshold keeping >= tpr of ID, by trying every ID score."""
    t = max(c for c in np.unique(id_s) if np.mean(id_s >= c) >= tpr)
    return float(np.mean(ood_s >= t))


def _sklearn_fpr(id_s: np.ndarray, ood_s: np.ndarray, tpr: float = 0.95) -> float:
    y = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    fpr, tprs, _ = roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    return float(fpr[np.argmax(tprs >= tpr)])


def _check_all(id_s: np.ndarray, ood_s: np.ndarray) -> None:
    y = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    s = np.r_[id_s, ood_s].astype(np.float64)
    m = ood_metrics(id_s, ood_s)
    assert set(m) == {"fpr@95", "auroc", "aupr_in", "aupr_out"}
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert m["fpr@95"] == _brute_fpr(id_s, ood_s) == _sklearn_fpr(id_s, ood_s)


@pytest.mark.parametrize("ood", ["digits6-9", "photos"])
def test_metrics_match_sklearn_on_real_scores(real_scores, ood):
    id_s, ood_s = real_scores["id"], real_scores[ood]
    _check_all(id_s, ood_s)
    # the random-projection detector is weak but not random: the numbers must carry signal
    # (measured: held-out digits FPR@95 0.50, AUROC 0.92; photos 0.0 and 1.0)
    m = ood_metrics(id_s, ood_s)
    assert m["fpr@95"] < 0.75 and m["auroc"] > 0.75


def test_near_ood_scores_overlap_the_id_scores(real_scores):
    """The near-OOD set exercises the metrics where ID and OOD scores interleave."""
    assert 0.0 < ood_metrics(real_scores["id"], real_scores["digits6-9"])["fpr@95"] < 1.0


@pytest.mark.parametrize("decimals", [2, 1])
def test_metrics_with_many_ties(real_scores, decimals):
    id_s = np.round(real_scores["id"], decimals)
    ood_s = np.round(real_scores["digits6-9"], decimals)
    assert np.unique(np.r_[id_s, ood_s]).size < 0.2 * (id_s.size + ood_s.size)
    _check_all(id_s, ood_s)


def test_threshold_definition_on_real_scores(real_scores):
    s = real_scores["id"]
    for tpr in (0.5, 0.9, 0.95, 0.99, 1.0):
        t = threshold_at_tpr(s, tpr)
        assert np.mean(s >= t) >= tpr
        above = s[s > t]
        assert above.size == 0 or np.mean(s >= above.min()) < tpr  # no larger ID score qualifies
    assert threshold_at_tpr(s, 1.0) == s.min()


def test_threshold_exact_fraction():
    # 20 samples, tpr 0.95: exactly 19 must be kept, so t is the 19th largest (float rounding trap)
    s = np.arange(20, dtype=np.float32)
    assert threshold_at_tpr(s, 0.95) == 1.0
    assert fpr_at_tpr(s, np.array([0.5, 1.0, 30.0]), 0.95) == pytest.approx(2 / 3)


def test_one_ood_sample(real_scores):
    id_s = real_scores["id"]
    for x in (id_s.max() + 1, np.median(id_s), id_s.min() - 1):
        _check_all(id_s, np.array([x], dtype=np.float32))
    assert ood_metrics(id_s, np.array([id_s.max() + 1]))["fpr@95"] == 1.0
    assert ood_metrics(id_s, np.array([id_s.min() - 1]))["auroc"] == 1.0


def test_all_scores_equal():
    id_s, ood_s = np.full(50, -0.7, np.float32), np.full(30, -0.7, np.float32)
    m = ood_metrics(id_s, ood_s)
    assert m == {"fpr@95": 1.0, "auroc": 0.5, "aupr_in": pytest.approx(50 / 80),
                 "aupr_out": pytest.approx(30 / 80)}
    _check_all(id_s, ood_s)


def test_tpr_key_and_range(real_scores):
    m = ood_metrics(real_scores["id"], real_scores["digits6-9"], tpr=0.9)
    assert "fpr@90" in m and m["fpr@90"] == _brute_fpr(real_scores["id"], real_scores["digits6-9"],
                                                        0.9)
    for bad in (0.0, 1.5, -0.1, "0.95"):
        with pytest.raises(InputError, match="tpr"):
            threshold_at_tpr(real_scores["id"], bad)


@pytest.mark.parametrize("fn", [ood_metrics, auroc, aupr_in, aupr_out, fpr_at_tpr])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises_naming_argument(fn, bad):
    good = np.linspace(0, 1, 10)
    with pytest.raises(InputError, match="id_scores.*NaN or infinite"):
        fn(np.r_[good, bad], good)
    with pytest.raises(InputError, match="ood_scores.*NaN or infinite"):
        fn(good, np.r_[good, bad])


@pytest.mark.parametrize("bad", [np.array([]), np.zeros((3, 2)), np.array(["a", "b"])])
def test_empty_or_malformed_raises(bad):
    with pytest.raises(InputError, match="ood_scores"):
        ood_metrics(np.linspace(0, 1, 10), bad)
    with pytest.raises(InputError, match="id_scores"):
        threshold_at_tpr(bad)
