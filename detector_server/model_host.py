"""The model side of `rwood-serve`: the serving Detector (hot-swappable), image decoding and the
dynamic batcher, behind one call, `ModelHost.score(images, deadline)`.

Use it from the gRPC servicer (or any asyncio front end) on one event loop. A request flows:
1. `ModelHost.score` snapshots the current Detector, admits the request (image count, queued
   images, bytes held, draining) and decodes the images (`Detector.prepare`) on a thread pool,
   recording per-image errors. Nothing that depends on the bytes of a request runs on the event
   loop, not even a header peek: a crafted header can cost seconds (see `image_guard`), and the
   loop must keep answering health checks. The thread hop costs small requests ~0.1-0.3 ms.
2. The decoded images go to the `DynamicBatcher`, which merges them with other requests' images
   into one `Detector.score_arrays` call on its worker thread (ONNX Runtime and FAISS release the
   GIL).
3. Scored rows and per-image errors are merged back into request order (`merge_results`).

Admission bounds what requests hold: at most `max_images` per request, `max_queue_images` images
and `max_inflight_bytes` bytes of requests (image data and ids) at once; beyond, ModelUnavailable
(UNAVAILABLE: load shedding). `full` and `wait_for_room()` let the front end stop reading new
requests instead (flow control for streams, whose requests are then never shed).

`ModelHost.load` builds the new Detector on a daemon thread, warms it up, then swaps it in; a
bundle that fails to load raises and the old one keeps serving. A load that takes longer than
`reload_timeout_s` (a bundle on a hung network file system) raises TimeoutError and is abandoned:
its thread never blocks a later load or the process exit. Each request is scored entirely by the
Detector it started with and its results name that model.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .batcher import DynamicBatcher
from .bundle_watch import read_published
from .detector import Detector, ItemResult, merge_results
from .errors import InputError
from .preprocess import safe_message
from .serve_config import ServeConfig
from .server_metrics import ServerMetrics
from .validate import check_int

__all__ = ["ModelHost", "ModelUnavailable", "MAX_HUNG_LOADS", "in_daemon_thread"]

log = logging.getLogger(__name__)



MAX_HUNG_LOADS = 2      # loads abandoned after reload_timeout_s that may still be blocked; then refuse


class ModelUnavailable(Exception):
    """No model to score with (still loading, or the server is draining) -> UNAVAILABLE."""


def _error_kind(message: str) -> str:
    """Metric label of a per-image error: empty, too_large or undecodable."""
    if "empty image" in message:
        return "empty"
    if "pixels" in message or "too large" in message or "work limit" in message:
        return "too_large"
    return "undecodable"


def _prepare_all(detector: Detector, datas: Sequence[bytes], deadline: float | None
                 ) -> tuple[np.ndarray | None, list[int], dict[int, str]]:
    """Decode + resize on a pool thread. Returns (uint8 [m, S, S, 3] or None, the m indices,
    errors); raises TimeoutError when `deadline` passes between two images."""
    arrays, ok, errors = [], [], {}
    for i, data in enumerate(datas):
        if deadline is not None and i and time.monotonic() >= deadline:
            raise TimeoutError("deadline passed while decoding")
        try:
            arrays.append(detector.prepare(data))
            ok.append(i)
        except InputError as e:
            errors[i] = safe_message(str(e))
        except Exception as e:  # noqa: BLE001 - a decoder bug must not fail the other images
            log.warning("unexpected error preparing image %d: %r", i, e)
            errors[i] = safe_message(f"cannot decode image: {type(e).__name__}: {e}")
    return (np.stack(arrays) if arrays else None), ok, errors


def in_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """Run `fn` on a new daemon thread; the returned future gets its result or exception. Unlike
    an executor, the thread is never joined: one blocked for good does not hold the exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_result(result) if error is None else future.set_exception(error)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:        # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name="rwood-load", daemon=True).start()
    return future


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
        self._held_bytes = 0                # image data and id bytes of those requests
        self._room = asyncio.Event()        # set while both are under their limits
        self._room.set()
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="rwood-decode")
        self._batcher = DynamicBatcher(config.max_batch, config.max_wait_ms,
                                       on_batch=metrics.observe_batch)
        # Read at scrape time (or every second with --workers), so they fall back to 0 when idle.
        metrics.gauge_from(metrics.queue_images, lambda: self._batcher.queued_images)
        metrics.gauge_from(metrics.inflight_bytes, lambda: self._held_bytes)
        self._load_lock = asyncio.Lock()
        self._abandoned: list[asyncio.Future] = []  # loads that timed out and may still run

    def _build_detector(self) -> Detector:
        """Runs on a worker thread: load, then warm up so the first request pays no set-up cost.

        The Detector opens the model and the index after `load_bundle` has verified them: a
        bundle replaced meanwhile (rwood-bank --out BUNDLE --force) is loaded again
        (`bundle_watch.read_published`), so the served Detector is always one published bundle."""
        det = read_published(self.bundle_path, lambda: Detector(
            self.bundle_path, device=self._cfg.device, threads=self._cfg.threads,
            max_pixels=self._cfg.max_pixels, search_params=self._cfg.search_params))
        s = det.spec.size
        for n in dict.fromkeys((1, self._cfg.max_batch)):   # the smallest and the largest batch
            det.score_arrays(np.zeros((n, s, s, 3), dtype=np.uint8))
        det.reset_counts()                                 # GetInfo counts served queries only
        if det.max_neighbors:   # what requests for neighbours need, read here, off the event loop
            _ = det.sources.max_describe_bytes
        return det

    async def load(self) -> Detector:
        """Load the bundle again and serve it; raises (BundleError, TimeoutError, ...) and keeps
        the old model."""
        async with self._load_lock:
            return self.swap(await self.build())

    async def build(self) -> Detector:
        """A new Detector from the bundle path, loaded and warmed up on a daemon thread but not
        served yet; raises (BundleError, ...) when the bundle cannot be loaded.

        Raises TimeoutError when loading takes more than `reload_timeout_s`; the load is then
        abandoned (its thread may stay blocked, e.g. on a hung file system) and a later call
        starts afresh. RuntimeError while MAX_HUNG_LOADS abandoned loads are still blocked.
        """
        self._abandoned = [f for f in self._abandoned if not f.done()]
        if len(self._abandoned) >= MAX_HUNG_LOADS:
            raise RuntimeError(f"{len(self._abandoned)} earlier loads of the bundle are still "
                               "blocked reading it; not starting another")
        loading = in_daemon_thread(self._build_detector)
        try:
            return await asyncio.wait_for(asyncio.shield(loading), self._cfg.reload_timeout_s)
        except asyncio.TimeoutError:
            self._abandoned.append(loading)
            loading.add_done_callback(_forget)
            raise TimeoutError(f"loading took more than {self._cfg.reload_timeout_s:g} s "
                               "(is the bundle on a hung file system?)") from None

    def swap(self, det: Detector) -> Detector:
        """Serve `det` from the next request on (requests in flight finish on the old one)."""
        old, self.detector = self.detector, det
        self._metrics.set_model(det.model_version, det.expected_ood_ratio)
        log.info("serving model %s from %s (device %s, providers %s)%s", det.model_version,
                 self.bundle_path, det.device, ",".join(det.providers),
                 f", replacing {old.model_version}" if old is not None else "")
        return det

    @property
    def busy(self) -> bool:
        """True while any admitted request is being decoded, queued or scored."""
        return self._admitted > 0

    @property
    def full(self) -> bool:
        """True while the requests being handled hold `max_inflight_bytes` or more, or
        `max_queue_images` images or more."""
        return not self._room.is_set()

    async def wait_for_room(self) -> None:
        """Return once the server is not `full`."""
        await self._room.wait()

    def hold_bytes(self, nbytes: int) -> None:
        """Count `nbytes` of a request already read (a stream's, read only when there was room);
        `score(..., bytes_held=True)` it, then `release_bytes`."""
        self._hold(0, nbytes)

    def release_bytes(self, nbytes: int) -> None:
        self._hold(0, -nbytes)

    async def score(self, ids: Sequence[str], datas: Sequence[bytes], deadline: float | None,
                    nbytes: int | None = None, *, bytes_held: bool = False, neighbors: int = 0
                    ) -> tuple[list[ItemResult], str]:
        """Score images (`ids[i]`, encoded bytes `datas[i]`); returns results in order and the
        model version used. `datas` is read on the decode threads only, so it may copy each item
        out when indexed (and slicing must give such a sequence too); `nbytes` is what the request
        holds (default: the lengths of ids and datas), counted here unless `bytes_held` (a
        stream's request, counted by `hold_bytes`, is never shed: its stream waited for room).
        Each result carries its `neighbors` nearest bank rows (0 = none).

        Raises InputError for no images, more than max_images or `neighbors` outside [0, K],
        ModelUnavailable when there is no
        model (loading, draining) or too much work is held, TimeoutError when `deadline`
        (time.monotonic()) passes first.
        """
        if bytes_held:
            nbytes = 0
        elif nbytes is None:
            nbytes = sum(map(len, ids)) + sum(map(len, datas))
        det = self._admit(len(ids), nbytes, shed=not bytes_held, neighbors=neighbors)
        self._hold(len(ids), nbytes)
        try:
            arrays, ok, errors = await self._prepare(det, datas, deadline)
            batch = None
            if arrays is not None:
                batch = await self._batcher.score(det, arrays, deadline, neighbors)
        finally:
            self._hold(-len(ids), -nbytes)
        return self._results(det, ids, ok, batch, errors), det.model_version

    def _hold(self, n_images: int, nbytes: int) -> None:
        self._admitted += n_images
        self._held_bytes += nbytes
        if (self._held_bytes < self._cfg.max_inflight_bytes
                and self._admitted < self._cfg.max_queue_images):
            self._room.set()
        else:
            self._room.clear()

    def _admit(self, n_images: int, nbytes: int, shed: bool, neighbors: int = 0) -> Detector:
        """The Detector to use for this request, or the reason it is refused; `shed`: refuse it
        when the images or bytes held are at their limits (a stream's request waited for room
        before it was read instead)."""
        if not n_images:
            raise InputError("the request has no images", field="images")
        if n_images > self._cfg.max_images:
            raise InputError(f"{n_images} images, more than the server's limit of "
                             f"{self._cfg.max_images}; split the request", field="images")
        det = self.detector
        if det is None or self.draining:
            raise ModelUnavailable("the server is shutting down" if self.draining
                                   else "the model is still loading")
        if shed and self._admitted and self._admitted + n_images > self._cfg.max_queue_images:
            raise ModelUnavailable(f"overloaded: {self._admitted} images waiting; retry later")
        if shed and self._held_bytes and self._held_bytes + nbytes > self._cfg.max_inflight_bytes:
            raise ModelUnavailable(f"overloaded: {self._held_bytes / 2**20:.1f} MiB of requests "
                                   "in progress; retry later")
        check_int(neighbors, "neighbors", minimum=0, maximum=det.max_neighbors)
        self._metrics.images.inc(n_images)
        return det

    def _results(self, det: Detector, ids: Sequence[str], ok: list[int], batch: Any,
                 errors: dict[int, str]) -> list[ItemResult]:
        """ItemResults in request order from the scored rows (`ok`) and the per-image errors."""
        if batch is not None:
            n_ood = int(np.count_nonzero(batch.is_ood))
            self._metrics.ood_decisions.labels("ood").inc(n_ood)
            self._metrics.ood_decisions.labels("id").inc(len(ok) - n_ood)
            self._metrics.short_queries.inc(int(np.count_nonzero(batch.short)))
            ranks = det.calibration_rank(batch.scores)
            if ranks is not None:
                self._metrics.observe_ranks(det.model_version, ranks)
        for message in errors.values():
            self._metrics.image_errors.labels(_error_kind(message)).inc()
        return merge_results(ids, [errors.get(i) for i in range(len(ids))], batch, det.class_names,
                             det.describe_neighbors)

    async def _prepare(self, det: Detector, datas: Sequence[bytes], deadline: float | None):
        """Decode on the pool, in chunks (one per pool thread for big requests)."""
        if deadline is not None and deadline <= time.monotonic():
            raise TimeoutError("deadline passed before decoding")
        loop = asyncio.get_running_loop()
        step = max(8, -(-len(datas) // self._cfg.decode_threads))
        parts = await asyncio.gather(*[
            loop.run_in_executor(self._decode_pool, _prepare_all, det, datas[i:i + step], deadline)
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


def _forget(future: asyncio.Future) -> None:
    """Done callback of an abandoned load: retrieve its outcome so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
