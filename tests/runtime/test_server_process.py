"""`rwood-serve` as a process: --help, a bad bundle exits 2, SIGHUP reloads (or refuses a broken
bundle), SIGTERM under load drains (health NOT_SERVING first, no accepted request lost)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from real_images import png_bytes
from test_server import free_port, port_is_free
from test_server_reload import corrupt, republish

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "detector_server.serve_cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class ServerProcess:
    """`rwood-serve BUNDLE --address 127.0.0.1:0 ...` with its log collected on a thread."""

    def __init__(self, bundle: Path, *args: str):
        self.proc = subprocess.Popen(
            CLI + [str(bundle), "--address", "127.0.0.1:0", "--device", "cpu", "--threads", "1",
                   *args], stderr=subprocess.PIPE, text=True, env=_env())
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        m = self.wait_for(r"serving on [^:\s]+:(\d+)(?:, metrics on [^:\s]+:(\d+))?", 60)
        self.port = int(m.group(1))
        self.metrics_port = int(m.group(2)) if m.group(2) else None
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}; log:\n{''.join(self.lines)[-3000:]}")

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def test_help_lists_the_flags():
    p = subprocess.run(CLI + ["--help"], capture_output=True, text=True, env=_env(), timeout=60)
    assert p.returncode == 0
    for flag in ("--address", "--max-batch", "--max-wait-ms", "--max-images", "--max-message-mb",
                 "--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file",
                 "--metrics-port", "--watch", "--grace"):
        assert flag in p.stdout


@pytest.mark.parametrize("args, match", [([], "manifest"), (["--max-batch", "0"], "--max-batch")])
def test_bad_bundle_or_option_exits_2_with_one_line(tmp_path, args, match):
    p = subprocess.run(CLI + [str(tmp_path), *args], capture_output=True, text=True, env=_env(),
                       timeout=60)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0] and "Traceback" not in p.stderr


def test_metrics_port_in_use_exits_2_with_one_line_and_leaves_nothing_listening(tiny_bundle):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        p = subprocess.run(CLI + [str(tiny_bundle), "--address", f"127.0.0.1:{port}", "--device",
                                  "cpu", "--threads", "1", "--metrics-port",
                                  str(busy.getsockname()[1])],
                           capture_output=True, text=True, env=_env(), timeout=60)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--metrics-port" in errors[0] and "Traceback" not in p.stderr
    assert port_is_free(port)


def test_sighup_refuses_a_broken_bundle_then_loads_a_good_one(tiny_bundle, bundle, id_images):
    request = pb.ScoreRequest(images=[pb.Image(id="0", data=png_bytes(id_images[0]))])
    srv = ServerProcess(bundle)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.DetectorStub(ch)
            original = stub.Score(request, timeout=30).model_version
            corrupt(bundle)
            srv.proc.send_signal(signal.SIGHUP)
            srv.wait_for(r"reload of .* refused, still serving " + re.escape(original), 30)
            assert stub.Score(request, timeout=30).model_version == original
            after = republish(tiny_bundle, bundle, "after-hup")
            srv.proc.send_signal(signal.SIGHUP)
            srv.wait_for(r"serving model " + re.escape(after), 30)
            assert stub.Score(request, timeout=30).model_version == after
    finally:
        srv.close()


def test_sigterm_under_load_drains_without_losing_accepted_requests(tiny_bundle, id_images,
                                                                     photo_jpeg_files):
    """One big request is in flight (seen in the server's metrics) and 4 clients keep sending when
    SIGTERM arrives: health goes NOT_SERVING, every accepted request is answered in full, the
    later ones are refused with UNAVAILABLE, and the process exits 0."""
    jpegs = [p.read_bytes() for p in photo_jpeg_files[:100]]
    pngs = [png_bytes(a) for a in id_images[:8]]
    srv = ServerProcess(tiny_bundle, "--metrics-port", "0", "--grace", "30", "--decode-threads", "1")
    statuses: list[int] = []
    outcomes: list[tuple[grpc.StatusCode, int]] = []
    stop = threading.Event()

    def watch_health() -> None:
        with grpc.insecure_channel(srv.target) as ch:
            try:
                for r in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(),
                                                              timeout=60):
                    statuses.append(r.status)
            except grpc.RpcError:
                pass   # the stream ends when the server stops

    def client() -> None:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.DetectorStub(ch)
            while not stop.is_set():
                req = pb.ScoreRequest(images=[pb.Image(id=str(i), data=d) for i, d in enumerate(pngs)])
                try:
                    r = stub.Score(req, timeout=60)
                    outcomes.append((grpc.StatusCode.OK, sum(x.error == "" for x in r.results)))
                except grpc.RpcError as e:
                    outcomes.append((e.code(), 0))
                    return

    try:
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        with grpc.insecure_channel(srv.target) as ch:
            big = pb_grpc.DetectorStub(ch).Score.future(
                pb.ScoreRequest(images=[pb.Image(id=str(i), data=d) for i, d in enumerate(jpegs)]),
                timeout=60)
            end = time.monotonic() + 30
            while srv.metric("rwood_inflight_requests") < 1:   # the big request is accepted
                assert time.monotonic() < end and not big.done()
                time.sleep(0.01)
            clients = [threading.Thread(target=client) for _ in range(4)]
            for t in clients:
                t.start()
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGTERM)
            big_response = big.result(60)
        assert srv.proc.wait(60) == 0
        stop.set()
        for t in clients + [watcher]:
            t.join(60)
    finally:
        stop.set()
        srv.close()
    assert len(big_response.results) == len(jpegs)
    assert all(r.error == "" for r in big_response.results)
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    codes = {code for code, _ in outcomes}
    assert codes == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes   # refused, not lost
    assert all(n == len(pngs) for code, n in outcomes if code == grpc.StatusCode.OK)
    assert "stopped" in "".join(srv.lines)
