"""What a client can make rwood-serve do, scaled down from the attacks of the hardening report:
the event loop is never blocked by decoding, memory stays bounded under a flood of streams that
write and never read, calls are capped before their request is read, responses never exceed the
message limit, and malformed messages get INVALID_ARGUMENT with one log line per cause.

SECURITY.md lists these limits with the figures measured at full scale.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.request

import grpc
import pytest
from attack_clients import HealthProbe, RssPeak, flood_streams, score_request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hostile_corpus import encode, free_port, jpeg_padded, raw_jpeg_files
from PIL import Image
from server_proc import ServerProcess

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc
from detector_server.server import start_background

pytestmark = pytest.mark.timeout(300)
OPTS = dict(device="cpu", threads=1)


def _gauge(gauge) -> float:
    return gauge.collect()[0].samples[0].value


# ---------------------------------------------------------------------------------------------
# 1. Nothing that depends on a request's bytes runs on the event loop
# ---------------------------------------------------------------------------------------------
def test_health_answers_while_an_image_takes_long_to_decode(tiny_bundle, monkeypatch):
    """A decode that takes 2 s (here a sleeping decoder) must not hold the event loop: health
    and other calls answer meanwhile. Small requests (a 32x32 PNG) used to be decoded on it."""
    from detector_server.detector import Detector

    real = Detector.prepare
    monkeypatch.setattr(Detector, "prepare",
                        lambda self, item: time.sleep(2.0) or real(self, item))
    png = encode(Image.new("RGB", (32, 32), (10, 200, 30)), "PNG")
    with start_background(tiny_bundle, **OPTS) as srv, grpc.insecure_channel(srv.target) as ch:
        slow = pb_grpc.DetectorStub(ch).Score.future(score_request(png), timeout=30)
        time.sleep(0.2)
        probe = HealthProbe(srv.target)
        time.sleep(1.0)
        info = pb_grpc.DetectorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=0.5)
        worst = probe.stop()
        assert slow.result().results[0].error == ""
    assert info.model_version and worst < 0.5, f"health took {worst:.2f} s"


def test_a_crafted_jpeg_neither_stalls_the_server_nor_grows_it(tiny_bundle, tmp_path):
    """A 1.2 MB JPEG of 300,000 empty APP1 markers (the 46 MB one of the report at 1/40 scale)
    stalled every call for 1.5-3 s; now it is refused from its markers in milliseconds."""
    data = jpeg_padded(300_000)
    with ServerProcess(tiny_bundle, log_path=tmp_path / "serve.log") as srv:
        rss0 = srv.stats()["rss_kb"]
        probe = HealthProbe(srv.target)
        time.sleep(0.3)
        with grpc.insecure_channel(srv.target) as ch:
            t0 = time.monotonic()
            result = pb_grpc.DetectorStub(ch).Score(score_request(data), timeout=60).results[0]
            elapsed = time.monotonic() - t0
        time.sleep(0.3)
        worst = probe.stop()
        grown_mb = (srv.stats()["rss_kb"] - rss0) / 1024
    assert "work limit" in result.error and elapsed < 1.0
    assert worst < 1.0, f"health took {worst:.2f} s"
    assert grown_mb < 50


# ---------------------------------------------------------------------------------------------
# 2. Memory under a flood of streams; call caps
# ---------------------------------------------------------------------------------------------
def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


@pytest.mark.parametrize("read", [True, False], ids=["reading", "not_reading"])
def test_a_flood_of_streams_holds_bounded_memory(tiny_bundle, tmp_path, read):
    """40 streams on one connection writing 140 KB requests for 3 s (the report: 200 streams for
    11 s took the server to 3 GB). Before: +470 to +580 MB; now the server holds at most
    --max-inflight-mb of requests and stops reading the streams meanwhile."""
    request = score_request(*raw_jpeg_files(6)[2:])          # 4 photos, 130 KB
    metrics_port = free_port()
    with ServerProcess(tiny_bundle, "--max-inflight-mb", "16", "--metrics-port",
                       str(metrics_port), log_path=tmp_path / "serve.log") as srv:
        rss0, rss = srv.stats()["rss_kb"], RssPeak(srv.pid)
        counts = flood_streams(srv.target, request, streams=40, seconds=3.0, read=read)
        peak_kb = rss.stop()
        t_end = time.monotonic() + 30
        while _metric(metrics_port, "rwood_inflight_bytes") or _metric(metrics_port,
                                                                      "rwood_calls_active"):
            assert time.monotonic() < t_end, "the streams' bytes or calls were never released"
            time.sleep(0.2)
        with grpc.insecure_channel(srv.target) as ch:
            ok = pb_grpc.DetectorStub(ch).Score(request, timeout=30)
    grown_mb = (peak_kb - rss0) / 1024
    assert grown_mb < 150, f"RSS grew {grown_mb:.0f} MB ({counts})"
    assert counts["written"] > 40 and all(r.error == "" for r in ok.results)
    if read:                               # the streams wait for room: none is shed
        assert counts["answered"] > 0 and counts["failed"] == 0, counts


def test_calls_are_capped_before_their_request_is_read(tiny_bundle):
    """Beyond max_calls a call gets RESOURCE_EXHAUSTED from its method alone: a garbage body is
    not even parsed. Health checks are never capped."""
    with start_background(tiny_bundle, max_calls=2, **OPTS) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        gate = threading.Event()
        held = [stub.ScoreStream(iter(gate.wait, True), timeout=30) for _ in range(2)]
        t_end = time.monotonic() + 10
        while _gauge(srv.server.metrics.calls_active) < 2:   # both calls reached the server
            assert time.monotonic() < t_end
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/rwood.v1.Detector/Score")(b"\xff garbage", timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        gate.set()
        for call in held:
            call.cancel()
        t_end = time.monotonic() + 10
        while _gauge(srv.server.metrics.calls_active):        # the cap frees up again
            assert time.monotonic() < t_end
            time.sleep(0.05)
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).model_version


def test_streams_per_connection_are_capped(tiny_bundle):
    """HTTP/2 max concurrent streams: a client's extra calls on one connection wait their turn."""
    with start_background(tiny_bundle, max_streams_per_connection=2, **OPTS) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        stub.GetInfo(pb.GetInfoRequest(), timeout=10)        # the connection and its settings
        gate = threading.Event()
        calls = [stub.ScoreStream(iter(gate.wait, True), timeout=30) for _ in range(4)]
        time.sleep(1.0)
        active = _gauge(srv.server.metrics.calls_active)
        gate.set()
        for call in calls:
            call.cancel()
    assert active == 2


@pytest.mark.parametrize("limit", [{"max_inflight_mb": 0.01}, {"max_queue_images": 1}],
                         ids=["bytes", "images"])
def test_at_its_limit_the_server_sheds_score_unread_and_stops_reading_streams(tiny_bundle, limit,
                                                                              monkeypatch):
    """One request holds more than 10 KB (or the one image allowed): a new Score is refused
    UNAVAILABLE before its body is read (a garbage body is not parsed), and a stream's requests
    are not read until there is room, then all scored (a stream is never shed)."""
    from detector_server.detector import Detector

    release = threading.Event()
    real = Detector.prepare
    monkeypatch.setattr(Detector, "prepare", lambda self, item: release.wait(30) and real(self, item))
    jpeg = raw_jpeg_files(1)[0]
    with start_background(tiny_bundle, **limit, **OPTS) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        first = stub.Score.future(score_request(jpeg), timeout=30)
        t_end = time.monotonic() + 10
        while not srv.server._host.full:
            assert time.monotonic() < t_end
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/rwood.v1.Detector/Score")(b"\xff garbage", timeout=10)
        stream = stub.ScoreStream(iter([score_request(jpeg)] * 3), timeout=30)
        time.sleep(0.5)
        waiting = _gauge(srv.server.metrics.inflight)          # the stream was not read
        release.set()
        answers = list(stream)
        assert first.result().results[0].error == ""
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in e.value.details()
    assert waiting == 1
    assert [a.error_code for a in answers] == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# 12. A response never exceeds the message limit
# ---------------------------------------------------------------------------------------------
def test_a_response_never_exceeds_the_message_limit(tiny_bundle):
    """2000 empty images (4 KB) under a 10 KB limit: every image gets an error, 80 KB in all.
    The server answered RESOURCE_EXHAUSTED from grpc and the stream ended; now the request is
    refused up front, and the stream answers the next one."""
    limit = int(0.01 * 2**20)
    empty = pb.ScoreRequest(images=[pb.Image() for _ in range(2000)], request_id="empty")
    assert empty.ByteSize() < limit
    with start_background(tiny_bundle, max_message_mb=0.01, max_images=4096, **OPTS) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(empty, timeout=30)
        answers = list(stub.ScoreStream(iter([empty, score_request(b"", b"x")]), timeout=30))
        sizes = []
        for n in (1, 10, 30, 60):           # whatever is answered fits the limit
            request = pb.ScoreRequest(images=[pb.Image(id="i" * 40) for _ in range(n)],
                                      request_id="r" * 100)
            try:
                sizes.append(stub.Score(request, timeout=30).ByteSize())
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "message limit" in e.value.details()
    assert [a.error_code for a in answers] == [grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert answers[0].request_id == "empty" and len(answers[1].results) == 2
    assert sizes and max(sizes) <= limit


# ---------------------------------------------------------------------------------------------
# 16. Malformed messages: INVALID_ARGUMENT, one log line per cause, counted
# ---------------------------------------------------------------------------------------------
def test_malformed_messages_are_counted_and_logged_once(tiny_bundle, caplog):
    with caplog.at_level(logging.WARNING), start_background(tiny_bundle, **OPTS) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        codes = set()
        for method in ("/rwood.v1.Detector/Score", "/grpc.health.v1.Health/Check"):
            call = ch.unary_unary(method)
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as e:
                    call(b"\xff\xff\xff not a protobuf", timeout=10)
                codes.add(e.value.code())
        stream = ch.stream_stream("/rwood.v1.Detector/ScoreStream")
        with pytest.raises(grpc.RpcError) as e:
            list(stream(iter([b"\xff\xff\xff"]), timeout=10))
        codes.add(e.value.code())
        metrics = srv.server.metrics.render().decode()
        assert pb_grpc.DetectorStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).model_version
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 3, lines                   # Score, Check, ScoreStream: once each
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert 'rwood_malformed_messages_total{method="Score"} 20.0' in metrics
    assert 'rwood_malformed_messages_total{method="ScoreStream"} 1.0' in metrics
