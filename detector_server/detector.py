"""The deployed detector: a bundle's ONNX model + its scorer (KNN or Mahalanobis) + threshold.

Use `Detector(bundle_dir)` wherever images must be scored as the bundle says: the gRPC server,
`rwood-score`, and the exporter's own threshold calibration (so the deployed decision is exactly
the calibrated one). Two levels:
- arrays: `embed` / `score_arrays` take uint8 [N, S, S, 3] model input and raise InputError on
  anything else (`score_embeddings` scores rows `embed` returned);
- items: `prepare` decodes and resizes one item (encoded bytes, PIL image or uint8 array) by the
  bundle's preprocessing; `score_images` scores a list of them with per-item errors.
The model half is an `embedder.Embedder`, the scorer comes from `scorer.open_scorer` (which sets
the index's search parameters). Every scoring call takes `neighbors=N` (0 <= N <= K; KNN
bundles only): the N nearest bank rows behind each score (row, class, similarity, source), from
the very search that gave the score. ONNX Runtime and FAISS run on CUDA when present (see
`runtime` for device and thread policy). The methods may be called from any thread; the server
runs one batch at a time. Torch-free.
Test: tests/runtime/test_detector.py.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from . import ann, runtime
from .bank_sources import BankSources
from .bundle import Bundle, load_bundle
from .drift import calibration_rank, expected_ood_rate
from .embedder import Embedder
from .errors import InputError
from .knn import KNNScorer
from .preprocess import DEFAULT_MAX_PIXELS, decode_image, prepare_arrays, to_model_array
from .scorer import open_scorer
from .validate import check_int

__all__ = ["Detector", "ItemResult", "Neighbor", "ScoreBatch", "merge_results",
           "DEFAULT_MAX_PIXELS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbor:
    """One bank row near a scored image: the evidence behind its score."""

    row: int                    # row of the bundle's index (and labels.npy)
    class_index: int            # its class
    label: str                  # class_names[class_index]
    similarity: float           # inner product with the image's embedding (cosine, unit rows)
    source: str                 # where the row came from (BankSources.describe), "" = unknown
    source_index: int           # its row in that data set (the training-set index), -1 = unknown


@dataclass(frozen=True)
class ItemResult:
    """The verdict on one item of `score_images`; on error: score nan, is_ood False, class -1."""

    id: str
    score: float                # the scorer's score, higher = more in-distribution
    is_ood: bool                # score < threshold
    predicted_class: int        # KNN: majority vote of the K neighbours; Mahalanobis: nearest mean
    predicted_label: str        # class_names[predicted_class]
    error: str                  # "" when scored
    neighbors: tuple[Neighbor, ...] = field(default=(), kw_only=True)  # nearest first; () unless asked


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of N images, as arrays (each of length N)."""

    scores: np.ndarray          # float32 [N]
    is_ood: np.ndarray          # bool [N], scores < threshold
    predicted: np.ndarray       # int64 [N]
    short: np.ndarray           # bool [N], KNN queries that got fewer than K neighbours (-2)
    neighbor_sims: np.ndarray | None = None   # float32 [N, n], the n nearest rows' similarities
    neighbor_ids: np.ndarray | None = None    # int64 [N, n], their bank rows (-1 = missing)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def merge_results(ids: Sequence[str], errors: Sequence[str | None], batch: ScoreBatch | None,
                  class_names: Sequence[str],
                  describe: Callable[[np.ndarray, np.ndarray], tuple[Neighbor, ...]] | None = None
                  ) -> list[ItemResult]:
    """One ItemResult per id, in order: where `errors[i]` is set, an error result (score nan,
    predicted_class -1); otherwise the next row of `batch`, which holds the other items in order.
    With `describe` (`Detector.describe_neighbors`) and neighbour arrays in `batch`, each scored
    result carries its neighbours. The one place per-item errors and scored rows are put back
    together (Detector, server, rwood-score)."""
    with_neighbors = (describe is not None and batch is not None
                      and batch.neighbor_ids is not None)
    out: list[ItemResult] = []
    j = 0
    for id_, err in zip(ids, errors):
        if err is not None:
            out.append(ItemResult(id_, math.nan, False, -1, "", err))
            continue
        c = int(batch.predicted[j])
        label = class_names[c] if 0 <= c < len(class_names) else ""
        near = describe(batch.neighbor_sims[j], batch.neighbor_ids[j]) if with_neighbors else ()
        out.append(ItemResult(id_, float(batch.scores[j]), bool(batch.is_ood[j]), c, label, "",
                              neighbors=near))
        j += 1
    return out


class Detector:
    """Scores images with a bundle. See the module docstring.

    Args:
        bundle: a `Bundle` from `load_bundle`, or the bundle directory (loaded and verified here).
        device: "auto" (CUDA if onnxruntime-gpu sees one, else CPU), "cpu", "cuda" or "cuda:N".
            The FAISS index follows: on the GPU when the model is and faiss has GPU support.
        search_params: override of the bundle's index search parameters, e.g. {"nprobe": 64}
            (logged as a warning; the threshold was calibrated with the bundle's); the results'
            `model_version` then names it (`ann.served_version`).
        threads: CPU threads for ONNX Runtime and for FAISS (default: all cores available).
        max_pixels: decoded images larger than this are refused (decompression-bomb guard).
        max_batch: images per model call inside `embed` (default from the input size: 256 at
            32x32, fewer for larger inputs); bounds memory for large arrays.
    Attributes: bundle, manifest, spec, model_version, threshold, k (None for Mahalanobis),
        class_names, providers, device ("cuda" or "cpu", where the model runs), index_device
        (where the scorer runs), threads, max_pixels, max_batch, calibration (the bundle's
        calibration scores sorted, float32 [M], or None for a bundle without them),
        expected_ood_ratio (share of them below the threshold; else 1 - the manifest's
        achieved TPR), max_neighbors (K; 0 for a mahalanobis bundle), sources (`BankSources`,
        read on first use).
    Raises BundleError for a bundle that fails verification, InputError for bad options.
    """

    def __init__(self, bundle: "Bundle | str | os.PathLike", *, device: str = "auto",
                 threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_batch: int | None = None, search_params: dict[str, int] | None = None):
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, verify_model=False)  # the session is checked below
        m = bundle.manifest
        self.bundle, self.manifest, self.spec = bundle, m, bundle.spec
        self.model_version, self.threshold, self.k = m.model_version, float(m.threshold.value), m.k
        calibration = bundle.calibration_scores()
        self.calibration = None if calibration is None else np.sort(calibration)
        self.expected_ood_ratio = (1.0 - float(m.threshold.achieved_tpr) if calibration is None
                                   else expected_ood_rate(calibration, self.threshold))
        self.class_names: tuple[str, ...] = m.class_names
        self.max_pixels = check_int(max_pixels, "max_pixels", minimum=1)
        self.threads = runtime.resolve_threads(threads)
        self._embedder = Embedder(bundle.served_model_path, m, device=device,
                                  threads=self.threads, max_batch=max_batch)
        self.device, self.providers = self._embedder.device, self._embedder.providers
        self.max_batch = self._embedder.max_batch
        runtime.set_faiss_threads(self.threads)
        index_device = runtime.faiss_device(device, self.device)
        self._scorer = open_scorer(bundle, device=index_device, search_params=search_params)
        self.index_device = self._scorer.device
        # an operator's search parameters make other scores: the version says so
        self.model_version = ann.served_version(m, ann.check_search_params(search_params,
                                                                          "search"))
        # the most neighbours a request may ask for: K, none without a bank (mahalanobis)
        self.max_neighbors = self.k if m.scorer == "knn" else 0
        # GPU resources are not thread-safe
        self._gpu_lock = threading.Lock() if self.index_device == "cuda" else None
        d = self._scorer.info()
        params = d.get("search_params")
        log.info("detector %s: model on %s, %s scorer on %s (%s, %d rows, %.1f MiB, %s, %s), "
                 "k=%s, threshold=%.6g", self.model_version, self.device, m.scorer,
                 self.index_device, d["type"], d["rows"], d.get("bytes", 0) / 2**20, m.feature,
                 f"search {params}" if params else "exact", self.k, self.threshold)

    @functools.cached_property
    def sources(self) -> BankSources:
        """Where each bank row came from (`Bundle.sources`), read the first time neighbours are
        described: scoring without them never reads sources.json."""
        return self.bundle.sources()

    def info(self) -> dict[str, Any]:
        """What a client may want to know (the server's GetInfo). "scorer": kind, type, factory,
        rows, bytes, device, float16, search_params and the short-query counts (KNN)."""
        return {"model_version": self.model_version, "threshold": self.threshold, "k": self.k,
                "class_names": list(self.class_names), "input_size": self.spec.size,
                "feature": self.manifest.feature, "device": self.device,
                "providers": self.providers, "served_file": self.manifest.served_file,
                "scorer": self._scorer.info()}

    def reset_counts(self) -> None:
        """Zero the scorer's query counters of `info()` (the server does, after its warm-up)."""
        scorer = self._scorer.scorer
        if hasattr(scorer, "short_queries"):
            scorer.queries = scorer.short_queries = 0

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] RGB model input -> float32 [N, D] unit rows (the scored feature)."""
        return self._embedder.embed(images)

    def score_arrays(self, images: np.ndarray, neighbors: int = 0) -> ScoreBatch:
        """uint8 [N, S, S, 3] -> ScoreBatch: scores, is_ood (score < threshold), predicted,
        short, and with `neighbors` = n > 0 the n nearest bank rows of each image
        (neighbor_sims/ids)."""
        return self.score_embeddings(self.embed(images), neighbors)

    def score_embeddings(self, emb: np.ndarray, neighbors: int = 0) -> ScoreBatch:
        """`score_arrays` from embeddings (float32 [N, D], `embed`'s output).

        InputError naming `neighbors` unless 0 <= neighbors <= `max_neighbors` (K; 0 for a
        mahalanobis bundle, which has no bank rows)."""
        n = check_int(neighbors, "neighbors", minimum=0, maximum=self.max_neighbors)
        if emb.shape[0] == 0:
            return ScoreBatch(np.empty(0, np.float32), np.empty(0, bool), np.empty(0, np.int64),
                              np.empty(0, bool),
                              *((np.empty((0, n), np.float32), np.empty((0, n), np.int64))
                                if n else (None, None)))
        runtime.bind_faiss_threads(self.threads)   # OpenMP's count is per calling thread
        scorer = self._scorer.scorer
        with self._gpu_lock or contextlib.nullcontext():
            if isinstance(scorer, KNNScorer):
                scores, predicted, short, sims, ids = scorer.score_detailed(emb, n)
            else:
                (scores, predicted), short = scorer.score(emb), np.zeros(len(emb), bool)
        return ScoreBatch(scores, scores < np.float32(self.threshold), predicted, short,
                          *((sims, ids) if n else (None, None)))

    def describe_neighbors(self, sims: np.ndarray, ids: np.ndarray) -> tuple[Neighbor, ...]:
        """One image's neighbours (a row of ScoreBatch.neighbor_sims / neighbor_ids) as
        `Neighbor`s with class, label and source; missing ones (id -1) are left out."""
        labels = self._scorer.scorer.labels
        out = []
        for sim, row in zip(sims.tolist(), ids.tolist()):
            if row < 0:
                continue
            c = int(labels[row])
            out.append(Neighbor(row, c, self.class_names[c], float(sim),
                                self.sources.describe(row), int(self.sources.index[row])))
        return tuple(out)

    def calibration_rank(self, scores: np.ndarray) -> np.ndarray | None:
        """Each score's place among the calibration scores (share of them <= it), float64 [N] in
        [0, 1]; None when the bundle has no calibration scores (see `drift.calibration_rank`)."""
        return None if self.calibration is None else calibration_rank(scores, self.calibration)

    def prepare(self, item: "bytes | Image.Image | np.ndarray") -> np.ndarray:
        """Decode (bytes) and resize one item by the bundle's rule -> uint8 [S, S, 3].

        item: an encoded image file (bytes, bytearray, memoryview), a PIL image (any mode), or
        a uint8 array [H, W], [H, W, 1] or [H, W, 3] (RGB). Raises InputError for anything that
        cannot be decoded, is empty, or has more than `max_pixels` pixels.
        """
        if isinstance(item, (bytes, bytearray, memoryview)):
            img = decode_image(bytes(item), self.max_pixels)
            return to_model_array(img, self.spec)
        if isinstance(item, Image.Image):
            self._check_pixels(item.width, item.height)
            try:
                return to_model_array(item, self.spec)
            except Exception as e:  # PIL conversion errors for exotic modes
                raise InputError(f"cannot convert image: {type(e).__name__}: {e}",
                                 field="item") from None
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (2, 3) or (
                    item.ndim == 3 and item.shape[2] not in (1, 3)):
                raise InputError(f"expected a uint8 array [H, W], [H, W, 1] or [H, W, 3], got "
                                 f"{item.dtype} {item.shape}", field="item")
            if item.size == 0:
                raise InputError("empty image array", field="item")
            self._check_pixels(item.shape[1], item.shape[0])
            return prepare_arrays(item[None], self.spec)[0]
        raise InputError(f"expected encoded image bytes, a PIL image or a uint8 array, got "
                         f"{type(item).__name__}", field="item")

    def score_images(self, items: Sequence[Any], ids: Sequence[str] | None = None, *,
                     neighbors: int = 0) -> list[ItemResult]:
        """Score a list of items (see `prepare`); results in order, one per item, each with its
        `neighbors` nearest bank rows (0 <= neighbors <= K, else InputError).

        An item that fails `prepare` gets an ItemResult with `error` set (score nan, is_ood
        False, predicted_class -1, label ""); the others are still scored. `ids` default to
        "0", "1", ...; a length mismatch raises InputError naming `ids`.
        """
        check_int(neighbors, "neighbors", minimum=0, maximum=self.max_neighbors)
        if (isinstance(items, (bytes, bytearray, str))
                or not isinstance(items, (Sequence, np.ndarray))):
            raise InputError(f"expected a sequence of items, got {type(items).__name__}",
                             field="items")
        n = len(items)
        ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(ids) != n:
            raise InputError(f"expected {n} ids (one per item), got {len(ids)}", field="ids")
        results: list[ItemResult] = []
        for lo in range(0, n, self.max_batch):
            hi = lo + self.max_batch
            results.extend(self._score_chunk(items[lo:hi], ids[lo:hi], neighbors))
        return results

    def _score_chunk(self, items: Sequence[Any], ids: list[str],
                     neighbors: int) -> list[ItemResult]:
        arrays: list[np.ndarray] = []
        errors: list[str | None] = []
        for item in items:
            try:
                arrays.append(self.prepare(item))
                errors.append(None)
            except InputError as e:
                errors.append(str(e))
        batch = self.score_arrays(np.stack(arrays), neighbors) if arrays else None
        return merge_results(ids, errors, batch, self.class_names, self.describe_neighbors)

    def _check_pixels(self, w: int, h: int) -> None:
        if w * h > self.max_pixels:
            raise InputError(f"image is {w}x{h} = {w * h} pixels, over the limit of "
                             f"{self.max_pixels}", field="item")

    def __repr__(self) -> str:
        return (f"Detector({str(self.bundle.path)!r}, model_version={self.model_version!r}, "
                f"device={self.device!r}, k={self.k}, threshold={self.threshold:.6g})")

