"""Prometheus metrics of `rwood-serve`, exposed over HTTP on `--metrics-port`.

Use `ServerMetrics()` once per server: it owns its own `CollectorRegistry`, so several servers (or
tests) in one process never collide. With `--workers N` every worker process writes its values to
files in one directory (prometheus-client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR) and the
supervisor's `SupervisorMetrics` serves their sum on the one /metrics endpoint, with its own
metrics added. Metric names (all prefixed `rwood_`):

| metric | type | labels | meaning |
|---|---|---|---|
| `rwood_requests_total` | counter | method, code | RPCs finished, by gRPC status code name |
| `rwood_request_latency_seconds` | histogram | method | RPC wall time in the handler |
| `rwood_images_total` | counter | | images received in Score/ScoreStream requests |
| `rwood_image_errors_total` | counter | kind | images not scored: empty, undecodable, too_large |
| `rwood_ood_decisions_total` | counter | decision | scored images by decision (ood, id); `rate()`: OOD rate |
| `rwood_short_queries_total` | counter | | KNN queries short of K neighbours (scored -2): search too narrow |
| `rwood_score_rank` | histogram | model_version | scored images by calibration percentile (below) |
| `rwood_expected_ood_ratio` | gauge | model_version | calibration scores below the threshold (~ 1 - TPR) |
| `rwood_batch_size` | histogram | | images per model batch |
| `rwood_batch_requests` | histogram | | requests (parts) sharing one model batch |
| `rwood_queue_images` | gauge | | images waiting for a batch |
| `rwood_inflight_requests` | gauge | | Score/GetInfo calls and ScoreStream requests being handled |
| `rwood_inflight_bytes` | gauge | | bytes (image data, ids) of the requests being handled |
| `rwood_calls_active` | gauge | | calls in progress, health checks aside (limit: `--max-calls`) |
| `rwood_malformed_messages_total` | counter | method | request messages that do not parse |
| `rwood_model_info` | gauge | model_version | 1 for the model being served (0 for one served before) |
| `rwood_reloads_total` | counter | outcome | hot reloads: ok / refused / timeout (one per reload of all) |
| `rwood_last_reload_ok` | gauge | | 1: the last reload served the bundle (or none yet); 0: it failed |
| `rwood_last_reload_timestamp_seconds` | gauge | | when the last reload ended (Unix time; 0: none yet) |
| `rwood_serving` | gauge | | workers serving (1 per process; 0 while loading or draining) |
| `rwood_workers` | gauge | | worker processes configured (`--workers`; supervisor only) |
| `rwood_worker_restarts_total` | counter | | workers that died and were restarted (supervisor only) |

Drift: `rwood_score_rank` places each scored image among the bundle's calibration scores (the
held-out in-distribution scores that set the threshold): 0 below all of them, 1 above all, so its
buckets are the calibration score percentiles. In-distribution traffic spreads evenly (10% of it in
`le="0.1"`); "how much traffic scores below the 1st percentile of calibration" is
`rate(rwood_score_rank_bucket{le="0.01"}[5m]) / rate(rwood_score_rank_count[5m])`. Bundles
exported before calibration scores were stored have no such histogram; `rwood_expected_ood_ratio`
comes from the manifest's threshold and is always there.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = ["ServerMetrics", "SupervisorMetrics", "IMAGE_ERROR_KINDS", "RANK_BUCKETS",
           "RELOAD_OUTCOMES", "multiprocess_mode"]

IMAGE_ERROR_KINDS = ("empty", "undecodable", "too_large")
RELOAD_OUTCOMES = ("ok", "refused", "timeout")
_LATENCY_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1.0, 2.0, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Calibration percentiles the score histogram splits at (le="0.01": below the 1st percentile).
RANK_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def multiprocess_mode() -> bool:
    """True when this process's metric values live in PROMETHEUS_MULTIPROC_DIR's files (the
    variable was set when prometheus-client was imported: a `--workers` worker)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class _Endpoint:
    """A registry and the HTTP server that exposes it."""

    registry: CollectorRegistry
    _http: Any = None

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


class _Reloads:
    """`rwood_reloads_total{outcome}` and the last reload's outcome and time, kept by whoever
    reloads (a single server, or the supervisor of --workers)."""

    reloads: Counter | None = None

    def _init_reloads(self, registry: CollectorRegistry | None) -> None:
        self.reloads = Counter("rwood_reloads", "Hot reloads by outcome", ["outcome"],
                               registry=registry)
        self.last_reload_ok = Gauge("rwood_last_reload_ok", "1: the last reload served the "
                                    "bundle; 0: it failed", registry=registry,
                                    multiprocess_mode="mostrecent")
        self.last_reload_time = Gauge("rwood_last_reload_timestamp_seconds",
                                      "When the last reload ended (Unix time)", registry=registry,
                                      multiprocess_mode="mostrecent")
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.last_reload_ok.set(1)

    def record_reload(self, outcome: str) -> None:
        """Count a reload and expose it as the last one (`outcome` in RELOAD_OUTCOMES)."""
        if self.reloads is None:
            return
        self.reloads.labels(outcome).inc()
        self.last_reload_ok.set(1 if outcome == "ok" else 0)
        self.last_reload_time.set_to_current_time()


class ServerMetrics(_Endpoint, _Reloads):
    """The server's metrics on a private registry (see the module docstring for the list).

    reloads: count reloads here (a worker leaves them to its supervisor, which counts each reload
    of all workers once).
    """

    def __init__(self, reloads: bool = True) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rwood_requests", "RPCs finished", ["method", "code"], registry=r)
        self.latency = Histogram("rwood_request_latency_seconds", "RPC wall time in the handler",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("rwood_images", "Images received", registry=r)
        self.image_errors = Counter("rwood_image_errors", "Images not scored, by kind", ["kind"],
                                    registry=r)
        self.ood_decisions = Counter("rwood_ood_decisions", "Scored images by decision",
                                     ["decision"], registry=r)
        self.short_queries = Counter("rwood_short_queries", "KNN queries with fewer than K "
                                     "neighbours (scored -2)", registry=r)
        self.score_rank = Histogram(
            "rwood_score_rank", "Scored images by their place among the calibration scores",
            ["model_version"], buckets=RANK_BUCKETS, registry=r)
        self.expected_ood = Gauge("rwood_expected_ood_ratio", "Calibration scores below the "
                                  "threshold", ["model_version"], registry=r,
                                  multiprocess_mode="livemax")
        self.batch_size = Histogram("rwood_batch_size", "Images per model batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("rwood_batch_requests", "Requests sharing a model batch",
                                        buckets=_BATCH_BUCKETS, registry=r)
        self.queue_images = Gauge("rwood_queue_images", "Images waiting for a batch", registry=r,
                                  multiprocess_mode="livesum")
        self.inflight = Gauge("rwood_inflight_requests", "Requests being handled", registry=r,
                              multiprocess_mode="livesum")
        self.inflight_bytes = Gauge("rwood_inflight_bytes", "Bytes of the requests being handled",
                                    registry=r, multiprocess_mode="livesum")
        self.calls_active = Gauge("rwood_calls_active", "Calls in progress, health checks aside",
                                  registry=r, multiprocess_mode="livesum")
        self.malformed = Counter("rwood_malformed_messages", "Request messages that do not parse",
                                 ["method"], registry=r)
        self.model_info = Gauge("rwood_model_info", "1 for the model being served",
                                ["model_version"], registry=r, multiprocess_mode="livemax")
        if reloads:
            self._init_reloads(r)
        self.serving = Gauge("rwood_serving", "Workers serving (0 while loading or draining)",
                             registry=r, multiprocess_mode="livesum")
        for kind in IMAGE_ERROR_KINDS:      # export zeros so dashboards see every series at once
            self.image_errors.labels(kind)
        for decision in ("ood", "id"):
            self.ood_decisions.labels(decision)
        self._functions: list[tuple[Gauge, Callable[[], float]]] = []
        self._version: str | None = None

    def gauge_from(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        """Let `gauge` read `fn()`: at scrape time, or at each `refresh()` in multiprocess mode
        (where the supervisor reads files, not this process)."""
        if multiprocess_mode():
            self._functions.append((gauge, fn))
        else:
            gauge.set_function(fn)

    def refresh(self) -> None:
        """Write the function-backed gauges' current values (multiprocess mode; else a no-op)."""
        for gauge, fn in self._functions:
            gauge.set(fn())

    def observe_batch(self, n_images: int, n_requests: int) -> None:
        self.batch_size.observe(n_images)
        self.batch_requests.observe(n_requests)

    def observe_ranks(self, model_version: str, ranks: np.ndarray) -> None:
        """Count scored images by calibration rank (float [N] in [0, 1], see `Detector.rank`)."""
        child = self.score_rank.labels(model_version)
        for r in ranks.tolist():
            child.observe(r)

    def set_model(self, model_version: str, expected_ood_ratio: float) -> None:
        """Mark `model_version` as the one being served (and no other)."""
        old, self._version = self._version, model_version
        if old is not None and old != model_version:
            if multiprocess_mode():     # label sets cannot be removed from the shared files
                self.model_info.labels(old).set(0)
            else:
                self.model_info.remove(old)
                self.expected_ood.remove(old)
        self.model_info.labels(model_version).set(1)
        self.expected_ood.labels(model_version).set(expected_ood_ratio)

class SupervisorMetrics(_Endpoint, _Reloads):
    """/metrics of `rwood-serve --workers N`: the sum of the workers' files in `directory`, plus
    the supervisor's own `rwood_workers`, `rwood_worker_restarts_total` and reload metrics."""

    def __init__(self, workers: int, directory: str) -> None:
        r = self.registry = CollectorRegistry()
        MultiProcessCollector(r, path=directory)
        self.directory = directory
        own = None if multiprocess_mode() else r    # else they are in the files already
        self.workers = Gauge("rwood_workers", "Worker processes configured", registry=own,
                             multiprocess_mode="max")
        self.restarts = Counter("rwood_worker_restarts", "Workers that died and were restarted",
                                registry=own)
        self._init_reloads(own)
        self.workers.set(workers)

    def mark_dead(self, pid: int) -> None:
        """Drop the live gauges of a worker that died (its counters keep counting in the sum)."""
        mark_process_dead(pid, self.directory)
