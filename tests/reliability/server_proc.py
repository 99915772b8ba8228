"""`rwood-serve` as a child process, for fault tests and the bench scripts (signals need a process).

Use `ServerProcess(bundle, *flags)` as a context manager: it starts the real CLI on a free loopback
port, waits until health says SERVING, and exposes the process's RSS, threads and open file
descriptors (from /proc) and its log. Leaving the block stops it (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hostile_corpus import PYTHON, free_port, subprocess_env

__all__ = ["ServerProcess", "health_status", "proc_stats"]


def health_status(target: str, timeout: float = 2.0) -> int | None:
    """The overall health status of `target` (health_pb2 enum), None when it does not answer."""
    try:
        with grpc.insecure_channel(target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=timeout).status
    except grpc.RpcError:
        return None


def proc_stats(pid: int) -> dict[str, int]:
    """rss_kb, threads and fds of a live process, read from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    return {"rss_kb": fields["VmRSS"], "threads": fields["Threads"],
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class ServerProcess:
    """A `python -m detector_server.serve_cli BUNDLE` child on 127.0.0.1:<free port>, on the CPU
    with `threads` ONNX Runtime/FAISS threads (None: the server's default)."""

    def __init__(self, bundle: str | os.PathLike, *flags: str, log_path: str | os.PathLike,
                 threads: int | None = 1, env: dict[str, str] | None = None):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        cmd = [PYTHON, "-m", "detector_server.serve_cli", str(bundle), "--address", self.target,
               "--device", "cpu", *(["--threads", str(threads)] if threads else []), *flags]
        self.proc = subprocess.Popen(cmd, env=env or subprocess_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_serving(self, timeout: float = 120.0) -> None:
        t_end = time.monotonic() + timeout
        while health_status(self.target, 1.0) != health_pb2.HealthCheckResponse.SERVING:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rwood-serve exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > t_end:
                raise TimeoutError(f"rwood-serve not SERVING after {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def wait_log(self, text: str, timeout: float = 60.0, start: int = 0) -> str:
        """Wait until `text` appears in the log after byte `start`; returns that part of the log."""
        t_end = time.monotonic() + timeout
        while text not in (tail := self.log()[start:]):
            if time.monotonic() > t_end:
                raise TimeoutError(f"{text!r} not logged in {timeout} s:\n{tail[-3000:]}")
            time.sleep(0.05)
        return tail

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, int]:
        return proc_stats(self.pid)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        try:
            self.wait_serving()
        except BaseException:
            self.stop(5)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
