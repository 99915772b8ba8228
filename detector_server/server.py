"""The real-time gRPC detector: `rwood.v1.Detector` over a bundle, with health, reflection, metrics.

Use `serve(address, bundle, **options)` to run a server until SIGTERM/SIGINT (what `rwood-serve`
does), or `start_background(bundle, **options)` to run one on a thread of the current process
(tests, notebooks). The contract is protos/rwood/v1/detector.proto; options are `ServeConfig`.

How a Score request flows:
1. `DetectorServicer.Score` converts the proto to `(id, bytes)` pairs (and back, at the end).
2. `ModelHost.score` snapshots the current Detector, decodes the images (`Detector.prepare`) and
   records per-image errors. Small images (a few thousand pixels per request, read from the
   headers) are decoded on the event loop, cheaper than a thread hop; bigger ones on a thread pool
   (PIL releases the GIL for most of the decode), so the loop never stalls on a large image.
3. The decoded images go to the `DynamicBatcher`, which merges them with other requests' images
   into one `Detector.score_arrays` call on its worker thread (ONNX Runtime and FAISS release the GIL).

Why grpc.aio rather than the sync server with a thread pool: on 2 cores the work that needs the GIL
is small (proto parsing, bookkeeping) and the heavy parts (decode, ONNX Runtime, FAISS) run on
threads that release it. One event loop handles thousands of waiting RPCs without a thread each,
so 64 concurrent clients cost no context switches or GIL convoy, while every waiting request is just
a future for the batcher to fill. A sync server would need a thread per in-flight RPC (64+), each
blocking on a batch result, and would thrash the GIL on 2 cores; aio also gives the bidirectional
stream and graceful `stop(grace)` natively.

Hot reload (SIGHUP, `--watch`) builds the new Detector on a worker thread, warms it up, then swaps
it in; a bundle that fails to load is refused with a log line and the old one keeps serving. Each
request is scored entirely by the Detector it started with and its response names that model.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import io
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from ._proto import detector_pb2 as pb
from ._proto import detector_pb2_grpc as pb_grpc
from .batcher import DynamicBatcher
from .detector import Detector, ItemResult, merge_results
from .errors import BundleError, InputError
from .preprocess import DEFAULT_MAX_PIXELS
from .server_metrics import ServerMetrics
from .validate import check_int

__all__ = ["ServeConfig", "serve", "start_background", "BackgroundServer", "DetectorServer",
           "SERVICE_NAME"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name  # "rwood.v1.Detector"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `rwood-serve` can be told; each field is one CLI flag."""

    address: str = "127.0.0.1:50051"    # host:port to bind; loopback unless told otherwise; port 0 = any
    max_batch: int = 64                 # most images per model call
    max_wait_ms: float = 0.0            # longest a lone image waits for others to join its batch
    max_images: int = 256               # most images per ScoreRequest (more -> INVALID_ARGUMENT)
    max_message_mb: float = 64.0        # largest request message (more -> RESOURCE_EXHAUSTED)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, per image
    max_queue_images: int = 4096        # images admitted at once; beyond, UNAVAILABLE (load shedding)
    device: str = "auto"                # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int | None = None          # ONNX Runtime/FAISS threads; None = the Detector's default
    decode_threads: int = 2             # image decode pool
    stream_window: int = 32             # requests in flight per ScoreStream
    tls_cert: str | None = None         # PEM server certificate chain (with tls_key)
    tls_key: str | None = None          # PEM private key
    tls_client_ca: str | None = None    # PEM CA bundle: clients must present a cert it signed (mTLS)
    auth_token_file: str | None = None  # file holding the bearer token clients must send
    metrics_port: int | None = None     # Prometheus /metrics port; None = off, 0 = any free port
    metrics_host: str = "127.0.0.1"     # where /metrics listens
    watch: bool = False                 # reload when the bundle's manifest.json changes
    watch_interval_s: float = 2.0       # how often --watch looks
    grace_s: float = 10.0               # on SIGTERM, how long in-flight requests may take to finish
    drain_delay_s: float = 0.5          # on SIGTERM, NOT_SERVING + UNAVAILABLE answers this long
                                        # before the listener closes (part of grace_s)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_images", "max_queue_images", "decode_threads",
                     "stream_window"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("max_wait_ms", "grace_s", "drain_delay_s"):
            if not getattr(self, name) >= 0:
                raise InputError(f"expected a number >= 0, got {getattr(self, name)!r}", field=name)
        for name in ("max_message_mb", "watch_interval_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"expected a number > 0, got {getattr(self, name)!r}", field=name)
        if self.max_message_mb * 2**20 >= 2**31:
            raise InputError("must be below 2048 (gRPC's limit)", field="max_message_mb")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InputError("give both --tls-cert and --tls-key, or neither", field="tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InputError("mutual TLS needs --tls-cert and --tls-key too", field="tls_client_ca")
        if self.address.rpartition(":")[0] == "" or not self.address.rpartition(":")[2].isdigit():
            raise InputError(f"expected host:port, got {self.address!r}", field="address")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


class ModelUnavailable(Exception):
    """No model to score with (still loading, or the server is draining) -> UNAVAILABLE."""


# ---------------------------------------------------------------------------------------------
# The model: decode pool + batcher + the current Detector (hot-swappable)
# ---------------------------------------------------------------------------------------------
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
    path off the event loop and swaps it in (raising on failure, leaving the old one in place).
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
        # Read at scrape time, so the gauge falls back to 0 when the queue drains.
        metrics.queue_images.set_function(lambda: self._batcher.queued_images)
        self._load_lock = asyncio.Lock()

    def _build_detector(self) -> Detector:
        """Runs on a worker thread: load, then warm up so the first request pays no set-up cost."""
        det = Detector(self.bundle_path, device=self._cfg.device, threads=self._cfg.threads,
                       max_pixels=self._cfg.max_pixels)
        s = det.spec.size
        for n in dict.fromkeys((1, self._cfg.max_batch)):   # the smallest and the largest batch
            det.score_arrays(np.zeros((n, s, s, 3), dtype=np.uint8))
        return det

    async def load(self) -> Detector:
        """Load the bundle again and serve it; raises (BundleError, ...) and keeps the old model."""
        async with self._load_lock:
            det = await asyncio.get_running_loop().run_in_executor(None, self._build_detector)
            old, self.detector = self.detector, det
            self._metrics.set_model(det.model_version)
            log.info("serving model %s from %s (device %s, providers %s)%s", det.model_version,
                     self.bundle_path, det.device, ",".join(det.providers),
                     f", replacing {old.model_version}" if old is not None else "")
            return det

    async def score(self, images: Sequence[tuple[str, bytes]], deadline: float | None
                    ) -> tuple[list[ItemResult], str]:
        """Score `(id, encoded bytes)` pairs; returns results in order and the model version used.

        Raises InputError for no images or more than max_images, ModelUnavailable when there is no
        model (loading, draining) or too much work is queued, TimeoutError when `deadline`
        (time.monotonic()) passes first.
        """
        det = self._admit(images)
        self._admitted += len(images)
        try:
            arrays, ok, errors = await self._prepare(det, [data for _, data in images], deadline)
            batch = None
            if arrays is not None:
                batch = await self._batcher.score(det, arrays, deadline)
        finally:
            self._admitted -= len(images)
        return self._results(det, images, ok, batch, errors), det.model_version

    def _admit(self, images: Sequence[tuple[str, bytes]]) -> Detector:
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
        self._metrics.images.inc(len(images))
        return det

    def _results(self, det: Detector, images: Sequence[tuple[str, bytes]], ok: list[int],
                 batch: Any, errors: dict[int, str]) -> list[ItemResult]:
        """ItemResults in request order from the scored rows (`ok`) and the per-image errors."""
        if batch is not None:
            n_ood = int(np.count_nonzero(batch.is_ood))
            self._metrics.ood_decisions.labels("ood").inc(n_ood)
            self._metrics.ood_decisions.labels("id").inc(len(ok) - n_ood)
        for i, message in errors.items():
            self._metrics.image_errors.labels(_error_kind(images[i][1], message)).inc()
        return merge_results([id_ for id_, _ in images],
                             [errors.get(i) for i in range(len(images))], batch, det.class_names)

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


# ---------------------------------------------------------------------------------------------
# The servicer: protos <-> ModelHost calls, errors -> status codes
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Security: TLS credentials and the bearer-token interceptor
# ---------------------------------------------------------------------------------------------
def _read_file(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path=path, field=field) from None


def _server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with tls_client_ca) credentials, or None for a plaintext port."""
    if config.tls_cert is None:
        return None
    key, cert = _read_file(config.tls_key, "tls_key"), _read_file(config.tls_cert, "tls_cert")
    ca = None if config.tls_client_ca is None else _read_file(config.tls_client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _read_token(path: str) -> str:
    token = _read_file(path, "auth_token_file").decode("utf-8", "replace").strip()
    if not token or any(c.isspace() for c in token):
        raise InputError("expected one token without spaces", path=path, field="auth_token_file")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every call except health checks
    (load balancers and kubelets probe without credentials). Missing or wrong -> UNAUTHENTICATED.
    The comparison is constant-time (hmac.compare_digest)."""

    _EXEMPT = ("/grpc.health.v1.Health/",)
    _FACTORY = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}

    def __init__(self, token: str, metrics: ServerMetrics | None = None):
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._EXEMPT):
            return handler
        got = next((v for k, v in (details.invocation_metadata or ()) if k == "authorization"), "")
        got_bytes = got if isinstance(got, bytes) else str(got).encode()
        if hmac.compare_digest(got_bytes, self._expected):
            return handler
        if self._metrics is not None:
            self._metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        reason = "missing bearer token" if not got else "wrong bearer token"

        async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        factory = self._FACTORY[(handler.request_streaming, handler.response_streaming)]
        return factory(deny, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------
class _HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose Watch streams end when the server drains (once they have had time to
    report NOT_SERVING), so open watches do not hold the shutdown for the whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._closing = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            watch.cancel()
        if watch.done() and not watch.cancelled():
            watch.result()  # re-raise what the watch raised, if anything

    def close_watches(self) -> None:
        self._closing.set()


def _configure_health(server: grpc.aio.Server) -> _HealthServicer:
    """Add grpc.health.v1 to `server` (set it NOT_SERVING with `_set_health` before starting)."""
    servicer = _HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def _set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


def _bundle_stamp(bundle: Path) -> tuple[int, ...] | None:
    """What --watch compares: manifest.json's inode, size and mtime (None while it is missing)."""
    try:
        st = (bundle / "manifest.json").stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class DetectorServer:
    """One server: gRPC (Detector, health, reflection), metrics HTTP, the model host.

    `await start()` binds, reports NOT_SERVING, loads the model, then reports SERVING;
    `await reload()` hot-swaps the bundle; `await stop()` drains (NOT_SERVING, refuse new,
    finish in-flight within grace_s). Use on one event loop.
    """

    def __init__(self, bundle: str | os.PathLike, config: ServeConfig):
        self.bundle_path = Path(bundle)
        self.config = config
        self.metrics = ServerMetrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._host: ModelHost | None = None
        self._health: _HealthServicer | None = None
        self._watch_task: asyncio.Task | None = None
        self._stopping = False
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        """Bind and load; raises InputError (options, address) or BundleError (bundle)."""
        cfg = self.config
        if not (self.bundle_path / "manifest.json").is_file():
            raise BundleError("not a bundle directory (no manifest.json)", path=str(self.bundle_path))
        creds = _server_credentials(cfg)
        interceptors = ([BearerTokenInterceptor(_read_token(cfg.auth_token_file), self.metrics)]
                        if cfg.auth_token_file else [])
        server = self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                     ("grpc.max_send_message_length", cfg.max_message_bytes),
                     ("grpc.so_reuseport", 0)])
        self._host = ModelHost(self.bundle_path, cfg, self.metrics)
        pb_grpc.add_DetectorServicer_to_server(DetectorServicer(self._host, cfg, self.metrics), server)
        self._health = _configure_health(server)
        await _set_health(self._health, False)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = self._bind(server, creds)
        await server.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(cfg.metrics_host, cfg.metrics_port)
        try:
            await self._host.load()
        except BaseException:
            await self.stop(grace=0)
            raise
        await _set_health(self._health, True)
        self.metrics.serving.set(1)
        if cfg.watch:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    def _bind(self, server: grpc.aio.Server, creds: grpc.ServerCredentials | None) -> int:
        address = self.config.address
        host = address.rpartition(":")[0]
        if host not in _LOOPBACK_HOSTS and creds is None:
            log.warning("binding %s without TLS: traffic (and any token) travels in clear text",
                        address)
        try:
            port = (server.add_insecure_port(address) if creds is None
                    else server.add_secure_port(address, creds))
        except RuntimeError as e:
            raise InputError(f"cannot bind {address}: {e}", field="address") from None
        if not port:
            raise InputError(f"cannot bind {address}", field="address")
        return port

    async def reload(self) -> bool:
        """Load the bundle again; True when the new model serves, False when it was refused."""
        if self._host is None or self._stopping:
            return False
        try:
            await self._host.load()
        except Exception as e:  # noqa: BLE001 - any failure: keep serving the old model
            old = self._host.detector
            log.error("reload of %s refused, still serving %s: %s", self.bundle_path,
                      old.model_version if old else "nothing", e)
            self.metrics.reloads.labels("refused").inc()
            return False
        self.metrics.reloads.labels("ok").inc()
        return True

    async def _watch(self) -> None:
        last = _bundle_stamp(self.bundle_path)
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            stamp = _bundle_stamp(self.bundle_path)
            if stamp is not None and stamp != last:
                last = stamp
                log.info("bundle %s changed, reloading", self.bundle_path)
                await self.reload()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, let in-flight ones finish within `grace` seconds."""
        if self._stopping:
            await self.stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_s if grace is None else grace
        self.metrics.serving.set(0)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._host is not None:
            self._host.draining = True       # requests still arriving on open streams: UNAVAILABLE
        if self._health is not None:
            await self._health.enter_graceful_shutdown()    # NOT_SERVING to Check and Watch
        if self._server is not None:
            log.info("draining: in-flight requests have %.1f s", grace)
            # New calls get our UNAVAILABLE (retryable) while the listener is still open: closing
            # it at once lets grpc cancel calls that were arriving at that instant (CANCELLED).
            delay = min(self.config.drain_delay_s, grace)
            await asyncio.sleep(delay)
            grace -= delay
            stopping = asyncio.ensure_future(self._server.stop(grace))  # refuses new RPCs at once
            await asyncio.sleep(min(0.1, grace))     # lets open Watch streams send NOT_SERVING
            if self._health is not None:
                self._health.close_watches()
            await stopping                           # in-flight RPCs finish, or are cancelled at grace
        if self._host is not None:
            await self._host.close()
        self.metrics.stop_http()
        self.stopped.set()


async def _serve_until_signalled(bundle: str | os.PathLike, config: ServeConfig) -> None:
    server = DetectorServer(bundle, config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.reload()))
    await server.start()
    log.info("rwood-serve: serving on %s:%d%s", config.address.rpartition(":")[0], server.port,
             f", metrics on {config.metrics_host}:{server.metrics_port}" if server.metrics_port else "")
    await stop.wait()
    log.info("rwood-serve: stopping")
    await server.stop()
    log.info("rwood-serve: stopped")


def serve(address: str, bundle: str | os.PathLike, **options: Any) -> None:
    """Serve `bundle` on `address` until SIGTERM or SIGINT; SIGHUP reloads the bundle.

    `options` are `ServeConfig` fields (max_batch, max_wait_ms, tls_cert, ...). Must run on the
    main thread (signal handlers). Raises InputError for bad options, BundleError for a bad bundle.
    """
    config = ServeConfig(address=address, **options)
    asyncio.run(_serve_until_signalled(bundle, config))


class BackgroundServer:
    """A `DetectorServer` running on its own event-loop thread; see `start_background`."""

    def __init__(self, bundle: str | os.PathLike, config: ServeConfig):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rwood-serve",
                                        daemon=True)
        self._thread.start()
        self.server: DetectorServer = self._call(self._make, bundle, config)
        try:
            self._call(self.server.start)
        except BaseException:
            self._shutdown_loop()
            raise

    @staticmethod
    async def _make(bundle: str | os.PathLike, config: ServeConfig) -> DetectorServer:
        return DetectorServer(bundle, config)   # created on the loop: it owns asyncio objects

    def _call(self, fn: Callable, *args: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(timeout)

    @property
    def port(self) -> int:
        return int(self.server.port)  # type: ignore[arg-type]

    @property
    def target(self) -> str:
        return f"{self.server.config.address.rpartition(':')[0]}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def reload(self) -> bool:
        return self._call(self.server.reload)

    def stop(self, grace: float | None = None) -> None:
        if self._loop.is_running():
            self._call(self.server.stop, grace)
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(grace=0)


def start_background(bundle: str | os.PathLike, address: str = "127.0.0.1:0",
                     **options: Any) -> BackgroundServer:
    """Start a server for `bundle` on a background thread and return once it serves.

    `address` defaults to a free loopback port (see `.port`/`.target`); `options` are ServeConfig
    fields. No signal handlers are installed: call `.reload()` and `.stop()` instead.
    """
    return BackgroundServer(bundle, ServeConfig(address=address, **options))
