"""The gRPC servicer of `rwood.v1.Detector`: protos to and from `ModelHost` calls, errors to status
codes, one set of request metrics.

Use `DetectorServicer(host, config, metrics)` with `pb_grpc.add_DetectorServicer_to_server`; the
server (`detector_server.server`) does the wiring. InputError -> INVALID_ARGUMENT, ModelUnavailable
-> UNAVAILABLE, TimeoutError -> DEADLINE_EXCEEDED, anything else -> INTERNAL with no details (they
go to the log). Unary calls abort with the status; a ScoreStream request that fails is answered with
a `ScoreResponse` carrying `error_code`/`error` and the stream stays open.

A response never exceeds `max_message_bytes`: per-image errors are at most MAX_ERROR_CHARS, and a
request whose response could be larger (many images with long ids and little data) is refused
INVALID_ARGUMENT before any decoding (`response_bound`). ScoreStream reads a request only when
the stream has fewer than `stream_window` requests in flight (responses the client has not taken
hold their slot) and the server holds less than `max_inflight_mb` of requests and fewer than
`max_queue_images` images, so a client that does not read its responses, or a server at its
limit, stops being read (and what a stream sends is never shed).
"""
from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import functools
import logging
import time
from typing import Any, Callable, Iterator, Sequence

import grpc

from ._proto import detector_pb2 as pb
from ._proto import detector_pb2_grpc as pb_grpc
from .detector import Detector, ItemResult
from .errors import InputError
from .model_host import ModelHost, ModelUnavailable
from .preprocess import MAX_ERROR_CHARS, safe_message
from .serve_config import ServeConfig
from .server_metrics import ServerMetrics

__all__ = ["DetectorServicer", "response_bound", "per_image_bound"]

log = logging.getLogger(__name__)


_STATUS_OF: dict[type[BaseException], grpc.StatusCode] = {
    InputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_MAPPED = tuple(_STATUS_OF)


def _status_of(exc: BaseException) -> grpc.StatusCode:
    return next(code for cls, code in _STATUS_OF.items() if isinstance(exc, cls))


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _to_response(results: Sequence[ItemResult], model_version: str, request_id: str,
                 limit: int) -> pb.ScoreResponse:
    response = pb.ScoreResponse(results=[_result(r) for r in results],
                                model_version=model_version, request_id=request_id)
    if response.ByteSize() > limit:   # response_bound is wrong: a bug, never a client's doing
        raise RuntimeError(f"a response of {response.ByteSize()} bytes is over the limit of {limit}")
    return response


def _result(r: ItemResult) -> pb.Result:
    out = pb.Result(id=r.id, score=r.score, is_ood=r.is_ood, error=r.error,
                    predicted_class=r.predicted_class, predicted_label=r.predicted_label)
    if r.neighbors:
        out.neighbors.extend(pb.Neighbor(row=n.row, class_index=n.class_index, label=n.label,
                                         similarity=n.similarity, source=n.source,
                                         source_index=n.source_index) for n in r.neighbors)
    return out


# Serialized size of one Result besides its id, error and label: its key and length in the
# response (6), the id's key and length (6), score (5), is_ood (2), predicted_class (-1: 11).
_RESULT_FIXED = 30
# Serialized size of one Neighbor besides its label and source: its key and length in the Result
# (4), row and source_index (int64: 11 each), class_index (int32: 11), similarity (5), the keys
# and lengths of label and source (4 each).
_NEIGHBOR_FIXED = 50
# A response besides its results: model_version, request_id keys and lengths, error_code, error.
_RESPONSE_FIXED = 32 + MAX_ERROR_CHARS


def response_bound(ids: Sequence[str], request_id: str, detector: Detector,
                   per_image: int | None = None, neighbors: int = 0) -> int:
    """The most bytes the ScoreResponse to a request with these image ids can take: ids and
    request_id echoed, and per image either an error (at most MAX_ERROR_CHARS, ASCII) or a label
    of the model's and `neighbors` neighbours (`per_image`: `per_image_bound(detector,
    neighbors)`, computed when not given). Fields added to Result must be added here."""
    if per_image is None:
        per_image = per_image_bound(detector, neighbors)
    return (sum(len(i.encode()) for i in ids) + per_image * len(ids)
            + len(request_id.encode()) + len(detector.model_version.encode()) + _RESPONSE_FIXED)


def per_image_bound(detector: Detector, neighbors: int = 0) -> int:
    """The most bytes one Result with `neighbors` neighbours takes besides its id (see
    `response_bound`)."""
    base, per_neighbor = _image_bounds(detector)
    return base + neighbors * per_neighbor


def _image_bounds(detector: Detector) -> tuple[int, int]:
    """(bytes of a Result without neighbours besides its id, bytes of one Neighbor)."""
    label = max((len(c.encode()) for c in detector.class_names), default=0)
    source = detector.sources.max_describe_bytes
    return _RESULT_FIXED + 3 + max(MAX_ERROR_CHARS, label), _NEIGHBOR_FIXED + label + source


class _ImageData(collections.abc.Sequence):
    """The `data` of each pb.Image of a request, copied out of the message only when read (on a
    decode thread, one image at a time): the request is not held twice."""

    __slots__ = ("_images",)

    def __init__(self, images: Sequence[pb.Image]):
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: Any) -> Any:
        return _ImageData(self._images[i]) if isinstance(i, slice) else self._images[i].data


class _Outcome:
    """How one handled request ended: its status code and, when not OK, the client's message."""

    __slots__ = ("code", "details")

    def __init__(self) -> None:
        self.code, self.details = grpc.StatusCode.OK, ""


@contextlib.contextmanager
def _handled(metrics: ServerMetrics, method: str,
             context: grpc.aio.ServicerContext | None) -> Iterator[_Outcome]:
    """The bookkeeping of one request: a unary call (`context` given) or one ScoreStream request
    (`context` None).

    While the block runs the request counts in `rwood_inflight_requests`; when it ends,
    `rwood_requests_total{method, code}` and `rwood_request_latency_seconds{method}` record it.
    An InputError, ModelUnavailable or TimeoutError raised in the block is swallowed and mapped to
    its status code, any other Exception to INTERNAL (logged with its traceback, never shown to the
    client); the caller answers with the yielded outcome's `code` and `details` after the block.
    Cancellation is recorded (DEADLINE_EXCEEDED when the call's deadline has passed, else
    CANCELLED; always CANCELLED for a stream request) and re-raised.
    """
    outcome, t0 = _Outcome(), time.perf_counter()
    metrics.inflight.inc()
    try:
        yield outcome
    except _MAPPED as e:
        outcome.code, outcome.details = _status_of(e), safe_message(str(e))
    except asyncio.CancelledError:
        remaining = None if context is None else context.time_remaining()
        outcome.code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                        else grpc.StatusCode.CANCELLED)
        raise
    except Exception:
        outcome.code, outcome.details = grpc.StatusCode.INTERNAL, "internal error (see the server log)"
        log.exception("%s failed", method if context is not None else f"{method} request")
    finally:
        metrics.inflight.dec()
        metrics.requests.labels(method, outcome.code.name).inc()
        metrics.latency.labels(method).observe(time.perf_counter() - t0)


def _observed(method: str) -> Callable:
    """Unary handler wrapper: `_handled` bookkeeping; a failed call aborts with its status."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def handler(self: "DetectorServicer", request: Any, context: grpc.aio.ServicerContext):
            if self._trailers:
                context.set_trailing_metadata(self._trailers)
            with _handled(self._metrics, method, context) as outcome:
                return await fn(self, request, context)
            await context.abort(outcome.code, outcome.details)
        return handler
    return wrap


class DetectorServicer(pb_grpc.DetectorServicer):
    """rwood.v1.Detector: converts protos to and from `ModelHost` calls."""

    def __init__(self, host: ModelHost, config: ServeConfig, metrics: ServerMetrics,
                 worker: int | None = None):
        """`worker`: the index of this process among `rwood-serve --workers`, sent back in the
        `rwood-worker` trailing metadata of unary calls (which worker answered)."""
        self._host, self._cfg, self._metrics = host, config, metrics
        self._trailers = () if worker is None else (("rwood-worker", str(worker)),)
        # (model, _image_bounds of it): computed once per model served
        self._bound: tuple[Detector | None, tuple[int, int]] = (None, (0, 0))

    @_observed("Score")
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
                    ) -> pb.ScoreResponse:
        return await self._score(request, _deadline(context))

    async def _score(self, request: pb.ScoreRequest, deadline: float | None,
                     bytes_held: bool = False) -> pb.ScoreResponse:
        ids = [im.id for im in request.images]
        self._check_response_size(ids, request.request_id, request.neighbors)
        results, version = await self._host.score(ids, _ImageData(request.images), deadline,
                                                  request.ByteSize(), bytes_held=bytes_held,
                                                  neighbors=request.neighbors)
        return _to_response(results, version, request.request_id, self._cfg.max_message_bytes)

    def _check_response_size(self, ids: list[str], request_id: str, neighbors: int) -> None:
        """InputError when the response to these ids (with `neighbors` neighbours each) could
        exceed the message limit."""
        detector = self._host.detector
        if detector is None or not ids or not 0 <= neighbors <= detector.max_neighbors:
            return                      # ModelHost refuses these itself
        if self._bound[0] is not detector:             # once per model served
            self._bound = (detector, _image_bounds(detector))
        base, per_neighbor = self._bound[1]
        need = response_bound(ids, request_id, detector, base + neighbors * per_neighbor)
        limit = self._cfg.max_message_bytes
        if need > limit:
            raise InputError(f"the response to {len(ids)} images with these ids could take "
                             f"{need} bytes, over the message limit of {limit}; send fewer "
                             "images (or shorter ids, or fewer neighbors) per request",
                             field="images")

    @_observed("GetInfo")
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ModelInfo:
        det, c = self._host.info(), self._cfg
        s = det.info()["scorer"]
        scorer = pb.ScorerInfo(
            scorer=s["scorer"], kind=s["kind"], type=s["type"], factory=s["factory"],
            rows=s["rows"], bytes=s.get("bytes", 0), search_params=s.get("search_params", {}),
            device=s["device"], float16=s["float16"], queries=s.get("queries", 0),
            short_queries=s.get("short_queries", 0))
        return pb.ModelInfo(model_version=det.model_version, threshold=float(det.threshold),
                            k=int(det.k or 0), class_names=list(det.class_names),
                            input_size=det.spec.size, resize=det.spec.resize,
                            providers=list(det.providers), device=str(det.device),
                            max_images=c.max_images, max_message_bytes=c.max_message_bytes,
                            max_pixels=c.max_pixels, max_batch=c.max_batch, scorer=scorer)

    async def ScoreStream(self, request_iterator: Any, context: grpc.aio.ServicerContext):
        """Requests are scored concurrently (up to stream_window at once), answered in order; the
        next request is read only when a window slot is free and the server has room."""
        deadline = _deadline(context)
        pending: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self._cfg.stream_window)

        async def read() -> None:
            try:
                while True:
                    await window.acquire()              # released once its response is sent
                    await self._host.wait_for_room()    # flow control: the client waits too
                    request = await anext(request_iterator, None)
                    if request is None:
                        return
                    nbytes = request.ByteSize()
                    self._host.hold_bytes(nbytes)       # read: it counts until its task ends
                    task = asyncio.ensure_future(self._stream_one(request, deadline))
                    task.add_done_callback(lambda _, n=nbytes: self._host.release_bytes(n))
                    pending.put_nowait(task)
            finally:
                pending.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                response = await task
                yield response
                window.release()
            await reader  # re-raise a failed read
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    async def _stream_one(self, request: pb.ScoreRequest, deadline: float | None
                          ) -> pb.ScoreResponse:
        """One stream request's response (its bytes are held by the reader until this task
        ends); a failure is answered in it, the stream stays open."""
        request_id = request.request_id
        with _handled(self._metrics, "ScoreStream", None) as outcome:
            return await self._score(request, deadline, bytes_held=True)
        response = pb.ScoreResponse(request_id=request_id, error_code=outcome.code.value[0],
                                    error=outcome.details)
        if response.ByteSize() > self._cfg.max_message_bytes:   # a request_id near the limit
            response.request_id = ""
        return response
