"""Clients that attack a running rwood-serve, and probes that watch it: shared by
test_server_limits.py (scaled down) and bench/attacks.py (full scale).

- `HealthProbe(target)`: a health Check every 20 ms on its own channel; `.stop()` gives the worst
  latency seen.
- `RssPeak(pid)`: samples a process's RSS every 50 ms; `.stop()` gives the peak in kB.
- `flood_streams(target, request, streams, seconds, read)`: that many ScoreStream calls on one
  channel, each writing `request` as fast as it can, reading the answers or not.
"""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_proc import proc_stats

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc

__all__ = ["HealthProbe", "RssPeak", "flood_streams", "score_request"]


def score_request(*datas: bytes) -> pb.ScoreRequest:
    return pb.ScoreRequest(images=[pb.Image(id=str(i), data=d) for i, d in enumerate(datas)])


class _Sampler:
    def __init__(self, period_s: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period_s,), daemon=True)
        self._thread.start()

    def _loop(self, period_s: float) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(period_s)

    def sample(self) -> None:
        raise NotImplementedError

    def _join(self) -> None:
        self._stop.set()
        self._thread.join(60)


class HealthProbe(_Sampler):
    """Health Check every 20 ms on its own channel; records each call's latency (seconds)."""

    def __init__(self, target: str):
        self.latencies: list[float] = []
        self._channel = grpc.insecure_channel(target)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        super().__init__(0.02)

    def sample(self) -> None:
        t0 = time.monotonic()
        self._stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
        self.latencies.append(time.monotonic() - t0)

    def stop(self) -> float:
        """Stop; the worst latency seen (seconds)."""
        self._join()
        self._channel.close()
        return max(self.latencies)


class RssPeak(_Sampler):
    """The peak RSS (kB) of process `pid`, sampled every 50 ms."""

    def __init__(self, pid: int):
        self._pid, self.peak_kb = pid, 0
        super().__init__(0.05)

    def sample(self) -> None:
        self.peak_kb = max(self.peak_kb, proc_stats(self._pid)["rss_kb"])

    def stop(self) -> int:
        self._join()
        return self.peak_kb


async def _flood(target: str, request: pb.ScoreRequest, streams: int, seconds: float,
                 read: bool) -> dict[str, int]:
    counts = {"written": 0, "answered": 0, "failed": 0}
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DetectorStub(channel)

        async def requests():
            while time.monotonic() < stop_at:
                counts["written"] += 1
                yield request

        async def one() -> None:
            call = stub.ScoreStream(requests())
            try:
                if read:
                    async for response in call:
                        counts["answered" if response.error_code == 0 else "failed"] += 1
                else:
                    await asyncio.sleep(stop_at - time.monotonic())
            except grpc.RpcError:
                counts["failed"] += 1
            finally:
                call.cancel()

        await asyncio.gather(*[one() for _ in range(streams)])
    return counts


def flood_streams(target: str, request: pb.ScoreRequest, streams: int, seconds: float,
                  read: bool) -> dict[str, int]:
    """`streams` ScoreStream calls on one channel, each writing `request` as fast as it can for
    `seconds`, reading the answers or not. Returns counts: requests written, answered OK, failed
    (answers with an error code, and calls that ended in an error)."""
    return asyncio.run(_flood(target, request, streams, seconds, read))
