"""The deployed threshold from calibration scores: `calibrate_threshold(scores, tpr, source)`.

Use it wherever a bundle's threshold is set: `rwood-export` (on the run's held-out images) and
`rwood-bank add/remove --calibration` (on the user's), both on scores from the runtime's own
`Detector`, so the deployed decision is exactly the calibrated one. `MIN_CALIBRATION` is the
fewest images that can place a 95% threshold at all. Numpy only.
Test: tests/exporter/test_export.py, tests/runtime/test_bank_edit.py.
"""
from __future__ import annotations

import logging

import numpy as np

from .manifest import ThresholdInfo
from .metrics import threshold_at_tpr

__all__ = ["calibrate_threshold", "tpr_at", "MIN_CALIBRATION"]

log = logging.getLogger(__name__)

MIN_CALIBRATION = 20                    # fewer images cannot place a 95% threshold at all


def tpr_at(scores: np.ndarray, threshold: float) -> float:
    """Fraction of `scores` (float32 [M], ID images) the runtime keeps at `threshold`: its own
    comparison, score >= threshold in float32."""
    return float(np.mean(np.asarray(scores, dtype=np.float32) >= np.float32(threshold)))


def calibrate_threshold(scores: np.ndarray, tpr: float, source: str) -> ThresholdInfo:
    """The largest threshold keeping a fraction >= `tpr` of `scores` (float32 [M], ID images).

    The achieved TPR moves in steps of 1/M (ties can add more); it is recorded as measured with
    the runtime's own comparison (`tpr_at`).
    """
    scores = np.asarray(scores, dtype=np.float32)
    value = threshold_at_tpr(scores, tpr)
    achieved = tpr_at(scores, value)
    if len(scores) < 200:
        log.warning("only %d calibration images: the achieved TPR moves in steps of %.1f points",
                    len(scores), 100.0 / len(scores))
    log.info("threshold %.6g: TPR %.4f on %d calibration images (target %.4f)", value, achieved,
             len(scores), tpr)
    return ThresholdInfo(value=float(value), target_tpr=float(tpr), achieved_tpr=achieved,
                         n_samples=int(len(scores)), source=source)
