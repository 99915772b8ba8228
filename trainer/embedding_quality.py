"""Embedding quality as in the ReweightOOD paper, section 4.1: compactness and dispersion.

Use `embedding_quality(features, labels)` on the in-distribution bank to see whether an objective
gives tight, well-separated class clusters (what KNN/Mahalanobis OOD scoring relies on).

- Minimum-enclosing-sphere radius of class c: r_c = max_i ||h_i - mu_c|| over the class's
  L2-normalised features h_i, mu_c their mean. SMALLER = more compact classes = better.
  (The paper's "minimum enclosing sphere" is centred at the class mean, as here.)
- Dispersion: the mean cosine similarity between the class centroids mu_c / ||mu_c|| over all pairs
  c != c'. LOWER mean pairwise cosine = classes spread further apart on the sphere = better.
Numpy only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detector_server.errors import InputError

__all__ = ["class_radii", "centroid_cosines", "embedding_quality", "QUALITY_NOTE"]

QUALITY_NOTE = ("MES radius: max distance of a class's normalised features from the class mean "
                "(smaller = more compact = better). Dispersion: mean pairwise cosine between "
                "class centroids (lower = classes spread further apart = better).")


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate, L2-normalise rows; return (unit features float64, labels, sorted classes)."""
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] == 0 or f.dtype.kind != "f" or not np.isfinite(f).all():
        raise InputError(f"expected a finite non-empty float array [N, D], got "
                         f"{f.dtype} {f.shape}", field="features")
    y = np.asarray(labels)
    if y.shape != (f.shape[0],) or y.dtype.kind not in "iu":
        raise InputError(f"expected integer labels of shape ({f.shape[0]},), got {y.dtype} {y.shape}",
                         field="labels")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError("a feature row is all zeros and cannot be normalised", field="features")
    return f.astype(np.float64) / norms, y, np.unique(y)


def class_radii(features: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """r_c = max_i ||h_i - mu_c|| for every class c present (h_i L2-normalised first)."""
    h, y, classes = _check(features, labels)
    return {int(c): float(np.linalg.norm(h[y == c] - h[y == c].mean(0), axis=1).max())
            for c in classes}


def centroid_cosines(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix float64 [C, C] of the class centroids (classes in sorted order)."""
    h, y, classes = _check(features, labels)
    mu = np.stack([h[y == c].mean(0) for c in classes])
    mu /= np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
    return mu @ mu.T


def embedding_quality(features: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str] | None = None) -> dict[str, object]:
    """All of section 4.1 for one feature set.

    features: float [N, D] (normalised here), labels: int [N]. Needs at least two classes.
    class_names: when given, `radius_per_class` is keyed by name (else by label).
    Returns {"mean_radius": float, "radius_per_class": {class: float},
             "dispersion": float (mean pairwise centroid cosine, c != c'), "num_classes": int}.
    """
    radii = class_radii(features, labels)
    if class_names is not None:
        radii = {str(class_names[c]) if 0 <= c < len(class_names) else str(c): r
                 for c, r in radii.items()}
    if len(radii) < 2:
        raise InputError(f"dispersion needs at least two classes, got {len(radii)}", field="labels")
    cos = centroid_cosines(features, labels)
    off = cos[~np.eye(len(cos), dtype=bool)]
    return {"mean_radius": float(np.mean(list(radii.values()))), "radius_per_class": radii,
            "dispersion": float(off.mean()), "num_classes": len(radii)}
