"""The gRPC servicer of `rwood.v1.Detector`: protos to and from `ModelHost` calls, errors to status
codes, one set of request metrics.

Use `DetectorServicer(host, config, metrics)` with `pb_grpc.add_DetectorServicer_to_server`; the
server (`detector_server.server`) does the wiring. InputError -> INVALID_ARGUMENT, ModelUnavailable
-> UNAVAILABLE, TimeoutError -> DEADLINE_EXCEEDED, anything else -> INTERNAL with no details (they
go to the log). Unary calls abort with the status; a ScoreStream request that fails is answered with
a `ScoreResponse` carrying `error_code`/`error` and the stream stays open.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any, Callable, Iterator, Sequence

import grpc

from ._proto import detector_pb2 as pb
from ._proto import detector_pb2_grpc as pb_grpc
from .detector import ItemResult
from .errors import InputError
from .model_host import ModelHost, ModelUnavailable
from .serve_config import ServeConfig
from .server_metrics import ServerMetrics

__all__ = ["DetectorServicer"]

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


def _to_response(results: Sequence[ItemResult], model_version: str, request_id: str
                 ) -> pb.ScoreResponse:
    return pb.ScoreResponse(results=[_result(r) for r in results], model_version=model_version,
                            request_id=request_id)


def _result(r: ItemResult) -> pb.Result:
    out = pb.Result(id=r.id, score=r.score, is_ood=r.is_ood, error=r.error,
                    predicted_class=r.predicted_class, predicted_label=r.predicted_label)
    if r.neighbors:
        out.neighbors.extend(pb.Neighbor(row=n.row, class_index=n.class_index, label=n.label,
                                         similarity=n.similarity, source=n.source,
                                         source_index=n.source_index) for n in r.neighbors)
    return out


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
        outcome.code, outcome.details = _status_of(e), str(e)
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

    @_observed("Score")
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
                    ) -> pb.ScoreResponse:
        results, version = await self._host.score([(im.id, im.data) for im in request.images],
                                                  _deadline(context), request.neighbors)
        return _to_response(results, version, request.request_id)

    @_observed("GetInfo")
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ModelInfo:
        det, c = self._host.info(), self._cfg
        return pb.ModelInfo(model_version=det.model_version, threshold=float(det.threshold),
                            k=int(det.k), class_names=list(det.class_names),
                            input_size=det.spec.size, resize=det.spec.resize,
                            providers=list(det.providers), device=str(det.device),
                            max_images=c.max_images, max_message_bytes=c.max_message_bytes,
                            max_pixels=c.max_pixels, max_batch=c.max_batch)

    async def ScoreStream(self, request_iterator: Any, context: grpc.aio.ServicerContext):
        """Requests are scored concurrently (up to stream_window at once), answered in order."""
        deadline = _deadline(context)
        pending: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self._cfg.stream_window)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    pending.put_nowait(asyncio.ensure_future(self._stream_one(request, deadline)))
            finally:
                pending.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                response = await task
                window.release()
                yield response
            await reader  # re-raise a failed read
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    async def _stream_one(self, request: pb.ScoreRequest, deadline: float | None) -> pb.ScoreResponse:
        """One stream request's response; a failure is answered in it, the stream stays open."""
        with _handled(self._metrics, "ScoreStream", None) as outcome:
            results, version = await self._host.score(
                [(im.id, im.data) for im in request.images], deadline, request.neighbors)
            return _to_response(results, version, request.request_id)
        return pb.ScoreResponse(request_id=request.request_id, error_code=outcome.code.value[0],
                                error=outcome.details)
