"""`rwood-serve --workers N`: N server processes sharing one port, and the process that keeps them.

Use it when one Python process cannot keep the cores busy: gRPC's Python layer costs about half a
millisecond of CPU per call under the GIL, so small models served one image per call leave most of
a many-core host idle. `serve(..., workers=N)` calls `serve_workers`; each worker
(`detector_server.worker`) is a full server with its own model session and 1/N of the threads.

What the supervisor (this process, which serves no RPC itself) does:
- reserves the address (binds it with SO_REUSEPORT without listening, so port 0 becomes one port
  all workers share, and a port taken by another program fails at once), then starts the workers,
  which bind it with SO_REUSEPORT: the kernel spreads new connections over them;
- serves one /metrics for all of them: prometheus-client's multiprocess mode, every worker writing
  its values to files in one directory that `MultiProcessCollector` sums at scrape time; plus its
  own `rwood_workers`, `rwood_worker_restarts_total` and `rwood_reloads_total`;
- reloads (SIGHUP, --watch) in two phases so every worker serves the same model: all prepare the
  new bundle, then all commit, or all abort when any refused it or timed out (see `worker`);
  --watch retries a refused bundle with backoff (`bundle_watch`);
- restarts a worker that died (logged, counted, backing off when it dies again at once); a worker
  that comes back with a different bundle (replaced on disk without a reload) makes the others
  reload to it, or is stopped again if they refuse it;
- on SIGTERM/SIGINT drains every worker (each: NOT_SERVING, --drain-delay of UNAVAILABLE, then
  in-flight calls finish within --grace) and exits when they have.
Test: tests/runtime/test_server_workers.py.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from . import runtime
from .bundle_watch import BundleWatch, bundle_stamp
from .errors import BundleError, InputError
from .serve_config import ServeConfig
from .server_metrics import SupervisorMetrics
from .worker import WorkerSpec, run_worker

__all__ = ["serve_workers", "reserve_port", "RESTART_BACKOFF_S"]

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 30.0)     # first and longest wait before restarting a worker that
STABLE_S = 30.0                     # ... died within STABLE_S of its start (else at once)
REPLY_TIMEOUT_S = 600.0             # longest a worker may take to load a bundle


def reserve_port(address: str) -> tuple[socket.socket, str]:
    """Bind `address` (host:port, port 0 = any) with SO_REUSEPORT, not listening; returns the
    socket (keep it open while serving) and host:port with the port it got. InputError naming
    `address` when it cannot be bound."""
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot bind {address}: {e}", field="address") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot bind {address}: {e.strerror}", field="address") from None
    return sock, f"{host}:{sock.getsockname()[1]}"


class _Worker:
    """The supervisor's handle on one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.conn: Any = None
        self.version: str | None = None     # the model it serves, once ready
        self.inbox: list[tuple] = []
        self.started = 0.0
        self.failures = 0                   # consecutive quick deaths (for the backoff)
        self.restart_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


class Supervisor:
    """Starts, watches, reloads and stops the workers; see the module docstring."""

    def __init__(self, bundle: str | os.PathLike, config: ServeConfig, verbose: bool = False):
        self.bundle, self.config, self.verbose = str(bundle), config, verbose
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(i) for i in range(config.workers)]
        self._signals: list[int] = []
        self._sock, self.address = reserve_port(config.address)
        self.metrics: SupervisorMetrics | None = None
        total = runtime.resolve_threads(config.threads)
        self._worker_config = replace(config, address=self.address, metrics_port=None, watch=False,
                                      threads=max(1, total // config.workers), workers=1)
        self.metrics_port: int | None = None
        self._loaded_stamp: tuple[int, ...] | None = None

    # ---- workers --------------------------------------------------------------------------------
    def _spawn(self, w: _Worker) -> None:
        parent, child = self._ctx.Pipe()
        spec = WorkerSpec(w.index, self.bundle, self._worker_config, self.verbose)
        w.process = self._ctx.Process(target=run_worker, args=(spec, child),
                                      name=f"rwood-worker-{w.index}", daemon=False)
        w.process.start()
        child.close()
        w.conn, w.version, w.inbox, w.started, w.restart_at = parent, None, [], time.monotonic(), None

    def _pump(self, timeout: float) -> None:
        """Wait up to `timeout` for messages, deaths or signals; file messages in inboxes."""
        objects = [self._wake_r] + [w.conn for w in self._workers if w.conn is not None]
        objects += [w.process.sentinel for w in self._workers if w.alive]
        for obj in wait(objects, timeout):
            if obj is self._wake_r:
                self._wake_r.recv(64)
            for w in self._workers:
                if obj is w.conn:
                    try:
                        w.inbox.append(w.conn.recv())
                    except (EOFError, OSError):
                        w.conn.close()
                        w.conn = None

    def _reply(self, w: _Worker, kinds: tuple[str, ...]) -> tuple | None:
        for i, message in enumerate(w.inbox):
            if message[0] in kinds:
                return w.inbox.pop(i)
        return None

    def _await(self, workers: list[_Worker], kinds: tuple[str, ...], timeout: float
               ) -> dict[int, tuple | None]:
        """Each worker's next message of `kinds`, None for one that died or ran out of time."""
        end, got = time.monotonic() + timeout, {}
        while True:
            for w in workers:
                if w.index not in got:
                    message = self._reply(w, kinds)
                    if message is not None or (not w.alive and w.conn is None):
                        got[w.index] = message
            if len(got) == len(workers) or time.monotonic() >= end or self._stop_requested():
                return {w.index: got.get(w.index) for w in workers}
            self._pump(min(1.0, max(0.0, end - time.monotonic())))

    def _stop_requested(self) -> bool:
        return any(sig in (signal.SIGTERM, signal.SIGINT) for sig in self._signals)

    def _start_all(self) -> bool:
        """Start every worker and wait until all serve one model version; False when a stop
        signal came first. Raises InputError/BundleError (a worker's own) when one cannot start."""
        self._loaded_stamp = bundle_stamp(Path(self.bundle))    # before loading: changes are seen
        for w in self._workers:
            self._spawn(w)
        replies = self._await(self._workers, ("ready", "failed"), REPLY_TIMEOUT_S)
        if self._stop_requested():
            return False
        failed = [m for m in replies.values() if m is None or m[0] == "failed"]
        if failed:
            if failed[0] is None:
                raise BundleError("a worker died while starting (see the log)", path=self.bundle)
            raise (InputError if failed[0][1] == "InputError" else BundleError)(failed[0][2])
        for w in self._workers:
            w.version = replies[w.index][1]
        if len({w.version for w in self._workers}) > 1 and not self.reload():
            raise BundleError("the workers loaded different versions of the bundle (it changed "
                              "while they started); start again", path=self.bundle)
        return True

    def reload(self) -> bool:
        """Two-phase reload of every serving worker; True when all now serve the new model."""
        live = [w for w in self._workers if w.alive and w.version is not None and w.conn]
        for w in live:
            w.conn.send(("prepare",))
        replies = self._await(live, ("prepared", "refused"), REPLY_TIMEOUT_S)
        versions = {m[1] for m in replies.values() if m and m[0] == "prepared"}
        ok = len(versions) == 1 and all(m and m[0] == "prepared" for m in replies.values())
        for w in live:
            if w.alive and w.conn is not None:
                w.conn.send(("commit",) if ok else ("abort",))
        if not ok:
            why = next((m[1] for m in replies.values() if m and m[0] == "refused"),
                       "workers loaded different versions" if len(versions) > 1 else "a worker died")
            log.error("reload of %s refused, all %d workers still serve %s: %s", self.bundle,
                      len(live), live[0].version if live else "nothing", why)
            self.metrics.record_reload("timeout" if why.startswith("TimeoutError") else "refused")
            return False
        for w, message in self._await(live, ("committed",), 60).items():
            if message is not None:
                self._workers[w].version = message[1]
        log.info("reloaded: %d workers serve %s", len(live), versions.pop())
        self.metrics.record_reload("ok")
        return True

    def _check_workers(self) -> None:
        """Restart dead workers (after a backoff if they die right after starting); bring a
        restarted worker and the others onto one model version."""
        now = time.monotonic()
        for w in self._workers:
            if w.process is not None and not w.alive and w.restart_at is None:
                quick = now - w.started < STABLE_S
                w.failures = w.failures + 1 if quick else 0
                delay = 0.0 if not quick else min(RESTART_BACKOFF_S[1],
                                                  RESTART_BACKOFF_S[0] * 2 ** (w.failures - 1))
                log.error("worker %d (pid %d) exited with status %s; restarting it%s", w.index,
                          w.process.pid, w.process.exitcode, f" in {delay:.0f} s" if delay else "")
                self.metrics.mark_dead(w.process.pid)
                self.metrics.restarts.inc()
                if w.conn is not None:
                    w.conn.close()
                w.conn, w.version, w.restart_at = None, None, now + delay
            if w.restart_at is not None and now >= w.restart_at:
                self._spawn(w)
            if w.version is None and (m := self._reply(w, ("ready", "failed"))) is not None:
                if m[0] == "ready":
                    self._join(w, m[1])

    def _join(self, w: _Worker, version: str) -> None:
        """A restarted worker is ready with `version`: keep one version across the workers."""
        w.version = version
        served = {o.version for o in self._workers if o is not w and o.version is not None}
        if served and version not in served:
            log.warning("worker %d came back with %s while the others serve %s: reloading all",
                        w.index, version, served.pop())
            if not self.reload():
                log.error("stopping worker %d again: its bundle does not load in the others",
                          w.index)
                w.process.terminate()
        log.info("worker %d (pid %d) serving %s", w.index, w.process.pid, w.version)

    # ---- lifecycle ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (main thread only: it installs signal handlers)."""
        self._wake_r, wake_w = socket.socketpair()
        for s in (self._wake_r, wake_w):
            s.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        metrics_dir = tempfile.mkdtemp(prefix="rwood-metrics-") if own_dir else None
        grace = 0.0                             # until serving: stop at once on any failure
        try:
            self._start_metrics(metrics_dir)
            if self._start_all():
                log.info("rwood-serve: serving on %s%s; %d workers (pids %s), %d threads each",
                         self.address, f", metrics on {self.config.metrics_host}:"
                         f"{self.metrics_port}" if self.metrics_port else "", len(self._workers),
                         ", ".join(str(w.process.pid) for w in self._workers),
                         self._worker_config.threads)
                grace = self.config.grace_s
                self._loop()
        finally:
            self._stop_workers(grace)
            if grace:
                log.info("rwood-serve: stopped")
            if self.metrics is not None:
                self.metrics.stop_http()
            if own_dir:
                del os.environ["PROMETHEUS_MULTIPROC_DIR"]
                shutil.rmtree(metrics_dir, ignore_errors=True)
            self._sock.close()
            signal.set_wakeup_fd(old_fd)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._wake_r.close()
            wake_w.close()

    def _start_metrics(self, metrics_dir: str | None) -> None:
        """The workers' shared metrics directory (`metrics_dir`, or the one PROMETHEUS_MULTIPROC_DIR
        already names, emptied), the supervisor's own metrics, and /metrics when asked for."""
        if metrics_dir is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir     # the workers inherit it
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        for stale in Path(metrics_dir).glob("*.db"):                 # a previous run's values
            stale.unlink()
        self.metrics = SupervisorMetrics(len(self._workers), metrics_dir)
        if self.config.metrics_port is not None:
            host, port = self.config.metrics_host, self.config.metrics_port
            try:
                self.metrics_port = self.metrics.start_http(host, port)
            except (OSError, OverflowError) as e:   # busy, not an address here, out of range
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise InputError(f"cannot listen on {host}:{port}: {reason}",
                                 field="metrics_port") from None

    def _loop(self) -> None:
        watch = BundleWatch(self.config.watch_interval_s, self._loaded_stamp)
        next_watch = time.monotonic()
        while True:
            while self._signals:
                sig = self._signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("rwood-serve: stopping (%s)", signal.Signals(sig).name)
                    return
                log.info("SIGHUP: reloading %s in every worker", self.bundle)
                self.reload()
            self._check_workers()
            if self.config.watch and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + self.config.watch_interval_s
                stamp = bundle_stamp(Path(self.bundle))
                if watch.due(stamp):
                    log.info("bundle %s changed, reloading", self.bundle)
                    retry_in = watch.done(stamp, self.reload())
                    if retry_in is not None:
                        log.info("--watch retries %s in %.1f s", self.bundle, retry_in)
            self._pump(0.5)

    def _stop_workers(self, grace: float) -> None:
        """SIGTERM every worker (each drains), wait for them, SIGKILL any left after grace + 5 s."""
        live = [w for w in self._workers if w.alive]
        if not live:
            return
        for w in live:
            w.process.terminate()
        end = time.monotonic() + grace + 5.0
        for w in live:
            w.process.join(max(0.0, end - time.monotonic()))
            if w.process.exitcode is None:
                log.error("worker %d did not stop within %.0f s: killing it", w.index, grace + 5)
                w.process.kill()
                w.process.join(5)


def serve_workers(bundle: str | os.PathLike, config: ServeConfig, verbose: bool = False) -> None:
    """Serve `bundle` with `config.workers` processes until SIGTERM/SIGINT (main thread only).
    Raises InputError (address, options) or BundleError (bundle) when they cannot start."""
    if not (Path(bundle) / "manifest.json").is_file():
        raise BundleError("not a bundle directory (no manifest.json)", path=str(bundle))
    Supervisor(bundle, config, verbose).run()
