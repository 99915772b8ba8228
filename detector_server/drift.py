"""Has the traffic drifted from what the bundle was calibrated on? Scores against calibration scores.

Use `drift_test(scores, calibration_scores, threshold)` after scoring a batch of images
(`rwood-score` does, at the end of every run), and `calibration_rank` to place live scores among
the calibration scores (the server's `rwood_score_rank` histogram). The calibration scores are the
KNN scores of the bundle's held-out in-distribution images, the ones that set its threshold
(`rwood-export` stores them in the bundle; bundles exported before that have none, and the test is
skipped).

The test is SciPy's two-sample Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`, exact for small
samples, asymptotic for large ones): under "these scores come from the calibration distribution"
its p-value is uniform, so p < alpha flags a shift of any shape (lower scores: new kinds of images;
higher: near-duplicates of the training set) with false-alarm rate alpha. With thousands of scores
it flags small shifts too: read the statistic (the largest gap between the two CDFs) and the OOD
rate against the expected one for how large the shift is. Images that failed to decode have no
score and take no part.
Test: tests/runtime/test_drift.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["DriftReport", "drift_test", "calibration_rank", "expected_ood_rate", "MIN_SCORES"]

MIN_SCORES = 2          # fewer scores on either side cannot be compared


@dataclass(frozen=True)
class DriftReport:
    """The two-sample KS test of scored images against the calibration scores."""

    n: int                      # scores tested (scored images)
    n_calibration: int          # calibration scores in the bundle
    statistic: float            # KS statistic: the largest gap between the two empirical CDFs
    pvalue: float               # probability of a gap this large without drift
    ood_rate: float             # share of the tested scores below the threshold
    expected_ood_rate: float    # share of the calibration scores below it (~ 1 - TPR)
    alpha: float | None = None  # significance level asked for (--fail-on-drift), if any

    @property
    def drifted(self) -> bool:
        """True when `alpha` was given and p < alpha."""
        return self.alpha is not None and self.pvalue < self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted": self.drifted}

    def summary(self) -> str:
        """One line for people: the statistic, the p-value and the OOD rate against the expected."""
        verdict = ("" if self.alpha is None else
                   f"; drift at alpha {self.alpha:g}: {'YES' if self.drifted else 'no'}")
        return (f"drift test (two-sample KS, {self.n} scores vs {self.n_calibration} calibration "
                f"scores): statistic {self.statistic:.4f}, p-value {self.pvalue:.3g}; OOD rate "
                f"{self.ood_rate:.1%} (expected {self.expected_ood_rate:.1%}){verdict}")


def expected_ood_rate(calibration_scores: np.ndarray, threshold: float) -> float:
    """Share of the calibration scores below `threshold` (what the threshold was set to flag)."""
    calibration = np.asarray(calibration_scores, dtype=np.float32)
    return float(np.mean(calibration < np.float32(threshold)))


def calibration_rank(scores: np.ndarray, sorted_calibration: np.ndarray) -> np.ndarray:
    """Each score's place among the calibration scores: the share of them <= it, float64 [N] in
    [0, 1]. `sorted_calibration` must be sorted ascending (float32 [M], M >= 1)."""
    ranks = np.searchsorted(sorted_calibration, np.asarray(scores, dtype=np.float32), side="right")
    return ranks / float(len(sorted_calibration))


def drift_test(scores: np.ndarray, calibration_scores: np.ndarray, threshold: float,
               alpha: float | None = None) -> DriftReport:
    """Two-sample KS test of `scores` (float [N], NaN = not scored, dropped) against
    `calibration_scores` (float [M]); the OOD rates use `threshold` (score < threshold is OOD).

    Raises InputError naming `scores` or `calibration_scores` when either has fewer than
    MIN_SCORES finite values, and naming `alpha` when it is not in (0, 1).
    """
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise InputError(f"expected a significance level in (0, 1), got {alpha!r}", field="alpha")
    from scipy import stats  # here: the server imports this module for calibration_rank only

    tested = _finite(scores, "scores")
    calibration = _finite(calibration_scores, "calibration_scores")
    result = stats.ks_2samp(tested, calibration)
    return DriftReport(n=int(tested.size), n_calibration=int(calibration.size),
                       statistic=float(result.statistic), pvalue=float(result.pvalue),
                       ood_rate=float(np.mean(tested < np.float32(threshold))),
                       expected_ood_rate=expected_ood_rate(calibration, threshold), alpha=alpha)


def _finite(values: Any, field: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).ravel()
    array = array[np.isfinite(array)]
    if array.size < MIN_SCORES:
        raise InputError(f"need at least {MIN_SCORES} scores to compare, got {array.size}",
                         field=field)
    return array

