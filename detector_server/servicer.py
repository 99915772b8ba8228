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
import functools
import logging
import time
from typing import Any, Callable, Sequence

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
    return pb.ScoreResponse(
        results=[pb.Result(id=r.id, score=r.score, is_ood=r.is_ood, error=r.error,
                           predicted_class=r.predicted_class, predicted_label=r.predicted_label)
                 for r in results],
        model_version=model_version, request_id=request_id)


def _observed(method: str) -> Callable:
    """Unary handler wrapper: maps known errors to status codes and records metrics."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def handler(self: "DetectorServicer", request: Any, context: grpc.aio.ServicerContext):
            t0, code = time.perf_counter(), grpc.StatusCode.OK
            self._metrics.inflight.inc()
            try:
                return await fn(self, request, context)
            except _MAPPED as e:
                code = _status_of(e)
                await context.abort(code, str(e))
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                        else grpc.StatusCode.CANCELLED)
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                await context.abort(code, "internal error (see the server log)")
            finally:
                self._metrics.inflight.dec()
                self._metrics.requests.labels(method, code.name).inc()
                self._metrics.latency.labels(method).observe(time.perf_counter() - t0)
        return handler
    return wrap


class DetectorServicer(pb_grpc.DetectorServicer):
    """rwood.v1.Detector: converts protos to and from `ModelHost` calls."""

    def __init__(self, host: ModelHost, config: ServeConfig, metrics: ServerMetrics):
        self._host, self._cfg, self._metrics = host, config, metrics

    @_observed("Score")
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
                    ) -> pb.ScoreResponse:
        results, version = await self._host.score([(im.id, im.data) for im in request.images],
                                                  _deadline(context))
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
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        self._metrics.inflight.inc()
        try:
            results, version = await self._host.score(
                [(im.id, im.data) for im in request.images], deadline)
            return _to_response(results, version, request.request_id)
        except _MAPPED as e:
            code = _status_of(e)
            return pb.ScoreResponse(request_id=request.request_id, error_code=code.value[0],
                                    error=str(e))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("ScoreStream request failed")
            return pb.ScoreResponse(request_id=request.request_id, error_code=code.value[0],
                                    error="internal error (see the server log)")
        finally:
            self._metrics.inflight.dec()
            self._metrics.requests.labels("ScoreStream", code.name).inc()
            self._metrics.latency.labels("ScoreStream").observe(time.perf_counter() - t0)

