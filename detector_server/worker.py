"""One worker process of `rwood-serve --workers N`: a full `DetectorServer` on the shared port.

Started by `detector_server.supervisor` (multiprocessing "spawn"), never by hand. The worker binds
the address the supervisor reserved with SO_REUSEPORT (the kernel spreads new connections over
the workers), loads its own Detector with its share of the threads, and talks to the supervisor
over one pipe:

    worker -> supervisor   ("ready", model_version) | ("failed", error class, message)
                           ("prepared", model_version) | ("refused", message) | ("committed", version)
    supervisor -> worker   ("prepare",) | ("commit",) | ("abort",)

A reload is two-phase so that all workers serve the same model: every worker builds and warms the
new Detector ("prepare"), and only when all of them have (and loaded the same version) does the
supervisor tell them to swap it in ("commit"); otherwise each drops it ("abort") and the old model
keeps serving everywhere. SIGTERM/SIGINT drain the worker (as a single-process server drains);
SIGHUP is ignored (the supervisor coordinates reloads); a closed pipe (the supervisor is gone)
drains it too, so no worker outlives its supervisor.
Test: tests/runtime/test_server_workers.py.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .cli_common import setup_logging
from .errors import ReweightOODError
from .serve_config import ServeConfig

__all__ = ["WorkerSpec", "run_worker"]

log = logging.getLogger(__name__)

METRICS_REFRESH_S = 1.0     # how often function-backed gauges reach the shared metrics files


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker serves: `config` has the reserved address, its thread share, no metrics
    port and no --watch (the supervisor does both)."""

    index: int
    bundle: str
    config: ServeConfig
    verbose: bool = False


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point: serve until told to stop; exit status 2 when start-up fails."""
    setup_logging(spec.verbose, tag=f"worker {spec.index}")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(_serve(spec, conn))
    except ReweightOODError as e:
        log.error("%s", e)
        _send(conn, ("failed", type(e).__name__, str(e)))
        sys.exit(2)
    except KeyboardInterrupt:
        pass


def _send(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except (OSError, EOFError):     # the supervisor is gone; the closed pipe stops us anyway
        pass


async def _serve(spec: WorkerSpec, conn: Connection) -> None:
    from .server import DetectorServer  # after setup_logging: its imports log nothing first

    server = DetectorServer(spec.bundle, spec.config, worker=spec.index)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    _send(conn, ("ready", server.model_version))
    commands: asyncio.Queue = asyncio.Queue()

    def readable() -> None:
        try:
            commands.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            log.warning("the supervisor is gone: draining")
            stop.set()

    loop.add_reader(conn.fileno(), readable)
    tasks = [asyncio.ensure_future(_obey(server, commands, conn)),
             asyncio.ensure_future(_refresh_metrics(server))]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await server.stop()
        log.info("stopped")


async def _obey(server: Any, commands: asyncio.Queue, conn: Connection) -> None:
    """Carry out the supervisor's reload commands, one at a time, answering each."""
    while True:
        (command,) = await commands.get()
        if command == "prepare":
            try:
                version = await server.prepare_reload()
            except Exception as e:  # noqa: BLE001 - any failure refuses the reload
                _send(conn, ("refused", f"{type(e).__name__}: {e}"))
            else:
                _send(conn, ("prepared", version))
        elif command == "commit":
            _send(conn, ("committed", server.commit_reload()))
        elif command == "abort":
            server.abort_reload()
        else:
            log.error("unknown command from the supervisor: %r", command)


async def _refresh_metrics(server: Any) -> None:
    while True:
        server.metrics.refresh()
        await asyncio.sleep(METRICS_REFRESH_S)
