"""A bundle's scorer, opened for scoring: KNN over its index, or the Mahalanobis class Gaussians.

Use `open_scorer(bundle)` where a `Detector` is built: for a KNN bundle it reads the index, sets
the search parameters recorded in the manifest (the ones export checked against exact search),
applies an operator's override (logged as a warning: the threshold and the export check hold for
the recorded ones only), describes the index (type, rows, bytes, parameters) and moves it to the
GPU when asked; for a Mahalanobis bundle it reads the means and the precision matrix. Both
scorers answer `.score(emb) -> (scores, predicted)`.
Test: tests/runtime/test_bundle_scorers.py, tests/runtime/test_server_scorer.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from . import ann
from .bundle import Bundle
from .errors import BundleError, InputError
from .knn import KNNScorer, index_to_device
from .mahalanobis import MahalanobisScorer

__all__ = ["OpenScorer", "open_scorer"]

log = logging.getLogger(__name__)


@dataclass
class OpenScorer:
    """The scorer of a bundle and what to report about it."""

    scorer: KNNScorer | MahalanobisScorer
    kind: str                           # "knn" or "mahalanobis" (Manifest.scorer)
    device: str                         # where the search runs: "cpu" or "cuda"
    description: dict[str, Any]         # fixed facts: kind (ann.index_kind or "mahalanobis"),
                                        # type, factory, rows, bytes, float16, ...

    def info(self) -> dict[str, Any]:
        """{"scorer": kind, "device", **description} + the search parameters in force and the
        query counters (KNN: queries, short_queries)."""
        out = {"scorer": self.kind, "device": self.device, **self.description}
        if isinstance(self.scorer, KNNScorer):
            out.update(search_params=ann.current_search_params(self.scorer.index),
                       queries=self.scorer.queries, short_queries=self.scorer.short_queries)
        return out


def open_scorer(bundle: Bundle, *, device: str = "cpu",
                search_params: dict[str, int] | None = None) -> OpenScorer:
    """The scorer `bundle.manifest.scorer` names, ready to score.

    device: "cpu", or "cuda:N" to put a KNN index on that GPU (`runtime.faiss_device` decides;
    faiss with GPU support only; HNSW stays on the CPU).
    search_params: override of the manifest's search parameters ({"nprobe": 64}); InputError
    naming `search` for a name the index does not take (or any, for Flat and Mahalanobis).
    Raises BundleError naming the file when the scorer's data does not match the manifest.
    """
    m = bundle.manifest
    override = ann.check_search_params(search_params, "search")
    if m.scorer == "mahalanobis":
        if override:
            raise InputError("the mahalanobis scorer has no search parameters", field="search")
        scorer = MahalanobisScorer(*bundle.read_mahalanobis())
        return OpenScorer(scorer, "mahalanobis", "cpu",
                          {"kind": "mahalanobis", "type": type(scorer).__name__, "factory": "",
                           "rows": scorer.num_classes, "dim": scorer.dim,
                           "bytes": scorer.nbytes, "exact": True, "float16": False})
    index = bundle.read_index()
    try:
        recorded = ann.apply_search_params(index, m.index.search_params, "index.search_params")
    except InputError as e:
        raise BundleError(str(e), path=bundle.index_path) from None
    if override:
        now = ann.apply_search_params(index, override, "search")
        log.warning("search parameters %s override the bundle's %s: the threshold and the "
                    "export check (K-th-neighbour recall %s) were measured with the bundle's",
                    now, recorded, (m.index.check or {}).get("recall_kth", "n/a"))
    description = ann.describe_index(index)
    description.pop("search_params")
    description.update(factory=m.index.factory, float16=False)
    gpu = False
    if device != "cpu":
        cpu_index, index = index, index_to_device(index, device)
        gpu = index is not cpu_index                  # HNSW stays on the CPU
        description["float16"] = gpu and ann.gpu_cloner_options(cpu_index)[1]
    scorer = KNNScorer(index, bundle.labels, m.k, num_classes=len(m.class_names))
    return OpenScorer(scorer, "knn", "cuda" if gpu else "cpu", description)
