"""How far an approximate index's KNN scores are from exact search: the export-time check.

Use `exact_neighbours` once per query set (exhaustive search over the bank rows) and
`check_index(index, bank, queries, k, exact=...)` for each configuration to try; the result
(`SearchCheck.to_dict()`) is what the manifest and the export log carry. `rwood-export` refuses a
configuration whose `recall_kth` is below its `--min-recall` or where any query got fewer than K
neighbours (`short_queries`: such a query would score -2, the largest distance there is).

Definitions (K = the bundle's k; "exact" = exhaustive inner-product search over the bank):
- recall_kth: fraction of queries whose exact K-th neighbour is among the K the index returns
  (a returned row with the same inner product counts: ties are interchangeable for the score);
- recall_at_k: mean fraction of the exact K neighbours returned (for comparison with faiss's
  usual recall figures);
- max_score_diff: largest |approximate - exact| KNN score (`knn.knn_score_from_similarities`);
- tpr_approx / tpr_exact: fraction of the queries at or above the threshold (the runtime's own,
  calibrated on the approximate scores) with approximate / exact scores;
- with OOD query sets, per set: fpr_exact (exact scores at the exact threshold for `tpr`),
  fpr_approx (approximate scores at the deployed threshold), fpr_change = fpr_approx -
  fpr_exact, and the set's own recall_kth and short_queries.
An IVF or HNSW index with exact distances can only miss neighbours, so its scores are never
above the exact ones: it loses TPR, not FPR. SQ8/PQ codes change the distances both ways.
Numpy + faiss only. Test: tests/runtime/test_ann.py.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._faiss import faiss
from .errors import InputError
from .knn import DEFAULT_CHUNK_ROWS, knn_score_from_similarities
from .metrics import threshold_at_tpr
from .validate import is_int

__all__ = ["Neighbours", "SearchCheck", "exact_neighbours", "search_neighbours", "recalls",
           "check_index", "TIE_TOL"]

log = logging.getLogger(__name__)

TIE_TOL = 1e-5          # inner products this close count as the same neighbour distance


@dataclass(frozen=True)
class Neighbours:
    """K nearest bank rows of N queries: sims float32 [N, K] decreasing, ids int64 [N, K] (-1 =
    missing, as faiss pads)."""

    sims: np.ndarray
    ids: np.ndarray

    @property
    def scores(self) -> np.ndarray:
        """float32 [N] KNN scores (missing K-th neighbour -> -2)."""
        return knn_score_from_similarities(self.sims)


@dataclass(frozen=True)
class SearchCheck:
    """An approximate index against exact search on one query set (definitions: module doc)."""

    k: int
    n_queries: int
    recall_kth: float
    recall_at_k: float
    short_queries: int
    max_score_diff: float
    threshold: float
    tpr_target: float
    tpr_approx: float
    tpr_exact: float
    ood: dict[str, dict[str, float]] | None = None  # per OOD set: n, recall_kth, short_queries,
                                          # fpr_exact, fpr_approx, fpr_change

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One log line."""
        text = (f"K-th-neighbour recall {self.recall_kth:.4f} (recall@K {self.recall_at_k:.4f}), "
                f"{self.short_queries} of {self.n_queries} queries short of K={self.k}, max score "
                f"diff {self.max_score_diff:.3g}, TPR at threshold {self.tpr_approx:.4f} "
                f"(exact scores {self.tpr_exact:.4f})")
        for name, o in (self.ood or {}).items():
            text += (f"; {name} ({o['n']}): FPR {o['fpr_approx']:.4f} vs exact "
                     f"{o['fpr_exact']:.4f} ({o['fpr_change']:+.4f}), recall {o['recall_kth']:.4f}")
        return text


def _check_queries(x: Any, dim: int, field: str) -> np.ndarray:
    if (not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or not len(x)
            or x.shape[1] != dim or not np.isfinite(x).all()):
        raise InputError(f"expected finite float32 [N, {dim}] with N >= 1, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}",
                         field=field)
    return np.ascontiguousarray(x)


def search_neighbours(index: Any, queries: np.ndarray, k: int,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Neighbours:
    """`index.search` in chunks of `chunk_rows` queries -> Neighbours."""
    q = _check_queries(queries, index.d, "queries")
    parts = [index.search(q[i:i + chunk_rows], k) for i in range(0, len(q), chunk_rows)]
    return Neighbours(np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False),
                      np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False))


def exact_neighbours(bank: np.ndarray, queries: np.ndarray, k: int) -> Neighbours:
    """Exact K nearest bank rows by inner product (faiss's exhaustive BLAS search).

    bank: float32 [N, D] unit rows; queries: float32 [M, D]. Costs M x N x D multiply-adds (about
    1 s per 10^11 on one core), so give it the query set once and reuse the result.
    """
    if not isinstance(bank, np.ndarray) or bank.dtype != np.float32 or bank.ndim != 2:
        raise InputError(f"expected float32 [N, D], got {getattr(bank, 'dtype', type(bank))}",
                         field="bank")
    if not is_int(k) or not 1 <= k <= len(bank):
        raise InputError(f"expected an integer in [1, {len(bank)}], got {k!r}", field="k")
    flat = faiss.IndexFlatIP(bank.shape[1])
    flat.add(np.ascontiguousarray(bank))
    return search_neighbours(flat, queries, k)


def _true_sims(bank: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact inner products float32 [M, K] of each query with its returned rows (nan if -1)."""
    out = np.full(ids.shape, np.nan, dtype=np.float32)
    step = max(1, (1 << 22) // max(1, ids.shape[1] * bank.shape[1]))   # ~16 MiB of gathered rows
    for i in range(0, len(ids), step):
        idx = ids[i:i + step]
        rows = bank[np.where(idx >= 0, idx, 0)]                      # [m, K, D]
        sims = np.einsum("mkd,md->mk", rows, queries[i:i + step])
        out[i:i + step] = np.where(idx >= 0, sims, np.nan)
    return out


def recalls(bank: np.ndarray, queries: np.ndarray, approx: Neighbours,
            exact: Neighbours) -> tuple[float, float, int]:
    """(recall_kth, recall_at_k, short_queries) of `approx` against `exact` (module doc) for
    `queries` float32 [M, D] searched in `bank` float32 [N, D]."""
    k = exact.ids.shape[1]
    kth = exact.ids[:, -1:]
    found = (approx.ids == kth).any(axis=1)
    if not found.all():  # a returned row with the K-th neighbour's inner product is as good
        true = _true_sims(bank, queries, approx.ids)
        found |= (np.abs(true - exact.sims[:, -1:]) <= TIE_TOL).any(axis=1)
    hits = [np.isin(a[a >= 0], e).sum() for a, e in zip(approx.ids, exact.ids)]
    short = int((approx.ids < 0).any(axis=1).sum())
    return float(found.mean()), float(np.mean(hits) / k), short


def check_index(index: Any, bank: np.ndarray, queries: np.ndarray, k: int, *,
                tpr: float = 0.95, threshold: float | None = None,
                exact: Neighbours | None = None,
                ood_queries: Mapping[str, np.ndarray] | None = None) -> SearchCheck:
    """Measure `index` (holding `bank`'s rows in order) against exact search.

    queries: float32 [M, D] in-distribution embeddings not in the bank (the calibration set);
    threshold: the deployed threshold (default: calibrated here on the approximate scores at
    `tpr`, as export does); exact: `exact_neighbours(bank, queries, k)` to reuse;
    ood_queries: {set name: float32 [M_i, D]} OOD embeddings for the FPR figures.
    The index's current search parameters are used as they are.
    """
    if index.ntotal != len(bank) or index.d != bank.shape[1]:
        raise InputError(f"index holds {index.ntotal} x {index.d}, bank is {bank.shape}",
                         field="bank")
    queries = _check_queries(queries, index.d, "queries")
    exact = exact if exact is not None else exact_neighbours(bank, queries, k)
    approx = search_neighbours(index, queries, k)
    recall_kth, recall_at_k, short = recalls(bank, queries, approx, exact)
    a_scores, e_scores = approx.scores, exact.scores
    t = float(threshold_at_tpr(a_scores, tpr) if threshold is None else threshold)
    ood = None
    if ood_queries:
        t_exact = np.float32(threshold_at_tpr(e_scores, tpr))
        ood = {}
        for name, x in ood_queries.items():
            x = _check_queries(x, index.d, f"ood_queries[{name}]")
            o_exact, o_approx = exact_neighbours(bank, x, k), search_neighbours(index, x, k)
            o_recall, _, o_short = recalls(bank, x, o_approx, o_exact)
            fpr_exact = float(np.mean(o_exact.scores >= t_exact))
            fpr_approx = float(np.mean(o_approx.scores >= np.float32(t)))
            ood[name] = {"n": int(len(x)), "recall_kth": o_recall, "short_queries": o_short,
                         "fpr_exact": fpr_exact, "fpr_approx": fpr_approx,
                         "fpr_change": fpr_approx - fpr_exact}
    return SearchCheck(
        k=int(k), n_queries=int(len(queries)), recall_kth=recall_kth, recall_at_k=recall_at_k,
        short_queries=short, max_score_diff=float(np.max(np.abs(a_scores - e_scores))),
        threshold=t, tpr_target=float(tpr),
        tpr_approx=float(np.mean(a_scores >= np.float32(t))),
        tpr_exact=float(np.mean(e_scores >= np.float32(t))), ood=ood)
