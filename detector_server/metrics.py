"""OOD detection metrics with in-distribution (ID) as the positive class and higher score = more ID.

Use this module for every reported detection number and for the deployed threshold: training-time
evaluation, export calibration and benchmarks all call it, so a threshold and the FPR it implies are
computed one way. Numpy only (the runtime may not have scikit-learn); the tests check every function
against scikit-learn on real score arrays.

Conventions (DESIGN.md section 2):
- `threshold_at_tpr(id, tpr)`: the largest t with mean(id >= t) >= tpr (an ID score at or above t
  is accepted as in-distribution).
- FPR@95 = fraction of OOD scores >= threshold_at_tpr(id, 0.95).
- `fpr_at_tpr_ood_positive`: OpenOOD's evaluator's FPR@95 (the authors' released code reports it),
  with OOD as the positive class: the fraction of ID scores at or below the threshold that flags
  95% of the OOD scores. A different number from FPR@95 above; reports name it apart.
- AUROC = P(id > ood) + 0.5 * P(id == ood) (ties count half, as sklearn's roc_auc_score).
- AUPR-In = average precision with ID positive and the score as is; AUPR-Out = average precision
  with OOD positive and the negated score. Average precision is sklearn's
  `average_precision_score`: sum over distinct thresholds of (R_k - R_{k-1}) * P_k, no
  interpolation, tied scores entering together.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError

__all__ = ["threshold_at_tpr", "fpr_at_tpr", "fpr_at_tpr_ood_positive", "auroc", "aupr_in",
           "aupr_out", "average_precision", "ood_metrics"]


def _scores(x: np.ndarray, field: str) -> np.ndarray:
    """Validate a non-empty, finite, 1-D numeric array; return it as float64."""
    a = np.asarray(x)
    if a.dtype.kind not in "iuf":
        raise InputError(f"expected numeric scores, got dtype {a.dtype}", field=field)
    if a.ndim != 1 or a.size == 0:
        raise InputError(f"expected a non-empty 1-D array, got shape {a.shape}", field=field)
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise InputError(f"contains {int((~np.isfinite(a)).sum())} NaN or infinite values",
                         field=field)
    return a


def _check_tpr(tpr: float) -> float:
    if not isinstance(tpr, (int, float)) or not 0.0 < tpr <= 1.0:
        raise InputError(f"expected a number in (0, 1], got {tpr!r}", field="tpr")
    return float(tpr)


def threshold_at_tpr(id_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The largest threshold t such that mean(id_scores >= t) >= tpr.

    id_scores: [N] finite scores of in-distribution samples. tpr in (0, 1].
    t is always one of the ID scores: with the scores sorted in decreasing order, t is the k-th
    one, k the smallest integer with k / N >= tpr. Ties can make the achieved TPR exceed `tpr`
    (all samples tied with t are accepted). Raises InputError naming `id_scores` or `tpr`.
    """
    s = _scores(id_scores, "id_scores")
    tpr = _check_tpr(tpr)
    n = s.size
    k = max(1, min(n, math.ceil(tpr * n)))
    while k > 1 and (k - 1) / n >= tpr:  # guard against tpr * n rounding up past an integer
        k -= 1
    while k / n < tpr:
        k += 1
    return float(np.sort(s)[::-1][k - 1])


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD samples scored >= threshold_at_tpr(id_scores, tpr). Range [0, 1]."""
    t = threshold_at_tpr(id_scores, tpr)
    o = _scores(ood_scores, "ood_scores")
    return float(np.mean(o >= t))


def fpr_at_tpr_ood_positive(id_scores: np.ndarray, ood_scores: np.ndarray,
                            tpr: float = 0.95) -> float:
    """FPR at `tpr` TPR with OOD as the positive class (OpenOOD's convention). Range [0, 1].

    An image is flagged OOD when its score is at or below t, with t the smallest threshold that
    flags at least `tpr` of the OOD scores; the result is the fraction of ID scores flagged.
    Equals `fpr_at_tpr` with the roles of the sets swapped and the scores negated.
    """
    return fpr_at_tpr(-_scores(ood_scores, "ood_scores"), -_scores(id_scores, "id_scores"), tpr)


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve, ID positive: P(id > ood) + 0.5 P(id == ood). Range [0, 1]."""
    i, o = _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")
    allv = np.concatenate([i, o])
    # average ranks (1-based) with ties sharing the mean of their positions: Mann-Whitney U
    uniq, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    avg_rank = first + (counts + 1) / 2.0
    r_id = avg_rank[inv[: i.size]].sum()
    u = r_id - i.size * (i.size + 1) / 2.0
    return float(u / (i.size * o.size))


def average_precision(pos_scores: np.ndarray, neg_scores: np.ndarray,
                      pos_field: str = "pos_scores", neg_field: str = "neg_scores") -> float:
    """Average precision of ranking positives above negatives (sklearn's definition, see module doc).

    pos_scores [P], neg_scores [M]: finite; higher = more likely positive. Range (0, 1].
    """
    p, q = _scores(pos_scores, pos_field), _scores(neg_scores, neg_field)
    s = np.concatenate([p, q])
    y = np.concatenate([np.ones(p.size), np.zeros(q.size)])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / p.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with ID as the positive class (score as is)."""
    return average_precision(id_scores, ood_scores, "id_scores", "ood_scores")


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Average precision with OOD as the positive class and the negated score."""
    return average_precision(-_scores(ood_scores, "ood_scores"), -_scores(id_scores, "id_scores"),
                             "ood_scores", "id_scores")


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    """All detection metrics for one OOD set.

    Returns {"fpr@95": FPR at `tpr` TPR (the key says the percent, e.g. "fpr@90" for tpr=0.9),
    "auroc", "aupr_in", "aupr_out"}: plain floats in [0, 1].
    Raises InputError naming `id_scores`/`ood_scores` for empty, non-1-D or non-finite input.
    """
    i, o = _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")
    return {f"fpr@{_check_tpr(tpr) * 100:g}": fpr_at_tpr(i, o, tpr), "auroc": auroc(i, o),
            "aupr_in": aupr_in(i, o), "aupr_out": aupr_out(i, o)}
