"""Editing a bundle's FAISS index in place of rebuilding it: add rows, remove rows, and how well
added rows fit an IVF index's trained centroids.

Use it from `detector_server.bank_edit` (rwood-bank). Every index the exporter can write works:
- add: `index.add`; an IVF or PQ index keeps its trained quantiser and codebooks (no retraining);
- remove: Flat and PQ (`IndexFlatCodes`) compact their rows in order; an IVF index removes the
  rows from its lists and renumbers the ids left so they stay bank rows 0..N-1 in order; an index
  that cannot remove rows (HNSW) is rebuilt with its factory string from its stored vectors;
- `require_bank`: only a KNN bundle has bank rows (a mahalanobis one scores with class means);
- `ivf_fit`: for IVF indexes, the similarity of rows to their nearest coarse centroid, compared
  with the calibration embeddings' (in-distribution rows the centroids were trained for): rows
  far from every centroid land in lists that a small nprobe may not visit.
Numpy + faiss only. Test: tests/runtime/test_bank_edit.py.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ._faiss import faiss
from .errors import BundleError
from .knn import build_index
from .manifest import Manifest

__all__ = ["add_rows", "remove_rows", "ivf_fit", "require_bank", "FAR_FRACTION_WARN"]

log = logging.getLogger(__name__)

FAR_FRACTION_WARN = 0.25    # warn when more added rows than this are "far" (5% expected in-distribution)


def require_bank(m: Manifest, path: str | os.PathLike) -> None:
    """BundleError (naming `path` and the field `scorer`) unless the bundle scores with KNN over
    a bank: a mahalanobis bundle keeps class means and a precision matrix, no rows to edit."""
    if m.scorer != "knn":
        raise BundleError(f"scores with the {m.scorer} class means and has no bank rows: "
                          "rwood-bank edits KNN bundles (rwood-export --scorer knn)", path=path,
                          field="scorer")


def add_rows(index: faiss.Index, emb: np.ndarray) -> None:
    """Append unit rows float32 [n, d] as bank rows ntotal..ntotal+n-1 (trained parts kept)."""
    index.add(np.ascontiguousarray(emb, dtype=np.float32))


def _ivf(index: faiss.Index) -> Any | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:            # not an IVF index (faiss raises for anything else)
        return None


def remove_rows(index: faiss.Index, keep: np.ndarray, factory: str) -> faiss.Index:
    """The index holding only the rows where `keep` (bool [ntotal]) is true, renumbered 0..m-1
    in their order. Returns `index` itself (edited) or a rebuilt index; BundleError when the
    index type can do neither."""
    drop = np.flatnonzero(~keep).astype(np.int64)
    if not drop.size:
        return index
    ivf = _ivf(index)
    if ivf is not None:
        _remove_ivf(index, ivf, keep, drop)
        return index
    try:
        removed = index.remove_ids(faiss.IDSelectorBatch(drop))
    except RuntimeError:            # HNSW and other graph indexes cannot remove
        return _rebuild(index, keep, factory)
    if removed != drop.size:
        raise BundleError(f"the index removed {removed} of {drop.size} rows", field="index")
    return index


def _remove_ivf(index: faiss.Index, ivf: Any, keep: np.ndarray, drop: np.ndarray) -> None:
    """IVF keeps explicit ids in its lists: remove, then renumber the survivors in order."""
    if ivf.direct_map.type != faiss.DirectMap.NoMap:
        raise BundleError("IVF index with a direct map: rebuild the bundle with rwood-export "
                          "(the exporter never writes one)", field="index")
    index.remove_ids(faiss.IDSelectorBatch(drop))
    new_id = np.cumsum(keep, dtype=np.int64) - 1           # old row -> new row (kept rows)
    lists = ivf.invlists
    for list_no in range(ivf.nlist):
        n = lists.list_size(list_no)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(lists.get_ids(list_no), n).copy()
        codes = faiss.rev_swig_ptr(lists.get_codes(list_no), n * lists.code_size).copy()
        renumbered = np.ascontiguousarray(new_id[ids])
        lists.update_entries(list_no, 0, n, faiss.swig_ptr(renumbered), faiss.swig_ptr(codes))


def _rebuild(index: faiss.Index, keep: np.ndarray, factory: str) -> faiss.Index:
    try:
        vectors = index.reconstruct_n(0, index.ntotal)
    except RuntimeError:
        raise BundleError(f"a {factory!r} index can neither remove rows nor give back its "
                          "vectors: export the bundle again without these rows",
                          field="index") from None
    log.info("rebuilding the %r index from its %d stored vectors (it cannot remove rows)",
             factory, index.ntotal)
    rows = vectors[keep]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)    # stored codes may be lossy
    return build_index(rows, factory)


def _coarse_similarity(index: faiss.Index, ivf: Any, emb: np.ndarray) -> np.ndarray:
    """float32 [n]: each row's similarity to its nearest coarse centroid (higher = closer)."""
    x = np.ascontiguousarray(emb, dtype=np.float32)
    chain = getattr(faiss.downcast_index(index), "chain", None)   # OPQ etc. before the IVF
    for i in range(chain.size() if chain is not None else 0):
        x = faiss.downcast_VectorTransform(chain.at(i)).apply(x)
    d, _ = ivf.quantizer.search(x, 1)
    return d[:, 0] if ivf.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT else -d[:, 0]


def ivf_fit(index: faiss.Index, added: np.ndarray,
            reference: np.ndarray | None) -> dict[str, Any] | None:
    """How the `added` rows (float32 [n, d]) sit among an IVF index's trained centroids; None for
    other indexes.

    Returns {"nlist", "added_median": median similarity to the nearest centroid, and with
    `reference` (the calibration embeddings, [m, d]): "reference_median", "reference_p05" (its
    5th percentile), "far_fraction" (added rows below it; about 0.05 for rows like the
    reference), "warn" (far_fraction > FAR_FRACTION_WARN)}.
    """
    ivf = _ivf(index)
    if ivf is None:
        return None
    sims = _coarse_similarity(index, ivf, added)
    out: dict[str, Any] = {"nlist": int(ivf.nlist), "added_median": float(np.median(sims))}
    if reference is not None and len(reference):
        ref = _coarse_similarity(index, ivf, reference)
        p05 = float(np.percentile(ref, 5))
        far = float(np.mean(sims < p05))
        out.update(reference_median=float(np.median(ref)), reference_p05=p05,
                   far_fraction=far, warn=far > FAR_FRACTION_WARN)
    return out
