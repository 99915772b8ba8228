"""grpc.health.v1 for `rwood-serve`: Watch streams that end when the server drains, and at most
so many of them without credentials.

Use `configure_health(server, max_watches, trusted, metrics)` once per gRPC server, then
`set_health(servicer, serving)`; `servicer.close_watches()` when draining. `trusted(metadata)` says
whether a call carries valid credentials (the bearer token); Check is never limited, since load
balancers and kubelets probe with it.
Test: tests/runtime/test_server.py, tests/runtime/test_server_security.py.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ._proto import detector_pb2 as pb
from .server_metrics import ServerMetrics

__all__ = ["HealthServicer", "configure_health", "set_health"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name  # "rwood.v1.Detector"


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose Watch streams end when the server drains (once they have had time to
    report NOT_SERVING), so open watches do not hold the shutdown for the whole grace period.
    At most `max_watches` Watch streams at once without credentials; beyond, RESOURCE_EXHAUSTED."""

    def __init__(self, max_watches: int, trusted: Callable[[Any], bool],
                 metrics: ServerMetrics) -> None:
        super().__init__()
        self._closing = asyncio.Event()
        self._max_watches, self._trusted, self._metrics = max_watches, trusted, metrics
        self._watches = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        counted = not self._trusted(context.invocation_metadata())
        if counted and self._watches >= self._max_watches:
            self._metrics.requests.labels("Watch", "RESOURCE_EXHAUSTED").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many health watches (limit {self._max_watches}); "
                                "use Check, or retry later")
        self._watches += counted
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._watches -= counted
            closing.cancel()
            watch.cancel()
        if watch.done() and not watch.cancelled():
            watch.result()  # re-raise what the watch raised, if anything

    def close_watches(self) -> None:
        self._closing.set()


def configure_health(server: grpc.aio.Server, max_watches: int, trusted: Callable[[Any], bool],
                     metrics: ServerMetrics) -> HealthServicer:
    """Add grpc.health.v1 to `server` (set it NOT_SERVING with `set_health` before starting)."""
    servicer = HealthServicer(max_watches, trusted, metrics)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)
