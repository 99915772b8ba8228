"""The model side of `rwood-serve`: the serving Detector (hot-swappable), image decoding and the
dynamic batcher, behind one call, `ModelHost.score(images, deadline)`.

Use it from the gRPC servicer (or any asyncio front end) on one event loop. A request flows:
1. `ModelHost.score` snapshots the current Detector, admits the request (image count, queue limit,
   draining) and decodes the images (`Detector.prepare`), recording per-image errors. Small images
   (a few thousand pixels per request, read from the headers) are decoded on the event loop,
   cheaper than a thread hop; bigger ones on a thread pool (PIL releases the GIL for most of the
   decode), so the loop never stalls on a large image.
2. The decoded images go to the `DynamicBatcher`, which merges them with other requests' images
   into one `Detector.score_arrays` call on its worker thread (ONNX Runtime and FAISS release the
   GIL).
3. Scored rows and per-image errors are merged back into request order (`merge_results`).

`ModelHost.load` builds the new Detector on a worker thread, warms it up, then swaps it in; a
bundle that fails to load raises and the old one keeps serving. Each request is scored entirely by
the Detector it started with and its results name that model.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .batcher import DynamicBatcher
from .bundle import manifest_stamp
from .detector import Detector, ItemResult, merge_results
from .errors import BundleError, InputError
from .serve_config import ServeConfig
from .server_metrics import ServerMetrics
from .validate import check_int

__all__ = ["ModelHost", "ModelUnavailable", "INLINE_DECODE_IMAGES", "INLINE_DECODE_PIXELS"]

log = logging.getLogger(__name__)

_LOAD_ATTEMPTS = 3      # loads of a bundle that keeps being replaced meanwhile


class ModelUnavailable(Exception):
    """No model to score with (still loading, or the server is draining) -> UNAVAILABLE."""


def _error_kind(data: bytes, message: str) -> str:
    """Metric label of a per-image error: empty, too_large or undecodable."""
    if not data:
        return "empty"
    if "pixels" in message or "too large" in message:
        return "too_large"
    return "undecodable"


# Requests of at most this many images declaring at most this many pixels in all are decoded on
# the event loop: four 32x32 PNGs take ~0.15 ms, less than handing them to a pool thread and back
# (two thread wake-ups, ~0.5 ms of latency on 2 busy cores). Anything bigger goes to the pool.
INLINE_DECODE_IMAGES = 4
INLINE_DECODE_PIXELS = 4 * 32 * 32


def _decode_inline(datas: Sequence[bytes]) -> bool:
    """Whether `datas` are small enough to decode on the event loop, judged from the images'
    headers (Pillow reads the header only, ~10 us each). An image whose header cannot be read
    counts as 0 pixels: decoding it fails at once, wherever that happens."""
    if len(datas) > INLINE_DECODE_IMAGES:
        return False
    total = 0
    for data in datas:
        try:
            with Image.open(io.BytesIO(data)) as img:
                total += img.width * img.height
        except Exception:  # noqa: BLE001 - empty, unknown format, bomb warning: the decoder reports it
            continue
        if total > INLINE_DECODE_PIXELS:
            return False
    return True


def _prepare_all(detector: Detector, datas: Sequence[bytes]) -> tuple[np.ndarray | None, list[int],
                                                                        dict[int, str]]:
    """Decode + resize on a pool thread. Returns (uint8 [m, S, S, 3] or None, the m indices, errors)."""
    arrays, ok, errors = [], [], {}
    for i, data in enumerate(datas):
        try:
            arrays.append(detector.prepare(data))
            ok.append(i)
        except InputError as e:
            errors[i] = str(e)
        except Exception as e:  # noqa: BLE001 - a decoder bug must not fail the other images
            log.warning("unexpected error preparing image %d: %r", i, e)
            errors[i] = f"cannot decode image: {type(e).__name__}: {e}"
    return (np.stack(arrays) if arrays else None), ok, errors


class ModelHost:
    """Owns the serving Detector, the decode pool and the batcher. Create and use on one event loop.

    `score` is the whole scoring path for encoded images; `load` builds a Detector from the bundle
    path off the event loop and swaps it in (raising on failure, leaving the old one in place);
    `build` and `swap` are its two halves, for reloads that several processes agree on first.
    """

    def __init__(self, bundle: str | os.PathLike, config: ServeConfig, metrics: ServerMetrics):
        self.bundle_path = Path(bundle)
        self._cfg = config
        self._metrics = metrics
        self.detector: Detector | None = None
        self.draining = False               # set by the server's stop(): new work is refused
        self._admitted = 0                  # images of requests being decoded, queued or scored
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="rwood-decode")
        self._batcher = DynamicBatcher(config.max_batch, config.max_wait_ms,
                                       on_batch=metrics.observe_batch)
        # Read at scrape time (or every second with --workers), so it falls back to 0 when idle.
        metrics.gauge_from(metrics.queue_images, lambda: self._batcher.queued_images)
        self._load_lock = asyncio.Lock()

    def _build_detector(self) -> Detector:
        """Runs on a worker thread: load, then warm up so the first request pays no set-up cost.

        The Detector opens the model and the index after `load_bundle` has verified them: a
        bundle replaced meanwhile (rwood-bank --out BUNDLE --force) is loaded again, so the
        served Detector is always one published bundle."""
        for attempt in range(_LOAD_ATTEMPTS):
            stamp = manifest_stamp(self.bundle_path)
            try:
                det = Detector(self.bundle_path, device=self._cfg.device,
                               threads=self._cfg.threads, max_pixels=self._cfg.max_pixels)
            except BundleError:
                if attempt + 1 < _LOAD_ATTEMPTS and manifest_stamp(self.bundle_path) != stamp:
                    continue
                raise
            if manifest_stamp(self.bundle_path) == stamp:
                break
        else:
            raise BundleError("replaced again while it was being loaded", path=self.bundle_path)
        s = det.spec.size
        for n in dict.fromkeys((1, self._cfg.max_batch)):   # the smallest and the largest batch
            det.score_arrays(np.zeros((n, s, s, 3), dtype=np.uint8))
        return det

    async def load(self) -> Detector:
        """Load the bundle again and serve it; raises (BundleError, ...) and keeps the old model."""
        async with self._load_lock:
            return self.swap(await self.build())

    async def build(self) -> Detector:
        """A new Detector from the bundle path, loaded and warmed up off the event loop but not
        served yet; raises (BundleError, ...) when the bundle cannot be loaded."""
        return await asyncio.get_running_loop().run_in_executor(None, self._build_detector)

    def swap(self, det: Detector) -> Detector:
        """Serve `det` from the next request on (requests in flight finish on the old one)."""
        old, self.detector = self.detector, det
        self._metrics.set_model(det.model_version, det.expected_ood_ratio)
        log.info("serving model %s from %s (device %s, providers %s)%s", det.model_version,
                 self.bundle_path, det.device, ",".join(det.providers),
                 f", replacing {old.model_version}" if old is not None else "")
        return det

    async def score(self, images: Sequence[tuple[str, bytes]], deadline: float | None,
                    neighbors: int = 0) -> tuple[list[ItemResult], str]:
        """Score `(id, encoded bytes)` pairs; returns results in order and the model version used.
        Each result carries its `neighbors` nearest bank rows (0 = none).

        Raises InputError for no images, more than max_images or `neighbors` outside [0, K],
        ModelUnavailable when there is no model (loading, draining) or too much work is queued,
        TimeoutError when `deadline` (time.monotonic()) passes first.
        """
        det = self._admit(images, neighbors)
        self._admitted += len(images)
        try:
            arrays, ok, errors = await self._prepare(det, [data for _, data in images], deadline)
            batch = None
            if arrays is not None:
                batch = await self._batcher.score(det, arrays, deadline, neighbors)
        finally:
            self._admitted -= len(images)
        return self._results(det, images, ok, batch, errors), det.model_version

    def _admit(self, images: Sequence[tuple[str, bytes]], neighbors: int) -> Detector:
        """The Detector to use for this request, or the reason it is refused."""
        if not images:
            raise InputError("the request has no images", field="images")
        if len(images) > self._cfg.max_images:
            raise InputError(f"{len(images)} images, more than the server's limit of "
                             f"{self._cfg.max_images}; split the request", field="images")
        det = self.detector
        if det is None or self.draining:
            raise ModelUnavailable("the server is shutting down" if self.draining
                                   else "the model is still loading")
        if self._admitted and self._admitted + len(images) > self._cfg.max_queue_images:
            raise ModelUnavailable(f"overloaded: {self._admitted} images waiting; retry later")
        check_int(neighbors, "neighbors", minimum=0, maximum=det.k)
        self._metrics.images.inc(len(images))
        return det

    def _results(self, det: Detector, images: Sequence[tuple[str, bytes]], ok: list[int],
                 batch: Any, errors: dict[int, str]) -> list[ItemResult]:
        """ItemResults in request order from the scored rows (`ok`) and the per-image errors."""
        if batch is not None:
            n_ood = int(np.count_nonzero(batch.is_ood))
            self._metrics.ood_decisions.labels("ood").inc(n_ood)
            self._metrics.ood_decisions.labels("id").inc(len(ok) - n_ood)
            ranks = det.calibration_rank(batch.scores)
            if ranks is not None:
                self._metrics.observe_ranks(det.model_version, ranks)
        for i, message in errors.items():
            self._metrics.image_errors.labels(_error_kind(images[i][1], message)).inc()
        return merge_results([id_ for id_, _ in images],
                             [errors.get(i) for i in range(len(images))], batch, det.class_names,
                             det.describe_neighbors)

    async def _prepare(self, det: Detector, datas: list[bytes], deadline: float | None):
        """Decode inline when the images are small (cheaper than a thread hop), else on the pool
        in chunks (one per pool thread for big requests)."""
        if deadline is not None and deadline <= time.monotonic():
            raise TimeoutError("deadline passed before decoding")
        if _decode_inline(datas):
            return _prepare_all(det, datas)
        loop = asyncio.get_running_loop()
        step = max(8, -(-len(datas) // self._cfg.decode_threads))
        parts = await asyncio.gather(*[
            loop.run_in_executor(self._decode_pool, _prepare_all, det, datas[i:i + step])
            for i in range(0, len(datas), step)])
        if len(parts) == 1:
            return parts[0]
        arrays = [a for a, _, _ in parts if a is not None]
        ok, errors = [], {}
        for k, (_, ok_k, err_k) in enumerate(parts):
            ok += [i + k * step for i in ok_k]
            errors.update({i + k * step: m for i, m in err_k.items()})
        return (np.concatenate(arrays) if arrays else None), ok, errors

    def info(self) -> Detector:
        det = self.detector
        if det is None:
            raise ModelUnavailable("the model is still loading")
        return det

    async def close(self) -> None:
        """Finish queued work, then stop the batcher and the decode pool."""
        await self._batcher.close()
        self._decode_pool.shutdown(wait=True)

