"""The drift test (detector_server.drift) on real scores: digits the tiny run never saw do not drift
from the bundle's calibration scores, crops of photographs do; the numbers are SciPy's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from detector_server.detector import Detector
from detector_server.drift import calibration_rank, drift_test, expected_ood_rate
from detector_server.errors import InputError
from detector_server.preprocess import prepare_arrays


@pytest.fixture(scope="module")
def scored(tiny_run: Path, tiny_bundle: Path, id_images: np.ndarray,
           ood_images: np.ndarray) -> dict[str, np.ndarray]:
    """KNN scores of the run's calibration split (what the bundle stores), of 300 digits the run
    never saw (in-distribution) and of 300 photo crops (far out of distribution)."""
    det = Detector(tiny_bundle, device="cpu", threads=1)
    return {"calibration": det.score_arrays(np.load(tiny_run / "calibration.npz")["images"]).scores,
            "threshold": np.float32(det.threshold),
            "id": det.score_arrays(prepare_arrays(id_images[:300], det.spec)).scores,
            "photos": det.score_arrays(prepare_arrays(ood_images, det.spec)).scores}


def test_in_distribution_images_do_not_drift(scored: dict) -> None:
    report = drift_test(scored["id"], scored["calibration"], scored["threshold"], alpha=0.01)
    assert report.pvalue > 0.05 and not report.drifted
    assert report.n == 300 and report.n_calibration == len(scored["calibration"])
    assert report.ood_rate < 0.2 and "drift at alpha 0.01: no" in report.summary()


def test_out_of_distribution_images_drift(scored: dict) -> None:
    report = drift_test(scored["photos"], scored["calibration"], scored["threshold"], alpha=0.01)
    assert report.pvalue < 1e-6 and report.drifted and report.to_dict()["drifted"] is True
    assert report.ood_rate > 3 * report.expected_ood_rate
    assert "drift at alpha 0.01: YES" in report.summary()


def test_numbers_are_scipys_ks_test_and_the_threshold_rates(scored: dict) -> None:
    report = drift_test(scored["photos"], scored["calibration"], scored["threshold"])
    reference = stats.ks_2samp(scored["photos"], scored["calibration"])
    assert (report.statistic, report.pvalue) == (reference.statistic, reference.pvalue)
    assert report.ood_rate == np.mean(scored["photos"] < scored["threshold"])
    assert report.expected_ood_rate == expected_ood_rate(scored["calibration"], scored["threshold"])
    assert report.alpha is None and not report.drifted          # no alpha: report, never flag


def test_unscored_images_take_no_part(scored: dict) -> None:
    with_failures = np.concatenate([scored["id"], [np.nan, np.nan]])
    a = drift_test(with_failures, scored["calibration"], scored["threshold"])
    b = drift_test(scored["id"], scored["calibration"], scored["threshold"])
    assert a == b


def test_calibration_rank_places_scores_among_the_calibration_scores(scored: dict) -> None:
    calibration = np.sort(scored["calibration"])
    ranks = calibration_rank(scored["calibration"], calibration)
    assert ranks.max() == 1.0 and np.allclose(np.sort(ranks), np.arange(1, len(ranks) + 1) / len(ranks))
    low = calibration_rank(np.array([calibration[0] - 1, calibration[-1] + 1]), calibration)
    assert low.tolist() == [0.0, 1.0]
    # photos score low: most fall below the calibration's 5th percentile, few ID images do
    assert np.mean(calibration_rank(scored["photos"], calibration) <= 0.05) > 0.3
    assert np.mean(calibration_rank(scored["id"], calibration) <= 0.05) < 0.2


@pytest.mark.parametrize("kwargs, field", [
    ({"scores": [0.1]}, "scores"), ({"scores": [np.nan, np.nan, 0.3]}, "scores"),
    ({"calibration_scores": []}, "calibration_scores"), ({"alpha": 0.0}, "alpha"),
    ({"alpha": 1.5}, "alpha"), ({"alpha": True}, "alpha")])
def test_unusable_inputs_refused(kwargs: dict, field: str) -> None:
    args = {"scores": [-0.5, -0.4, -0.3], "calibration_scores": [-0.5, -0.2], "threshold": -0.45,
            **kwargs}
    with pytest.raises(InputError, match=f"field '{field}'"):
        drift_test(**args)
