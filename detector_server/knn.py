"""The one KNN scorer: FAISS inner-product search on unit embeddings, K-th-neighbour distance score.

Use this module wherever an embedding must be scored against the in-distribution bank: training-time
evaluation (`trainer.evaluate`), threshold calibration at export and the deployed runtime all call
`KNNScorer.score`, so the numbers reported by evaluation are the numbers the runtime produces.

Convention (DESIGN.md section 2): embeddings are float32 L2-normalised rows; on unit vectors the
squared Euclidean distance is `2 - 2 * cos`, so an inner-product index ranks neighbours exactly as an
L2 index would. The score is the negated Euclidean distance to the K-th nearest bank row:
`-sqrt(max(0, 2 - 2 * s_K))`, higher = more in-distribution.

An approximate index (IVF, HNSW) must be searched with the parameters it was checked with at
export (`detector_server.ann`, `detector_server.index_choice`); a query that still gets fewer
than K neighbours scores -2 and is counted by `KNNScorer.short_queries` and logged, never silent.

Numpy + faiss only (no torch); thin functions, no module state, progress to the module logger.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from . import ann
from ._faiss import faiss
from .errors import InputError

__all__ = ["build_index", "knn_score_from_similarities", "index_to_device", "KNNScorer",
           "DEFAULT_CHUNK_ROWS", "TRAIN_ROWS_PER_CELL", "default_k", "SMALL_BANK_SHARE"]

log = logging.getLogger(__name__)

SMALL_BANK_SHARE = 2 / 3   # default_k: a K above this share of the smallest class is too big
DEFAULT_CHUNK_ROWS = 4096  # query rows per faiss search call: bounds the [rows, K] result arrays
_UNIT_TOL = 1e-3           # |norm - 1| allowed for a row given to build_index
# An IVF's k-means trains on at most this many rows per cell (faiss's default, 256, takes 4x the
# time: 20 s instead of 5 for 512 cells on 2 cores); faiss warns below 39.
TRAIN_ROWS_PER_CELL = 64


def default_k(num_classes: int, bank_size: int, class_sizes: Sequence[int] | None = None) -> int:
    """K when none is configured: CIDER's 300 for more than 10 classes, else 100, unless the bank is
    small for it. Plain integers in and out; every change from 100/300 is logged with `--k`.

    The small-bank rule (with `class_sizes`, the bank rows of each class): when that K would be
    more than two thirds (SMALL_BANK_SHARE) of the smallest class, K is a tenth of the smallest
    class (at least 1). An ID image's K-th neighbour must lie in its own class, or the score is the
    distance to another class: on 6 digit classes of 138 rows, near-OOD FPR@95 rose from 13% (K=1)
    to 29% (5), 47% (20) and 97% (100). The rule leaves the published settings alone (300 of
    CIFAR-100's 500 per class is 60%), and bigger banks too: on weakly trained CIFAR-10 models
    (950 rows per class) K=19 did worse than 100. Without `class_sizes`: K capped at `bank_size`.
    """
    k = 300 if num_classes > 10 else 100
    smallest = min(class_sizes) if class_sizes is not None and len(class_sizes) else None
    if smallest is not None and k > SMALL_BANK_SHARE * smallest:
        small = max(1, smallest // 10)
        log.warning("K=%d: the default K=%d would be %.0f%% of the smallest class (%d bank rows), "
                    "so its images' K-th neighbours would lie in other classes; for small banks K "
                    "is a tenth of the smallest class. Pass --k to choose another (smaller K "
                    "separates near-OOD better on small banks)", small, k, 100.0 * k / smallest,
                    smallest)
        return small
    if k > bank_size:
        log.warning("K=%d is larger than the bank (%d rows); using K=%d (--k sets another)", k,
                    bank_size, bank_size)
    return min(k, bank_size)


def _check_embeddings(x: np.ndarray, field: str, dim: int | None = None) -> np.ndarray:
    """Validate a float32 [N, D] finite, non-empty array; return it C-contiguous."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise InputError(f"expected a float32 numpy array, got {getattr(x, 'dtype', type(x))}",
                         field=field)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"expected a non-empty 2-D array [N, D], got shape {x.shape}", field=field)
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"expected {dim} columns (the index dimension), got {x.shape[1]}",
                         field=field)
    if not np.isfinite(x).all():
        raise InputError("contains NaN or infinite values", field=field)
    return np.ascontiguousarray(x)


def build_index(embeddings: np.ndarray, factory: str = "Flat") -> faiss.Index:
    """Build an inner-product FAISS index over unit-norm bank embeddings.

    embeddings: float32 [N, D], finite, every row L2-normalised (|norm - 1| <= 1e-3).
    factory: a `faiss.index_factory` string ("Flat" = exact search, the default; "IVF64,Flat",
        "IVF64,PQ16", "HNSW32", ...). Indexes that need training (IVF, PQ) are trained on
        `embeddings` themselves (an IVF's cells on a random sample of TRAIN_ROWS_PER_CELL rows
        per cell) before the rows are added. Search parameters stay faiss's defaults: set them
        with `ann.apply_search_params`.
    Returns an index with `ntotal == N`, `d == D`, metric `METRIC_INNER_PRODUCT`.
    Raises InputError naming `embeddings` or `factory` when the input or the factory is unusable.
    """
    x = _check_embeddings(embeddings, "embeddings")
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > _UNIT_TOL)
    if bad.size:
        raise InputError(f"expected L2-normalised rows; row {bad[0]} has norm {norms[bad[0]]:.4f} "
                         f"({bad.size} rows off)", field="embeddings")
    if not isinstance(factory, str) or not factory.strip():
        raise InputError(f"expected a faiss index_factory string, got {factory!r}", field="factory")
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.max_points_per_centroid = TRAIN_ROWS_PER_CELL
        if not index.is_trained:
            log.info("training faiss index %r on %d rows", factory, x.shape[0])
            index.train(x)
        index.add(x)
    except RuntimeError as e:  # faiss reports bad strings and too-small training sets this way
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot build a {factory!r} index on {x.shape[0]} x {x.shape[1]} "
                         f"embeddings: {msg}", field="factory") from None
    return index


def knn_score_from_similarities(sims: np.ndarray) -> np.ndarray:
    """KNN score from the neighbours' inner products.

    sims: float32 [N, K], each row sorted in decreasing order (as faiss returns them).
    Returns float32 [N] = -sqrt(max(0, 2 - 2 * sims[:, K-1])): the Euclidean distance to the K-th
    nearest neighbour of unit vectors, negated (higher = more in-distribution). Similarities are
    clipped to [-1, 1] first, so a missing neighbour (faiss pads with -FLT_MAX) scores -2, the
    largest possible distance, instead of -inf.
    """
    if not isinstance(sims, np.ndarray) or sims.ndim != 2 or sims.shape[1] == 0:
        raise InputError(f"expected a 2-D array [N, K] with K >= 1, got "
                         f"{getattr(sims, 'shape', type(sims))}", field="sims")
    s_k = np.clip(sims[:, -1].astype(np.float32), -1.0, 1.0)
    return -np.sqrt(np.maximum(np.float32(0.0), np.float32(2.0) - np.float32(2.0) * s_k))


def index_to_device(index: faiss.Index, device: str = "auto") -> faiss.Index:
    """Return `index` on the requested device: "cpu", "cuda"/"cuda:N" or "auto" (GPU 0 if faiss
    sees one, else CPU). Use it once after loading/building, before scoring many queries.

    A GPU needs a faiss build with GPU support (`faiss.get_num_gpus() > 0`); "cuda" without one
    raises InputError naming `device`. Large indexes are stored as float16 there
    (`ann.gpu_cloner_options`); the index's search parameters are set again on the GPU copy; an
    index faiss cannot put on a GPU (HNSW) stays on the CPU, with a warning. Logs the device.
    """
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "auto":
        device = "cuda:0" if ngpu > 0 else "cpu"
    if device == "cpu":
        log.info("faiss index on CPU (%d rows)", index.ntotal)
        return index
    if not isinstance(device, str) or not (device == "cuda" or device.startswith("cuda:")):
        raise InputError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}",
                         field="device")
    gpu = int(device.partition(":")[2] or 0)
    if gpu >= ngpu:
        raise InputError(f"faiss sees {ngpu} GPU(s); cannot use {device!r} (install faiss-gpu "
                         "or use --device cpu)", field="device")
    if ann.index_kind(index) == "hnsw":
        log.warning("faiss has no GPU HNSW: the %d-row index stays on the CPU", index.ntotal)
        return index
    options, fp16 = ann.gpu_cloner_options(index)
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, gpu, index, options)
    gpu_index.referenced_objects = [res]  # keep the resources alive as long as the index
    ann.apply_search_params(gpu_index, ann.current_search_params(index))
    log.info("faiss index on GPU %d (%d rows, %s)", gpu, index.ntotal,
             "float16" if fp16 else "float32")
    return gpu_index


class KNNScorer:
    """Scores embeddings by the distance to their K-th nearest bank row and predicts a class.

    index: a FAISS inner-product index over the unit bank embeddings (`build_index`, or
        `faiss.read_index` of a bundle's index.faiss), `ntotal` rows of dimension `d`.
    labels: int64 [ntotal], class of each indexed row, in [0, num_classes).
    k: number of neighbours, 1 <= k <= ntotal.
    num_classes: number of classes C; default `labels.max() + 1`.
    chunk_rows: queries per faiss search call (memory is O(chunk_rows * k)).

    The predicted class is the majority vote of the K neighbours' labels; a tie in votes goes to
    the class with the larger summed similarity over its voting neighbours, then to the smaller
    label. Missing neighbours (faiss returns id -1, possible with IVF and a small nprobe) do not
    vote; a query with no neighbour at all predicts class 0 and scores -2. A query short of K
    neighbours scores -2 (never in-distribution): `queries` and `short_queries` count all queries
    scored and those short of K, and the first short one (then each doubling) is logged.
    """

    def __init__(self, index: faiss.Index, labels: np.ndarray, k: int,
                 num_classes: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        if not hasattr(index, "search") or not hasattr(index, "ntotal"):
            raise InputError(f"expected a faiss index, got {type(index).__name__}", field="index")
        if index.ntotal < 1:
            raise InputError("the index holds no rows", field="index")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (index.ntotal,):
            raise InputError(f"expected integer labels of shape ({index.ntotal},), got "
                             f"{labels.dtype} {labels.shape}", field="labels")
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise InputError(f"expected a positive integer, got {num_classes!r}", field="num_classes")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise InputError(f"expected labels in [0, {num_classes}), got range "
                             f"[{labels.min()}, {labels.max()}]", field="labels")
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= index.ntotal:
            raise InputError(f"expected an integer in [1, {index.ntotal}] (the index size), "
                             f"got {k!r}", field="k")
        if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise InputError(f"expected a positive integer, got {chunk_rows!r}", field="chunk_rows")
        self.index, self.k, self.num_classes = index, int(k), int(num_classes)
        self.labels = labels.astype(np.int64)
        self.chunk_rows = int(chunk_rows)
        self.queries = 0
        self.short_queries = 0

    def search(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw neighbours: (sims float32 [N, k] sorted decreasing, ids int64 [N, k], -1 = missing)."""
        x = _check_embeddings(emb, "emb", dim=self.index.d)
        parts = [self.index.search(x[i:i + self.chunk_rows], self.k)
                 for i in range(0, x.shape[0], self.chunk_rows)]
        return (np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False),
                np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False))

    def score(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score unit embeddings emb float32 [N, d].

        Returns (scores float32 [N], higher = more in-distribution, see
        `knn_score_from_similarities`; predicted int64 [N], the neighbours' vote, see the class doc).
        Queries are searched `chunk_rows` at a time, so memory stays O(chunk_rows * (k + C)).
        """
        return self.score_detailed(emb)[:2]

    def score_neighbors(self, emb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray, np.ndarray]:
        """`score`, plus the `n` nearest bank rows of each query (0 <= n <= k), from the same
        search: (scores float32 [N], predicted int64 [N], sims float32 [N, n] decreasing,
        ids int64 [N, n] bank rows, -1 = missing). InputError naming `neighbors` for a bad n.
        """
        scores, predicted, _, sims, ids = self.score_detailed(emb, n)
        return scores, predicted, sims, ids

    def score_detailed(self, emb: np.ndarray, n: int = 0) -> tuple[
            np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`score_neighbors` plus short bool [N]: (scores, predicted, short, sims, ids), where
        `short` marks the queries that got fewer than K neighbours (scored -2; counted)."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= self.k:
            raise InputError(f"expected an integer in [0, {self.k}] (K), got {n!r}",
                             field="neighbors")
        x = _check_embeddings(emb, "emb", dim=self.index.d)
        scores = np.empty(x.shape[0], dtype=np.float32)
        predicted = np.empty(x.shape[0], dtype=np.int64)
        short = np.empty(x.shape[0], dtype=bool)
        top_sims = np.empty((x.shape[0], n), dtype=np.float32)
        top_ids = np.empty((x.shape[0], n), dtype=np.int64)
        for i in range(0, x.shape[0], self.chunk_rows):
            sims, ids = self.index.search(x[i:i + self.chunk_rows], self.k)
            scores[i:i + len(sims)] = knn_score_from_similarities(sims)
            predicted[i:i + len(sims)] = self._vote(sims, ids)
            short[i:i + len(sims)] = ids[:, -1] < 0        # faiss pads missing neighbours last
            top_sims[i:i + len(sims)] = sims[:, :n]
            top_ids[i:i + len(sims)] = ids[:, :n]
        self._count(int(short.sum()), len(short))
        return scores, predicted, short, top_sims, top_ids

    def _count(self, short: int, n: int) -> None:
        before = self.short_queries
        self.queries += n
        self.short_queries += short
        if short and (before == 0 or before.bit_length() != self.short_queries.bit_length()):
            log.warning("%d of %d queries so far got fewer than K=%d neighbours from the %s and "
                        "scored -2 (the largest distance): its search parameters %s are too low",
                        self.short_queries, self.queries, self.k,
                        type(faiss.downcast_index(self.index)).__name__,
                        ann.current_search_params(self.index))

    def _vote(self, sims: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Majority vote per row; ties -> larger summed similarity -> smaller label."""
        n, c = ids.shape[0], self.num_classes
        valid = ids >= 0
        flat = (np.arange(n)[:, None] * c + self.labels[np.where(valid, ids, 0)])[valid]
        counts = np.bincount(flat, minlength=n * c).reshape(n, c)
        sim_sum = np.bincount(flat, weights=sims[valid].astype(np.float64),
                              minlength=n * c).reshape(n, c)
        top = counts == counts.max(axis=1, keepdims=True)
        # argmax returns the first (smallest) label among exact ties of the summed similarity
        return np.argmax(np.where(top, sim_sum, -np.inf), axis=1).astype(np.int64)
