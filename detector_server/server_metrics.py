"""Prometheus metrics of `rwood-serve`, exposed over HTTP on `--metrics-port`.

Use `ServerMetrics()` once per server: it owns its own `CollectorRegistry`, so several servers (or
tests) in one process never collide. Metric names (all prefixed `rwood_`):

| metric | type | labels | meaning |
|---|---|---|---|
| `rwood_requests_total` | counter | method, code | RPCs finished, by gRPC status code name |
| `rwood_request_latency_seconds` | histogram | method | RPC wall time in the handler |
| `rwood_images_total` | counter | | images received in Score/ScoreStream requests |
| `rwood_image_errors_total` | counter | kind | images not scored: empty, undecodable, too_large |
| `rwood_ood_decisions_total` | counter | decision | scored images by decision (ood, id); `rate()`: OOD rate |
| `rwood_batch_size` | histogram | | images per model batch |
| `rwood_batch_requests` | histogram | | requests (parts) sharing one model batch |
| `rwood_queue_images` | gauge | | images waiting for a batch |
| `rwood_inflight_requests` | gauge | | Score/GetInfo calls and ScoreStream requests being handled |
| `rwood_inflight_bytes` | gauge | | bytes (image data, ids) of the requests being handled |
| `rwood_calls_active` | gauge | | calls in progress, health checks aside (limit: `--max-calls`) |
| `rwood_malformed_messages_total` | counter | method | request messages that do not parse |
| `rwood_model_info` | gauge | model_version | 1 for the model being served |
| `rwood_reloads_total` | counter | outcome | hot reloads: ok / refused / timeout |
| `rwood_last_reload_ok` | gauge | | 1: the last reload served the bundle; 0: it failed (stale model) |
| `rwood_last_reload_timestamp_seconds` | gauge | | when the last reload ended (Unix time; 0: none yet) |
| `rwood_serving` | gauge | | 1 when serving, 0 while loading or draining |
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

__all__ = ["ServerMetrics", "IMAGE_ERROR_KINDS", "RELOAD_OUTCOMES"]

IMAGE_ERROR_KINDS = ("empty", "undecodable", "too_large")
RELOAD_OUTCOMES = ("ok", "refused", "timeout")
_LATENCY_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The server's metrics on a private registry (see the module docstring for the list)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rwood_requests", "RPCs finished", ["method", "code"], registry=r)
        self.latency = Histogram("rwood_request_latency_seconds", "RPC wall time in the handler",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("rwood_images", "Images received", registry=r)
        self.image_errors = Counter("rwood_image_errors", "Images not scored, by kind", ["kind"],
                                    registry=r)
        self.ood_decisions = Counter("rwood_ood_decisions", "Scored images by decision",
                                     ["decision"], registry=r)
        self.batch_size = Histogram("rwood_batch_size", "Images per model batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("rwood_batch_requests", "Requests sharing a model batch",
                                        buckets=_BATCH_BUCKETS, registry=r)
        self.queue_images = Gauge("rwood_queue_images", "Images waiting for a batch", registry=r)
        self.inflight = Gauge("rwood_inflight_requests", "Requests being handled", registry=r)
        self.inflight_bytes = Gauge("rwood_inflight_bytes", "Bytes of the requests being handled",
                                    registry=r)
        self.calls_active = Gauge("rwood_calls_active", "Calls in progress, health checks aside",
                                  registry=r)
        self.malformed = Counter("rwood_malformed_messages", "Request messages that do not parse",
                                 ["method"], registry=r)
        self.model_info = Gauge("rwood_model_info", "1 for the model being served",
                                ["model_version"], registry=r)
        self.reloads = Counter("rwood_reloads", "Hot reloads by outcome", ["outcome"], registry=r)
        self.last_reload_ok = Gauge("rwood_last_reload_ok",
                                    "1: the last reload served the bundle; 0: it failed", registry=r)
        self.last_reload_time = Gauge("rwood_last_reload_timestamp_seconds",
                                      "When the last reload ended (Unix time)", registry=r)
        self.serving = Gauge("rwood_serving", "1 when serving, 0 while loading or draining",
                             registry=r)
        for kind in IMAGE_ERROR_KINDS:      # export zeros so dashboards see every series at once
            self.image_errors.labels(kind)
        for decision in ("ood", "id"):
            self.ood_decisions.labels(decision)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.last_reload_ok.set(1)
        self._http: Any = None

    def observe_batch(self, n_images: int, n_requests: int) -> None:
        self.batch_size.observe(n_images)
        self.batch_requests.observe(n_requests)

    def record_reload(self, outcome: str) -> None:
        """Count a reload and expose it as the last one (`outcome` in RELOAD_OUTCOMES)."""
        self.reloads.labels(outcome).inc()
        self.last_reload_ok.set(1 if outcome == "ok" else 0)
        self.last_reload_time.set_to_current_time()

    def set_model(self, model_version: str) -> None:
        """Mark `model_version` as the one being served (and no other)."""
        self.model_info.clear()
        self.model_info.labels(model_version).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (port 0 picks a free one) in a daemon thread; returns the port."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = httpd
        return int(httpd.server_address[1])

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
