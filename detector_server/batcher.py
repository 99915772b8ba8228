"""Dynamic batching: images from concurrent requests share one model call.

Use `DynamicBatcher` inside an asyncio server when many small requests arrive at once and the model
is faster per image on bigger batches (ONNX Runtime and FAISS both are). Each request awaits
`score(model, images, deadline)`; one background task groups queued work into batches of at most
`max_batch` images and runs `model.score_arrays(batch)` on a single worker thread (ONNX Runtime and
FAISS release the GIL, so the event loop keeps serving while the model runs).

Batching policy:
- A batch is sent when it is full, or when its oldest image has waited `max_wait_ms`, but never
  while the previous batch is still running: work that arrives while the model is busy joins the
  next batch. So at low load a lone request waits at most `max_wait_ms` (0 = not at all), and under
  load batches grow by themselves up to `max_batch`.
- Only work for the same model object shares a batch (during a hot reload the old and the new model
  both have queued work; each request is scored entirely by the model it was submitted with).
- Requests larger than `max_batch` are split into several batches and put back together.
- Work whose deadline has passed, or whose caller has gone away (cancelled future), is dropped
  before it reaches the model: the caller gets `TimeoutError`.
- Requests for neighbours (`neighbors` = n > 0) share batches with the others: the model is asked
  for the most any request of the batch wants (`score_arrays(images, neighbors=n)`, plain
  `score_arrays(images)` when none does), and each caller gets its own n columns (None at 0).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .validate import is_int

__all__ = ["DynamicBatcher", "BatchModel"]

log = logging.getLogger(__name__)


class BatchModel(Protocol):
    """What the batcher needs of a model: `Detector.score_arrays`."""

    def score_arrays(self, images: np.ndarray, neighbors: int = 0) -> Any:
        """uint8 [N, S, S, 3] -> a dataclass whose fields are arrays of length N (or None);
        2-D fields hold `neighbors` columns per row."""


@dataclasses.dataclass
class _Job:
    model: BatchModel
    images: np.ndarray            # uint8 [n, S, S, 3], n <= max_batch
    deadline: float | None        # time.monotonic() value, None = no deadline
    future: asyncio.Future
    neighbors: int = 0            # columns of the 2-D result fields this caller wants


class DynamicBatcher:
    """Groups `score` calls from many coroutines into model batches (see the module docstring).

    `on_batch(n_images, n_requests)` is called (on the event loop) for every batch sent to the
    model, e.g. to record batch sizes. Create, use and close it on one event loop.
    """

    def __init__(self, max_batch: int = 64, max_wait_ms: float = 0.0, *,
                 on_batch: Callable[[int, int], None] | None = None):
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._arrived = asyncio.Event()   # set when work is queued
        self._idle = asyncio.Event()      # set while no batch is running
        self._idle.set()
        self._closing = False
        # One worker thread: batches run one after the other, each using the model's own threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwood-batch")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="rwood-batcher")

    @property
    def queued_images(self) -> int:
        """Images waiting for a batch (not counting the batch being scored)."""
        return self._queued_images

    async def score(self, model: BatchModel, images: np.ndarray, deadline: float | None = None,
                    neighbors: int = 0) -> Any:
        """Score uint8 [N, S, S, 3] `images` with `model` in shared batches; returns the model's result
        for exactly these N images (same dataclass as `model.score_arrays`), with `neighbors`
        columns in its 2-D fields (None when 0).

        Raises TimeoutError when `deadline` (a `time.monotonic()` value) passes before the images
        were scored, RuntimeError after `close()`, and whatever the model raised for its batch.
        """
        if self._closing:
            raise RuntimeError("batcher is closed")
        if not isinstance(images, np.ndarray) or images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty [N, S, S, 3] array, got "
                             f"{getattr(images, 'shape', type(images))}")
        if deadline is not None and deadline <= time.monotonic():
            raise TimeoutError("deadline passed before queueing")
        loop = asyncio.get_running_loop()
        jobs = [_Job(model, images[i:i + self.max_batch], deadline, loop.create_future(), neighbors)
                for i in range(0, len(images), self.max_batch)]
        if len(jobs) == 1 and not self.max_wait and not self._queue and self._idle.is_set():
            self._dispatch(jobs)           # fast path: nothing to wait for, the model is free
        else:
            self._queue.extend(jobs)
            self._queued_images += len(images)
            self._arrived.set()
        try:
            parts = [await j.future for j in jobs]
        except BaseException:
            for j in jobs:  # the caller is gone or one part failed: drop the rest of its work
                j.future.cancel()
            raise
        return parts[0] if len(parts) == 1 else _concat(parts)

    async def close(self) -> None:
        """Score everything already queued, then stop the background task and the worker thread."""
        self._closing = True
        self._arrived.set()
        await self._task
        self._executor.shutdown(wait=True)

    # ---- background collection -------------------------------------------------------------
    async def _collect(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    await self._idle.wait()
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._wait_to_fill()
            await self._idle.wait()           # the model is busy: more work piles up meanwhile
            batch = self._take()
            if batch:
                self._dispatch(batch)

    async def _wait_to_fill(self) -> None:
        """Wait until max_batch images are queued or the oldest has waited max_wait."""
        t_end = time.monotonic() + self.max_wait
        while self._queued_images < self.max_batch and not self._closing:
            remaining = t_end - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Job]:
        """Pop the next batch: FIFO jobs of the head's model, up to max_batch images; drop dead work."""
        now = time.monotonic()
        batch: list[_Job] = []
        kept: list[_Job] = []
        n = 0
        model = None
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():                              # cancelled by its caller
                self._queued_images -= len(job.images)
                continue
            if job.deadline is not None and job.deadline <= now:
                self._queued_images -= len(job.images)
                job.future.set_exception(TimeoutError("deadline passed while queued"))
                continue
            if model is None:
                model = job.model
            if job.model is not model:                         # other model (hot reload): later
                kept.append(job)
                continue
            if n + len(job.images) > self.max_batch:
                self._queue.appendleft(job)
                break
            batch.append(job)
            n += len(job.images)
            self._queued_images -= len(job.images)
        self._queue.extendleft(reversed(kept))
        return batch

    def _dispatch(self, batch: list[_Job]) -> None:
        """Send one batch to the worker thread; results are handed out by `_deliver`."""
        self._idle.clear()
        if self._on_batch is not None:
            self._on_batch(sum(len(j.images) for j in batch), len(batch))
        # A plain executor future, answered with one call_soon_threadsafe: run_in_executor would
        # also wrap it in an asyncio future and chain the two (more loop work per batch).
        call_soon = asyncio.get_running_loop().call_soon_threadsafe
        deliver = functools.partial(self._deliver, batch)
        done = self._executor.submit(_score_concat, batch[0].model, [j.images for j in batch],
                                     max(j.neighbors for j in batch))
        done.add_done_callback(lambda f: call_soon(deliver, f))

    def _deliver(self, batch: list[_Job], future: Future) -> None:
        """On the event loop: each caller gets its rows of the result, or the batch's error."""
        try:
            error = RuntimeError("batch cancelled") if future.cancelled() else future.exception()
            if error is not None:
                log.error("model failed on a batch of %d requests: %r", len(batch), error)
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(error)
                return
            result, start = future.result(), 0
            for j in batch:
                stop = start + len(j.images)
                if not j.future.done():
                    j.future.set_result(_slice(result, start, stop, j.neighbors))
                start = stop
        finally:
            self._idle.set()


def _score_concat(model: BatchModel, parts: Sequence[np.ndarray], neighbors: int) -> Any:
    """Runs on the worker thread: one model call for all parts."""
    images = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return model.score_arrays(images, neighbors=neighbors) if neighbors else model.score_arrays(images)


def _slice(result: Any, start: int, stop: int, columns: int) -> Any:
    """Rows start:stop of every array field of a result dataclass; 2-D fields cut to their first
    `columns` columns (None when 0), None fields stay None."""
    def cut(a: np.ndarray | None) -> np.ndarray | None:
        if a is None or (a.ndim == 2 and not columns):
            return None
        return a[start:stop, :columns] if a.ndim == 2 else a[start:stop]
    return dataclasses.replace(result, **{f.name: cut(getattr(result, f.name))
                                          for f in dataclasses.fields(result)})


def _concat(parts: Sequence[Any]) -> Any:
    """Join result dataclasses row-wise, field by field (None fields stay None)."""
    def join(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)
    return dataclasses.replace(parts[0], **{f.name: join(f.name)
                                            for f in dataclasses.fields(parts[0])})
