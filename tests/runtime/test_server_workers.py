"""`rwood-serve --workers 2` as a process: both workers score on one port and answer GetInfo alike,
health and reflection work, one /metrics sums them, SIGHUP reloads every worker or none, a killed
worker is restarted while the other keeps serving, SIGTERM under load loses no accepted request.

Which worker answered is read from the `rwood-worker` trailing metadata; new connections land on
either worker (the kernel spreads them over the SO_REUSEPORT listeners by their ports).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from real_images import png_bytes
from test_server_process import CLI, ServerProcess, _env
from test_server_reload import corrupt, republish

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc
from detector_server.errors import InputError
from detector_server.supervisor import reserve_port

pytestmark = pytest.mark.timeout(240)


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


@pytest.fixture(scope="module")
def request_(id_images: np.ndarray) -> pb.ScoreRequest:
    return pb.ScoreRequest(images=[pb.Image(id=str(i), data=png_bytes(a))
                                   for i, a in enumerate(id_images[:3])])


# A channel of its own connection: grpc otherwise shares one connection among a process's
# channels to the same target, and a connection stays with one worker.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def call(target: str, method: str, request) -> tuple[object, str]:
    """One call on a new connection: (response, the index of the worker that answered)."""
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.DetectorStub(channel)
        response, rpc = getattr(stub, method).with_call(request, timeout=30)
    return response, dict(rpc.trailing_metadata())["rwood-worker"]


def from_each_worker(target: str, method: str, request, workers: int = 2) -> dict[str, object]:
    """{worker index: its response}, calling on new channels until every worker has answered."""
    got: dict[str, object] = {}
    for _ in range(200):
        response, worker = call(target, method, request)
        got.setdefault(worker, response)
        if len(got) == workers:
            return got
    raise AssertionError(f"only workers {sorted(got)} answered 200 calls")


def worker_pids(srv: ServerProcess) -> list[int]:
    return [int(p) for p in srv.wait_for(r"workers \(pids ([\d, ]+)\)", 5).group(1).split(", ")]


def test_two_workers_score_alike_and_share_health_reflection_and_metrics(bundle, request_):
    srv = ServerProcess(bundle, "--workers", "2", "--metrics-port", "0")
    try:
        infos = from_each_worker(srv.target, "GetInfo", pb.GetInfoRequest())
        assert infos["0"] == infos["1"] and infos["0"].model_version
        scores = from_each_worker(srv.target, "Score", request_)
        assert [r.score for r in scores["0"].results] == [r.score for r in scores["1"].results]
        with grpc.insecure_channel(srv.target) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="rwood.v1.Detector"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reply = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert "rwood.v1.Detector" in {s.name for s in reply.list_services_response.service}
        calls = srv.metric('rwood_requests_total{code="OK",method="Score"}')
        assert calls >= 2 and calls == srv.metric('rwood_request_latency_seconds_count{method="Score"}')
        assert srv.metric("rwood_workers") == 2 and srv.metric("rwood_serving") == 2
        assert srv.metric("rwood_images_total") == 3 * calls
        assert len(worker_pids(srv)) == 2
    finally:
        srv.close()


def test_sighup_reloads_every_worker_or_none(tiny_bundle, bundle, request_):
    srv = ServerProcess(bundle, "--workers", "2", "--metrics-port", "0")
    try:
        original = call(srv.target, "GetInfo", pb.GetInfoRequest())[0].model_version
        corrupt(bundle)
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(r"reload of .* refused, all 2 workers still serve " + re.escape(original), 60)
        assert {i.model_version for i in from_each_worker(
            srv.target, "GetInfo", pb.GetInfoRequest()).values()} == {original}
        after = republish(tiny_bundle, bundle, "after-hup")
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(r"reloaded: 2 workers serve " + re.escape(after), 60)
        answers = from_each_worker(srv.target, "Score", request_)
        assert {r.model_version for r in answers.values()} == {after}
        assert srv.metric('rwood_reloads_total{outcome="ok"}') == 1      # one per reload, not per worker
        assert srv.metric('rwood_reloads_total{outcome="refused"}') == 1
        assert srv.metric(f'rwood_model_info{{model_version="{after}"}}') == 1
        assert srv.metric(f'rwood_model_info{{model_version="{original}"}}') == 0
    finally:
        srv.close()


def test_a_killed_worker_is_restarted_while_the_other_serves(bundle, request_):
    srv = ServerProcess(bundle, "--workers", "2", "--metrics-port", "0")
    try:
        victim = worker_pids(srv)[0]
        os.kill(victim, signal.SIGKILL)
        srv.wait_for(rf"worker 0 \(pid {victim}\) exited with status -9; restarting", 30)
        answered = {call(srv.target, "Score", request_)[1] for _ in range(10)}
        assert answered <= {"0", "1"} and answered    # the survivor serves during the restart
        m = srv.wait_for(r"worker 0 \(pid (\d+)\) serving", 120)
        assert int(m.group(1)) != victim
        assert set(from_each_worker(srv.target, "Score", request_)) == {"0", "1"}
        assert srv.metric("rwood_worker_restarts_total") == 1
        assert srv.metric("rwood_serving") == 2
    finally:
        srv.close()


def test_sigterm_under_load_drains_every_worker_without_losing_accepted_requests(bundle, request_):
    srv = ServerProcess(bundle, "--workers", "2", "--grace", "20", "--drain-delay", "0.5")
    pids = worker_pids(srv)
    outcomes: list[grpc.StatusCode] = []
    workers_seen: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                response, worker = call(srv.target, "Score", request_)
                assert len(response.results) == 3 and all(r.error == "" for r in response.results)
                outcomes.append(grpc.StatusCode.OK)
                workers_seen.add(worker)
            except grpc.RpcError as e:
                outcomes.append(e.code())
                return

    clients = [threading.Thread(target=client) for _ in range(6)]
    try:
        for t in clients:
            t.start()
        end = time.monotonic() + 30
        while workers_seen != {"0", "1"} and time.monotonic() < end:
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
    finally:
        stop.set()
        for t in clients:
            t.join(60)
        srv.close()
    assert workers_seen == {"0", "1"}
    assert set(outcomes) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
    assert "rwood-serve: stopped" in "".join(srv.lines)


def test_a_bundle_that_does_not_load_stops_all_workers_with_one_error(bundle):
    corrupt(bundle)
    p = subprocess.run(CLI + [str(bundle), "--address", "127.0.0.1:0", "--workers", "2",
                              "--device", "cpu", "--threads", "1"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SHA-256 differs" in errors[0] and "Traceback" not in p.stderr


def test_reserve_port_shares_with_reuseport_and_refuses_a_taken_port():
    sock, address = reserve_port("127.0.0.1:0")
    try:
        port = int(address.rpartition(":")[2])
        assert port > 0 and address == f"127.0.0.1:{port}"
        again, _ = reserve_port(address)           # what each worker's SO_REUSEPORT bind does
        again.close()
    finally:
        sock.close()
    with socket.socket() as taken:                 # a listener without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(InputError, match="field 'address'.*cannot bind"):
            reserve_port(f"127.0.0.1:{taken.getsockname()[1]}")
