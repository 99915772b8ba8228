"""The calibration scores a bundle carries (calibration_scores.npy): what rwood-export writes, what
`Bundle.calibration_scores` accepts, and bundles exported before they existed."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from detector_server.bundle import load_bundle, staging_dir, write_bundle
from detector_server.detector import Detector
from detector_server.errors import BundleError


def republish_without_calibration(source: Path, out: Path) -> Path:
    """`source` as rwood-export wrote bundles before calibration scores were stored."""
    m = load_bundle(source).manifest
    with staging_dir(out) as stage:
        for name in m.files:
            if name != m.calibration_file:
                shutil.copy2(source / name, stage / name)
        write_bundle(stage, dataclasses.replace(m, calibration_file=None, files={}), out)
    return out


@pytest.fixture(scope="module")
def old_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return republish_without_calibration(tiny_bundle, tmp_path_factory.mktemp("old") / "bundle")


def with_calibration(source: Path, out: Path, scores: np.ndarray) -> Path:
    """`source` republished with `scores` as its calibration file."""
    m = load_bundle(source).manifest
    with staging_dir(out) as stage:
        for name in m.files:
            shutil.copy2(source / name, stage / name)
        np.save(stage / m.calibration_file, scores, allow_pickle=False)
        write_bundle(stage, dataclasses.replace(m, files={}), out)
    return out


def test_export_stores_the_scores_that_set_the_threshold(tiny_run: Path, tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    scores = bundle.calibration_scores()
    assert m.calibration_file == "calibration_scores.npy" and m.calibration_file in m.files
    assert scores.dtype == np.float32 and scores.shape == (m.threshold.n_samples,)
    assert np.mean(scores >= np.float32(m.threshold.value)) == m.threshold.achieved_tpr
    det = Detector(bundle, device="cpu", threads=1)
    again = det.score_arrays(np.load(tiny_run / "calibration.npz")["images"]).scores
    np.testing.assert_array_equal(scores, again)
    assert det.expected_ood_ratio == pytest.approx(1 - m.threshold.achieved_tpr)
    assert det.calibration_rank(np.array([-np.inf, np.inf])).tolist() == [0.0, 1.0]


def test_a_bundle_from_before_has_none_and_still_loads(old_bundle: Path) -> None:
    bundle = load_bundle(old_bundle)
    assert bundle.manifest.calibration_file is None and bundle.calibration_scores() is None
    det = Detector(bundle, device="cpu", threads=1)
    assert det.calibration is None and det.calibration_rank(np.zeros(3)) is None
    assert det.expected_ood_ratio == pytest.approx(1 - bundle.manifest.threshold.achieved_tpr)


@pytest.mark.parametrize("make", [lambda n: np.zeros(n + 1, np.float32),   # not one per image
                                  lambda n: np.zeros(n, np.float64),        # not float32
                                  lambda n: np.full(n, np.nan, np.float32)])  # not finite
def test_unusable_calibration_scores_are_a_bundle_error(tiny_bundle: Path, tmp_path: Path,
                                                        make) -> None:
    n = load_bundle(tiny_bundle).manifest.threshold.n_samples
    bundle = load_bundle(with_calibration(tiny_bundle, tmp_path / "b", make(n)))
    with pytest.raises(BundleError, match="calibration_scores.npy: expected finite float32"):
        bundle.calibration_scores()
    with pytest.raises(BundleError, match="calibration_scores.npy"):
        Detector(bundle, device="cpu", threads=1)

