"""Mahalanobis (MDS) OOD scoring for evaluation: fitted on the bank, scored by the runtime's code.

Use `MahalanobisScorer(bank, labels)` as the alternative to `detector_server.knn.KNNScorer` in
evaluation and benchmarks (same `.score(emb) -> (scores, predicted)` interface). The fit and the
score are `detector_server.mahalanobis` (the definition a `--scorer mahalanobis` bundle is served
with), so `rwood-eval --postprocessor mahalanobis` reports the deployed numbers. DESIGN.md
section 2: class means plus one shared covariance of the class-centred normalised bank features;
score(x) = max_c -(x - mu_c)^T Sigma^+ (x - mu_c), higher = more in-distribution.
"""
from __future__ import annotations

import numpy as np

from detector_server.mahalanobis import MahalanobisScorer as _Scorer
from detector_server.mahalanobis import fit_mahalanobis

__all__ = ["MahalanobisScorer"]


class MahalanobisScorer(_Scorer):
    """Class-conditional Gaussians with a shared covariance, fitted on the bank.

    bank: float [N, D] bank features (normalised here); labels: int [N] in [0, num_classes).
    Every class in [0, num_classes) must have at least one row. Attributes `means` float64
    [C, D] and `precision` float64 [D, D] are what an exported bundle stores.
    """

    def __init__(self, bank: np.ndarray, labels: np.ndarray, num_classes: int | None = None,
                 chunk_rows: int = 4096):
        means, precision = fit_mahalanobis(bank, labels, num_classes)
        super().__init__(means, precision, chunk_rows=chunk_rows)
