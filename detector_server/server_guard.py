"""Call admission of `rwood-serve`, decided from a call's method and metadata before its request is
read, and request messages that do not parse.

Use `CallGuard(max_calls, is_full, metrics)` as a server interceptor (after the bearer-token one),
and `refusal(handler, code, details)` wherever a call must be refused without reading its body.

- At most `max_calls` calls at once in the whole server (health checks aside, which must answer
  under load): a call beyond gets RESOURCE_EXHAUSTED before its request is read. A call is
  counted until its task ends, however it ends (grpc's own `maximum_concurrent_rpcs` would queue
  calls instead, health checks with them).
- While the requests being handled hold `max_inflight_mb` or `max_queue_images` (`is_full()`), a
  new Score call gets UNAVAILABLE (retryable) before its request is read; ScoreStream stops
  reading instead.
- A request message that does not parse gets INVALID_ARGUMENT, is counted in
  `rwood_malformed_messages_total{method}` and logged as one line per method and cause (the
  parser's exception type), at most once a minute with the count of those not logged (grpc.aio
  would log a 40-line traceback for each one and answer UNKNOWN).

Test: tests/reliability/test_server_limits.py.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, AsyncIterator, Callable

import grpc

from .server_metrics import ServerMetrics

__all__ = ["CallGuard", "refusal", "HEALTH_PREFIX", "RateLimitedLog"]

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_FULL_SHEDS = ("/rwood.v1.Detector/Score",)   # unary calls whose body may be large


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
            ) -> grpc.RpcMethodHandler:
    """A handler that answers `code` at once and never reads the request: request-streaming on
    the server side whatever the method's kind, so grpc does not receive and parse a unary
    request before the handler runs."""
    async def deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    factory = (grpc.stream_stream_rpc_method_handler if handler.response_streaming
               else grpc.stream_unary_rpc_method_handler)
    return factory(deny, request_deserializer=None,
                   response_serializer=handler.response_serializer)


class RateLimitedLog:
    """Logs a WARNING per key at most once per `interval_s`, saying how many were not logged."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0):
        self._log, self._interval = logger, interval_s
        self._last: dict[Any, float] = {}
        self._skipped: dict[Any, int] = {}

    def warning(self, key: Any, message: str) -> bool:
        """Log `message` unless `key` was logged less than `interval_s` ago; True if logged."""
        now = time.monotonic()
        if key in self._last and now - self._last[key] < self._interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return False
        skipped = self._skipped.pop(key, 0)
        self._last[key] = now
        self._log.warning("%s%s", message,
                          f" ({skipped} more since the last report)" if skipped else "")
        return True


class _Malformed:
    """What the guarded deserializer returns for bytes that do not parse: the exception's type
    (the cause, for the log's rate limit) and its message."""

    __slots__ = ("cause", "message")

    def __init__(self, error: Exception):
        self.cause, self.message = type(error).__name__, str(error)[:120]


class CallGuard(grpc.aio.ServerInterceptor):
    """Caps calls, sheds Score while the server is full, parses requests safely (module docstring)."""

    def __init__(self, max_calls: int, is_full: Callable[[], bool], metrics: ServerMetrics):
        self._max_calls, self._is_full, self._metrics = max_calls, is_full, metrics
        self.active = 0
        metrics.gauge_from(metrics.calls_active, lambda: self.active)
        # Each method's handler wrapped once (grpc hands the same handler object every call).
        self._safe: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._malformed_log = RateLimitedLog(log)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if not method.startswith(HEALTH_PREFIX):
            refused = None
            if self.active >= self._max_calls:
                refused = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"too many calls in progress (limit {self._max_calls}); retry later")
            elif method in _FULL_SHEDS and self._is_full():
                refused = (grpc.StatusCode.UNAVAILABLE,
                           "overloaded: the server holds its limit of requests; retry later")
            if refused is not None:
                self._metrics.requests.labels(method.rsplit("/", 1)[-1], refused[0].name).inc()
                return refusal(handler, *refused)
            task = asyncio.current_task()    # the call's task: grpc runs interceptors in it
            if task is not None:
                self.active += 1
                task.add_done_callback(self._release)
        cached = self._safe.get(id(handler))
        if cached is None or cached[0] is not handler:
            cached = self._safe[id(handler)] = (handler, self._parsing_safely(handler, method))
        return cached[1]

    def _release(self, _task: asyncio.Task) -> None:
        self.active -= 1

    def _note_malformed(self, method: str, bad: _Malformed) -> str:
        self._metrics.malformed.labels(method.rsplit("/", 1)[-1]).inc()
        what = f"{bad.cause}: {bad.message}"
        self._malformed_log.warning((method, bad.cause), f"malformed request message on {method} "
                                                         f"({what}); answered INVALID_ARGUMENT")
        return f"the request message does not parse ({what})"

    def _parsing_safely(self, handler: grpc.RpcMethodHandler, method: str
                        ) -> grpc.RpcMethodHandler:
        """`handler` with a deserializer that never raises and behaviour that refuses what did
        not parse. Handlers that are not async functions are left as they are."""
        deserialize = handler.request_deserializer
        kind = ("stream" if handler.request_streaming else "unary",
                "stream" if handler.response_streaming else "unary")
        fn = getattr(handler, f"{kind[0]}_{kind[1]}")
        is_gen = inspect.isasyncgenfunction(fn)
        if deserialize is None or not (is_gen or inspect.iscoroutinefunction(fn)):
            return handler

        def parse(raw: bytes) -> Any:
            try:
                return deserialize(raw)
            except Exception as e:  # noqa: BLE001 - whatever the parser raises: one cause
                return _Malformed(e)

        async def check(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    self._note_malformed(method, request))
            return request

        async def checked_stream(requests: AsyncIterator, context: grpc.aio.ServicerContext):
            async for request in requests:
                yield await check(request, context)

        async def prepare(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if handler.request_streaming:
                return checked_stream(request, context)
            return await check(request, context)

        if is_gen:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext):
                async for response in fn(await prepare(request, context), context):
                    yield response
        else:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext):
                return await fn(await prepare(request, context), context)

        factory = getattr(grpc, f"{kind[0]}_{kind[1]}_rpc_method_handler")
        return factory(behaviour, request_deserializer=parse,
                       response_serializer=handler.response_serializer)
