"""The real-time gRPC detector: `rwood.v1.Detector` over a bundle, with health, reflection, metrics.

Use `serve(address, bundle, **options)` to run a server until SIGTERM/SIGINT (what `rwood-serve`
does), or `start_background(bundle, **options)` to run one on a thread of the current process
(tests, notebooks). The contract is protos/rwood/v1/detector.proto; options are `ServeConfig`.

This module is the wiring and the lifecycle (start, reload, drain, stop). The parts:
- `serve_config.ServeConfig`: the options, checked once;
- `model_host.ModelHost`: the serving Detector, image decoding and the dynamic batcher (how a
  Score request is decoded, batched and scored is described there);
- `servicer.DetectorServicer`: protos to and from `ModelHost` calls, errors to status codes, metrics;
- `server_security`: TLS credentials and the bearer-token interceptor;
- `server_guard.CallGuard`: calls capped before their request is read, malformed messages;
- `server_health`: grpc.health.v1 (Watch streams end on drain, capped without credentials);
- `bundle_watch`: when --watch reloads, and retries a refused bundle;
- `server_metrics.ServerMetrics`: the Prometheus metrics and their HTTP endpoint.

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
`--watch` retries a refused reload with backoff until the bundle loads (a plain `cp` writes
manifest.json before model.onnx); a load taking over `reload_timeout_s` is abandoned. The last
reload's outcome is in `rwood_last_reload_ok`. SIGTERM stops the server whatever a load is doing.

Limits on what clients can make the server hold (`ServeConfig`, SECURITY.md): HTTP/2 streams per
connection, calls in all, request bytes held, health Watch streams without a token.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from ._proto import detector_pb2_grpc as pb_grpc
from .bundle import require_bundle_dir
from .bundle_watch import BundleWatch, bundle_stamp
from .errors import BundleError, InputError
from .model_host import ModelHost, in_daemon_thread
from .serve_config import ServeConfig
from .server_guard import CallGuard
from .server_health import SERVICE_NAME, HealthServicer, configure_health, set_health
from .server_metrics import ServerMetrics
from .server_security import BearerTokenInterceptor, read_token, server_credentials
from .servicer import DetectorServicer

__all__ = ["ServeConfig", "serve", "start_background", "BackgroundServer", "DetectorServer",
           "SERVICE_NAME", "bundle_stamp"]

log = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


class DetectorServer:
    """One server: gRPC (Detector, health, reflection), metrics HTTP, the model host.

    `await start()` binds, reports NOT_SERVING, loads the model, then reports SERVING;
    `await reload()` hot-swaps the bundle; `await stop()` drains (NOT_SERVING, refuse new,
    finish in-flight within grace_s). Use on one event loop.
    `worker`: this server is worker N of `rwood-serve --workers` (`detector_server.worker`): it
    binds with SO_REUSEPORT, names itself in each response's `rwood-worker` trailing metadata,
    leaves reload counting to its supervisor and reloads in two phases (`prepare_reload`, then
    `commit_reload` or `abort_reload`).
    """

    def __init__(self, bundle: str | os.PathLike, config: ServeConfig, worker: int | None = None):
        self.bundle_path = Path(bundle)
        self.config = config
        self.worker = worker
        self.metrics = ServerMetrics(reloads=worker is None)
        self._pending: Any = None           # a prepared Detector waiting for commit_reload
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._host: ModelHost | None = None
        self._health: HealthServicer | None = None
        self._watch_task: asyncio.Task | None = None
        self._stopping = False
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        """Listen and load; raises InputError (options, address, metrics port) or BundleError
        (bundle), and then leaves nothing listening or running."""
        cfg = self.config
        require_bundle_dir(self.bundle_path)
        creds = server_credentials(cfg)
        auth = (BearerTokenInterceptor(read_token(cfg.auth_token_file), self.metrics)
                if cfg.auth_token_file else None)
        if cfg.metrics_port is not None:    # before gRPC: a busy metrics port leaves nothing bound
            self.metrics_port = self._start_metrics()
        loaded = bundle_stamp(self.bundle_path)  # before loading: a change during it is seen
        try:
            await self._start_grpc(creds, auth)
            await self._load_first()
        except BaseException:
            await self.stop(grace=0)        # closes what was started: gRPC port, host, /metrics
            raise
        await set_health(self._health, True)
        self.metrics.serving.set(1)
        if cfg.watch:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(loaded))

    async def _load_first(self) -> None:
        try:
            await self._host.load()
        except TimeoutError as e:       # a reload's timeout is logged; a start's is the error
            raise BundleError(str(e), path=str(self.bundle_path)) from None

    def _start_metrics(self) -> int:
        """Serve /metrics on the configured host and port; InputError when it cannot listen there."""
        host, port = self.config.metrics_host, self.config.metrics_port
        try:
            return self.metrics.start_http(host, port)
        except (OSError, OverflowError) as e:   # busy, not an address here, port out of range
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise InputError(f"cannot listen on {host}:{port}: {reason}",
                             field="metrics_port") from None

    async def _start_grpc(self, creds: grpc.ServerCredentials | None,
                          auth: BearerTokenInterceptor | None) -> None:
        """Build the gRPC server (Detector, health NOT_SERVING, reflection) and the model host,
        bind the address and start answering (UNAVAILABLE until the model is loaded)."""
        cfg = self.config
        host = self._host = ModelHost(self.bundle_path, cfg, self.metrics)
        guard = CallGuard(cfg.max_calls, lambda: host.full, self.metrics)
        server = self._server = grpc.aio.server(
            interceptors=[auth, guard] if auth is not None else [guard],
            options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                     ("grpc.max_send_message_length", cfg.max_message_bytes),
                     ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
                     # Count streams open on the wire: a client's next call right after an answer
                     # waits its turn instead of being refused (handlers: --max-calls).
                     ("grpc.http.overload_protection", 0),
                     # Fixed 64 KiB HTTP/2 windows: with BDP probing gRPC grows each stream's
                     # window to MBs of client data buffered unread (1.1 GB for 64 streams).
                     ("grpc.http2.bdp_probe", 0),
                     ("grpc.so_reuseport", int(self.worker is not None))])
        pb_grpc.add_DetectorServicer_to_server(DetectorServicer(host, cfg, self.metrics,
                                                                worker=self.worker), server)
        self._health = configure_health(server, cfg.max_health_watches,
                                        auth.authorized if auth is not None else lambda md: False,
                                        self.metrics)
        await set_health(self._health, False)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = self._bind(server, creds)
        await server.start()

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
        """Load the bundle again; True when the new model serves, False when it was refused or
        took longer than reload_timeout_s (the old model keeps serving either way)."""
        if self._host is None or self._stopping:
            return False
        try:
            await self._host.load()
        except Exception as e:  # noqa: BLE001 - any failure: keep serving the old model
            old = self._host.detector
            outcome = "timeout" if isinstance(e, TimeoutError) else "refused"
            log.error("reload of %s %s, still serving %s: %s", self.bundle_path,
                      "timed out" if outcome == "timeout" else "refused",
                      old.model_version if old else "nothing", e)
            self.metrics.record_reload(outcome)     # a worker's: none (its supervisor counts)
            return False
        self.metrics.record_reload("ok")
        return True

    @property
    def model_version(self) -> str | None:
        """The version of the model being served (None before the first load)."""
        det = self._host.detector if self._host is not None else None
        return None if det is None else det.model_version

    async def prepare_reload(self) -> str:
        """Load and warm up the bundle again without serving it yet; returns its model version.
        Raises (BundleError, ...) when it cannot be loaded. Follow with commit or abort."""
        if self._host is None or self._stopping:
            raise BundleError("the server is not running", path=str(self.bundle_path))
        self._pending = await self._host.build()
        return self._pending.model_version

    def commit_reload(self) -> str | None:
        """Serve the prepared model; returns the version now served."""
        if self._pending is not None and self._host is not None:
            self._host.swap(self._pending)
        self._pending = None
        return self.model_version

    def abort_reload(self) -> None:
        """Drop the prepared model; the current one keeps serving."""
        self._pending = None

    async def _watch(self, loaded: tuple[int, ...] | None) -> None:
        """Reload when manifest.json differs from `loaded` (the stamp of the bundle served);
        retry a refused bundle with backoff (`BundleWatch`)."""
        watch = BundleWatch(self.config.watch_interval_s, loaded)
        while True:
            await asyncio.sleep(watch.interval_s)
            stamp = await self._stamp()
            if watch.due(stamp):
                log.info("bundle %s changed, reloading", self.bundle_path)
                retry_in = watch.done(stamp, await self.reload())
                if retry_in is not None:
                    log.info("--watch retries %s in %.1f s", self.bundle_path, retry_in)

    async def _stamp(self) -> tuple[int, ...] | None:
        """`bundle_stamp` on a thread, so that a hung file system cannot stall the event loop;
        None (no change seen) when it does not answer within watch_interval_s (at least 1 s)."""
        try:
            return await asyncio.wait_for(in_daemon_thread(lambda: bundle_stamp(self.bundle_path)),
                                          max(self.config.watch_interval_s, 1.0))
        except asyncio.TimeoutError:
            log.warning("--watch: stat of %s does not answer", self.bundle_path)
            return None

    async def _answer_unavailable(self, grace: float) -> float:
        """Wait (listener open, new calls answered UNAVAILABLE) for drain_delay_s, then until no
        accepted request is in progress, then drain_delay_s again if there was one; all within
        `grace`. Returns the seconds waited."""
        loop = asyncio.get_running_loop()
        start, delay = loop.time(), min(self.config.drain_delay_s, grace)
        await asyncio.sleep(delay)
        if self._host is None or not self._host.busy:
            return loop.time() - start
        while self._host.busy and loop.time() - start < grace - delay:
            await asyncio.sleep(0.02)
        await asyncio.sleep(max(0.0, min(delay, grace - (loop.time() - start))))
        return min(grace, loop.time() - start)

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
            if self.port is not None:                # it was listening (not a failed start)
                log.info("draining: in-flight requests have %.1f s", grace)
            # New calls get our UNAVAILABLE (retryable) while the listener is still open: closing
            # it at once lets grpc cancel calls that were arriving at that instant (CANCELLED).
            # That lasts until the accepted requests are answered, and drain_delay after: a
            # client answered last sends its next call then, and must see UNAVAILABLE too.
            grace -= await self._answer_unavailable(grace)
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
    """Start, serve until SIGTERM/SIGINT, drain. A signal during start-up (a slow or hung bundle
    load) stops at once; nothing a load does holds the exit (it runs on a daemon thread)."""
    server = DetectorServer(bundle, config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.reload()))
    starting = asyncio.ensure_future(server.start())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("rwood-serve: stopping while loading")
        starting.cancel()                       # start() closes what it opened, then re-raises
        await asyncio.gather(starting, return_exceptions=True)
        return
    signalled.cancel()
    starting.result()                           # start-up errors propagate
    log.info("rwood-serve: serving on %s:%d%s", config.address.rpartition(":")[0], server.port,
             f", metrics on {config.metrics_host}:{server.metrics_port}" if server.metrics_port else "")
    await stop.wait()
    log.info("rwood-serve: stopping")
    await server.stop()
    log.info("rwood-serve: stopped")


def serve(address: str, bundle: str | os.PathLike, **options: Any) -> None:
    """Serve `bundle` on `address` until SIGTERM or SIGINT; SIGHUP reloads the bundle.

    `options` are `ServeConfig` fields (max_batch, max_wait_ms, tls_cert, ...); with workers > 1,
    that many processes serve the port (`detector_server.supervisor`). Must run on the main thread
    (signal handlers). Raises InputError for bad options, BundleError for a bad bundle.
    """
    config = ServeConfig(address=address, **options)
    if config.workers > 1:
        from .supervisor import serve_workers  # not at the top: it imports this module

        serve_workers(bundle, config, verbose=log.isEnabledFor(logging.DEBUG))
        return
    asyncio.run(_serve_until_signalled(bundle, config))


class BackgroundServer:
    """A `DetectorServer` running on its own event-loop thread; see `start_background`."""

    def __init__(self, bundle: str | os.PathLike, config: ServeConfig):
        if config.workers != 1:
            raise InputError("a background server is one process; run rwood-serve --workers N "
                             "for several", field="workers")
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
