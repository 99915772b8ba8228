"""Mahalanobis (MDS) OOD scoring: class means plus one shared covariance of the bank features.

Use `MahalanobisScorer(bank, labels)` as the alternative to `detector_server.knn.KNNScorer` in
evaluation and benchmarks (same `.score(emb) -> (scores, predicted)` interface). DESIGN.md section
2: features are L2-normalised; Sigma is the covariance of the class-centred bank features (divided by
N, as sklearn's EmpiricalCovariance); score(x) = max_c -(x - mu_c)^T Sigma^+ (x - mu_c) with
Sigma^+ the pseudo-inverse (Sigma is singular when N < D). Higher = more in-distribution.
Numpy only; not part of the deployed runtime (the bundle indexes KNN).
"""
from __future__ import annotations

import numpy as np

from detector_server.errors import InputError

__all__ = ["MahalanobisScorer"]


def _unit(x: np.ndarray, field: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.dtype.kind != "f" or not np.isfinite(x).all():
        raise InputError(f"expected a finite non-empty float array [N, D], got {x.dtype} {x.shape}",
                         field=field)
    return x.astype(np.float64) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class MahalanobisScorer:
    """Class-conditional Gaussians with a shared covariance, fitted on the bank.

    bank: float [N, D] bank features (normalised here); labels: int [N] in [0, num_classes).
    Every class in [0, num_classes) must have at least one row.
    """

    def __init__(self, bank: np.ndarray, labels: np.ndarray, num_classes: int | None = None,
                 chunk_rows: int = 4096):
        h = _unit(bank, "bank")
        y = np.asarray(labels)
        if y.shape != (h.shape[0],) or y.dtype.kind not in "iu" or y.min() < 0:
            raise InputError(f"expected non-negative integer labels of shape ({h.shape[0]},)",
                             field="labels")
        num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
        counts = np.bincount(y, minlength=num_classes)
        if len(counts) > num_classes or (counts == 0).any():
            raise InputError(f"every class in [0, {num_classes}) needs bank rows; counts "
                             f"{counts.tolist()}", field="labels")
        self.means = np.stack([h[y == c].mean(0) for c in range(num_classes)])   # [C, D]
        centred = h - self.means[y]
        cov = centred.T @ centred / h.shape[0]
        self.precision = np.linalg.pinv(cov, hermitian=True)                      # [D, D]
        self._mu_p = self.means @ self.precision                                 # [C, D]
        self._mu_p_mu = np.einsum("cd,cd->c", self._mu_p, self.means)            # [C]
        self.chunk_rows = chunk_rows

    def distances(self, emb: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances float64 [N, C] of normalised `emb` to every class mean."""
        x = _unit(emb, "emb")
        if x.shape[1] != self.means.shape[1]:
            raise InputError(f"expected {self.means.shape[1]} columns, got {x.shape[1]}", field="emb")
        out = np.empty((x.shape[0], self.means.shape[0]))
        for i in range(0, x.shape[0], self.chunk_rows):
            xc = x[i:i + self.chunk_rows]
            xpx = np.einsum("nd,nd->n", xc @ self.precision, xc)
            out[i:i + len(xc)] = xpx[:, None] - 2.0 * xc @ self._mu_p.T + self._mu_p_mu[None, :]
        return np.maximum(out, 0.0)

    def score(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [N] = max_c -d_c(x), predicted int64 [N] = the nearest class)."""
        d = self.distances(emb)
        return (-d.min(axis=1)).astype(np.float32), d.argmin(axis=1).astype(np.int64)
