"""rwood-serve in-process (a real gRPC server on a free loopback port): scoring equals the in-process
Detector on real images, per-item and request-level errors, deadlines, stream, info, health,
reflection, metrics, loading state, configuration errors."""
from __future__ import annotations

import asyncio
import contextlib
import io
import math
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import real_images
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from detector_server import model_host, servicer
from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc
from detector_server.detector import Detector
from detector_server.errors import BundleError, InputError
from detector_server.model_host import ModelUnavailable
from detector_server.server import DetectorServer, ServeConfig, start_background
from detector_server.server_metrics import ServerMetrics

MAX_PIXELS = 1_000_000
LIMITS = dict(device="cpu", threads=1, max_images=16, max_message_mb=1.0, max_pixels=MAX_PIXELS)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(id_images: np.ndarray, photo_jpeg_files: list[Path]) -> list[tuple[str, bytes]]:
    """12 digit PNGs, 2 grayscale 8x8 scan PNGs and 2 photo JPEGs (resized by the server)."""
    gray = real_images.digits_gray()[0][:2, :, :, 0]
    jpegs = sorted(photo_jpeg_files[:10], key=lambda p: p.stat().st_size)[:2]
    return ([(f"digit{i}", png(a)) for i, a in enumerate(id_images[:12])]
            + [(f"gray{i}", png(a)) for i, a in enumerate(gray)]
            + [(p.name, p.read_bytes()) for p in jpegs])


@pytest.fixture(scope="module")
def detector(tiny_bundle: Path) -> Detector:
    return Detector(tiny_bundle, device="cpu", threads=1, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path):
    srv = start_background(tiny_bundle, metrics_port=0, **LIMITS)
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.DetectorStub(channel)


def request(items, request_id: str = "") -> pb.ScoreRequest:
    return pb.ScoreRequest(images=[pb.Image(id=i, data=d) for i, d in items], request_id=request_id)


def assert_same(results, reference) -> None:
    assert len(results) == len(reference)
    for r, ref in zip(results, reference):
        assert r.error == ref.error == ""
        assert r.score == pytest.approx(ref.score, rel=1e-5, abs=1e-6)
        assert (r.is_ood, r.predicted_class, r.predicted_label) == \
            (ref.is_ood, ref.predicted_class, ref.predicted_label)


# ---- scoring ------------------------------------------------------------------------------------
def test_scores_equal_in_process_detector(stub, detector, images):
    response = stub.Score(request(images, "r1"), timeout=30)
    assert [r.id for r in response.results] == [i for i, _ in images]
    assert response.model_version == detector.model_version and response.request_id == "r1"
    assert_same(response.results, detector.score_images([d for _, d in images]))


def test_bad_images_get_per_item_errors_and_the_rest_is_scored(stub, detector, images):
    good = images[0][1]
    bomb = png(np.full((1000, 1001, 3), 7, np.uint8))          # 1,001,000 px > max_pixels
    items = [("good0", good), ("empty", b""), ("garbage", b"not an image at all"),
             ("truncated", good[: len(good) // 2]), ("bomb", bomb), ("good1", images[1][1])]
    results = stub.Score(request(items), timeout=30).results
    assert [r.id for r in results] == [i for i, _ in items]
    by_id = {r.id: r for r in results}
    assert "empty" in by_id["empty"].error
    assert "cannot decode" in by_id["garbage"].error
    assert by_id["truncated"].error
    assert "over the limit" in by_id["bomb"].error
    for name in ("empty", "garbage", "truncated", "bomb"):
        r = by_id[name]
        assert math.isnan(r.score) and r.predicted_class == -1 and not r.is_ood
    assert_same([by_id["good0"], by_id["good1"]], detector.score_images([good, images[1][1]]))


@pytest.mark.parametrize("items, code, match", [
    ([], grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    ([("x", b"1")] * 17, grpc.StatusCode.INVALID_ARGUMENT, "limit of 16"),
    ([("big", b"\0" * (1_100_000))], grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
def test_request_level_errors(stub, items, code, match):
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(request(items), timeout=30)
    assert e.value.code() == code
    assert match in e.value.details()


def test_stream_answers_in_order_and_survives_a_bad_request(stub, detector, images):
    reqs = [request(images[:3], "a"), request([], "empty"), request(images[3:5], "b"),
            request([("x", b"")], "c")]
    responses = list(stub.ScoreStream(iter(reqs), timeout=30))
    assert [r.request_id for r in responses] == ["a", "empty", "b", "c"]
    assert responses[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no images" in responses[1].error and not responses[1].results
    assert responses[0].error_code == responses[2].error_code == 0
    assert_same(list(responses[0].results) + list(responses[2].results),
                detector.score_images([d for _, d in images[:5]]))
    assert responses[3].results[0].error


def test_get_info(stub, detector):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.model_version == detector.model_version
    assert info.threshold == pytest.approx(detector.threshold)
    assert info.k == detector.k and list(info.class_names) == list(detector.class_names)
    assert info.input_size == detector.spec.size and info.resize == detector.spec.resize
    assert info.device == "cpu" and "CPUExecutionProvider" in info.providers
    assert (info.max_images, info.max_message_bytes, info.max_pixels) == (16, 2**20, MAX_PIXELS)


# ---- health, reflection, metrics ----------------------------------------------------------------
def test_health(server):
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "rwood.v1.Detector"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_and_describes_the_contract(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="rwood.v1.Detector")]
        listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"rwood.v1.Detector", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_metrics_endpoint(server, stub, images):
    stub.Score(request(images[:4] + [("e", b""), ("g", b"garbage")]), timeout=30)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values['rwood_requests_total{code="OK",method="Score"}'] >= 1
    assert values['rwood_image_errors_total{kind="empty"}'] >= 1
    assert values['rwood_image_errors_total{kind="undecodable"}'] >= 1
    assert values["rwood_images_total"] >= 6
    assert values["rwood_batch_size_count"] >= 1 and values["rwood_batch_size_sum"] >= 4
    assert (values['rwood_ood_decisions_total{decision="ood"}']
            + values['rwood_ood_decisions_total{decision="id"}']) >= 4
    assert values['rwood_request_latency_seconds_count{method="Score"}'] >= 1
    assert any(k.startswith("rwood_model_info{") and v == 1 for k, v in values.items())
    assert values["rwood_serving"] == 1


class _Context:
    """What `servicer._handled` reads of a grpc.aio context: the time left."""

    def __init__(self, remaining: float | None):
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize("raised, context, code, details", [
    (None, _Context(None), "OK", ""),
    (InputError("bad", field="images"), _Context(5.0), "INVALID_ARGUMENT", "field 'images': bad"),
    (ModelUnavailable("loading"), None, "UNAVAILABLE", "loading"),
    (TimeoutError("late"), _Context(None), "DEADLINE_EXCEEDED", "late"),
    (RuntimeError("secret"), None, "INTERNAL", "internal error (see the server log)"),
    (RuntimeError("secret"), _Context(5.0), "INTERNAL", "internal error (see the server log)"),
    (asyncio.CancelledError(), _Context(0.0), "DEADLINE_EXCEEDED", ""),
    (asyncio.CancelledError(), _Context(3.0), "CANCELLED", ""),
    (asyncio.CancelledError(), _Context(None), "CANCELLED", ""),
    (asyncio.CancelledError(), None, "CANCELLED", ""),    # a stream request: always CANCELLED
])
def test_one_bookkeeping_maps_errors_and_records_metrics(raised, context, code, details):
    metrics = ServerMetrics()
    inflight = []
    cancelled = isinstance(raised, asyncio.CancelledError)
    with pytest.raises(asyncio.CancelledError) if cancelled else contextlib.nullcontext():
        with servicer._handled(metrics, "Score", context) as outcome:
            inflight.append(metrics.registry.get_sample_value("rwood_inflight_requests"))
            if raised is not None:
                raise raised
    assert inflight == [1.0] and metrics.registry.get_sample_value("rwood_inflight_requests") == 0
    assert (outcome.code.name, outcome.details) == (code, details)
    assert metrics.registry.get_sample_value(
        "rwood_requests_total", {"method": "Score", "code": code}) == 1
    assert metrics.registry.get_sample_value(
        "rwood_request_latency_seconds_count", {"method": "Score"}) == 1


def test_internal_errors_abort_a_call_and_answer_in_a_stream_that_stays_open(tiny_bundle, images,
                                                                             monkeypatch):
    class Broken(Detector):
        def score_arrays(self, images):
            raise RuntimeError("secret")

    real_build = model_host.ModelHost._build_detector

    def build(self):                    # breaks after the warm-up batches
        det = real_build(self)
        det.__class__ = Broken
        return det

    monkeypatch.setattr(model_host.ModelHost, "_build_detector", build)
    with start_background(tiny_bundle, **LIMITS) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(request(images[:1]), timeout=30)
        responses = list(stub.ScoreStream(iter([request(images[:1], "a"), request([], "b"),
                                                request(images[1:2], "c")]), timeout=30))
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).model_version
        sample = srv.server.metrics.registry.get_sample_value
        counts = {(m, c): sample("rwood_requests_total", {"method": m, "code": c})
                  for m, c in [("Score", "INTERNAL"), ("ScoreStream", "INTERNAL"),
                               ("ScoreStream", "INVALID_ARGUMENT"), ("GetInfo", "OK")]}
        latency = {m: sample("rwood_request_latency_seconds_count", {"method": m})
                   for m in ("Score", "ScoreStream", "GetInfo")}
        inflight = sample("rwood_inflight_requests")
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert e.value.details() == "internal error (see the server log)"
    assert [(r.request_id, r.error_code, r.error) for r in responses] == [
        ("a", grpc.StatusCode.INTERNAL.value[0], "internal error (see the server log)"),
        ("b", grpc.StatusCode.INVALID_ARGUMENT.value[0], "field 'images': the request has no images"),
        ("c", grpc.StatusCode.INTERNAL.value[0], "internal error (see the server log)")]
    assert counts == {("Score", "INTERNAL"): 1, ("ScoreStream", "INTERNAL"): 2,
                      ("ScoreStream", "INVALID_ARGUMENT"): 1, ("GetInfo", "OK"): 1}
    assert latency == {"Score": 1, "ScoreStream": 3, "GetInfo": 1} and inflight == 0


# ---- deadlines and loading ----------------------------------------------------------------------
class _SlowDetector:
    """A real Detector whose batches take `delay` longer, recording each batch's size."""

    def __init__(self, det: Detector, delay: float):
        self._det, self.delay, self.batches = det, delay, []

    def score_arrays(self, images):
        self.batches.append(len(images))
        time.sleep(self.delay)
        return self._det.score_arrays(images)

    def __getattr__(self, name):
        return getattr(self._det, name)


def _wait_until(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def test_expired_request_gets_deadline_exceeded_and_its_work_is_dropped(tiny_bundle, images,
                                                                        monkeypatch):
    slow: list[_SlowDetector] = []

    def build(self):
        slow.append(_SlowDetector(Detector(self.bundle_path, device="cpu", threads=1), 0.5))
        return slow[-1]

    monkeypatch.setattr(model_host.ModelHost, "_build_detector", build)
    with start_background(tiny_bundle, **LIMITS) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        busy = stub.Score.future(request(images[:2]), timeout=30)     # holds the model 0.5 s
        _wait_until(lambda: slow and slow[-1].batches)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(request(images[2:5]), timeout=0.2)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(busy.result().results) == 2
        time.sleep(0.3)
        assert slow[-1].batches == [2]          # the 3 expired images never reached the model


def test_overload_is_shed_with_unavailable(tiny_bundle, images, monkeypatch):
    slow: list[_SlowDetector] = []

    def build(self):
        slow.append(_SlowDetector(Detector(self.bundle_path, device="cpu", threads=1), 0.5))
        return slow[-1]

    monkeypatch.setattr(model_host.ModelHost, "_build_detector", build)
    with start_background(tiny_bundle, max_queue_images=4, **LIMITS) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        busy = stub.Score.future(request(images[:3]), timeout=30)
        _wait_until(lambda: slow and slow[-1].batches)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(request(images[3:5]), timeout=30)      # 3 + 2 > 4 images admitted
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in e.value.details()
        assert len(busy.result().results) == 3
        assert len(stub.Score(request(images[3:5]), timeout=30).results) == 2   # idle again


def test_client_leaving_a_stream_mid_way_leaves_the_server_clean(server, stub, images):
    gate = threading.Event()

    def requests():
        yield request(images[:2], "first")
        gate.wait(10)          # the client then goes away without closing the stream

    call = stub.ScoreStream(requests(), timeout=30)
    assert next(call).request_id == "first"
    call.cancel()
    gate.set()
    _wait_until(lambda: server.server.metrics.registry.get_sample_value(
        "rwood_inflight_requests") == 0)
    assert stub.Score(request(images[:1]), timeout=10).results[0].error == ""


def test_not_serving_and_unavailable_while_the_model_loads(tiny_bundle, images, monkeypatch):
    gate = threading.Event()
    real_build = model_host.ModelHost._build_detector

    def build(self):
        assert gate.wait(30)
        return real_build(self)

    monkeypatch.setattr(model_host.ModelHost, "_build_detector", build)

    async def main():
        srv = DetectorServer(tiny_bundle, ServeConfig(address="127.0.0.1:0", **LIMITS))
        starting = asyncio.ensure_future(srv.start())
        while srv.port is None or srv._health is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            before = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pb_grpc.DetectorStub(ch).Score(request(images[:1]), timeout=5)
            gate.set()
            await starting
            after = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
            scored = await pb_grpc.DetectorStub(ch).Score(request(images[:1]), timeout=5)
        await srv.stop(grace=0)
        return before, e.value.code(), after, scored

    before, code, after, scored = asyncio.run(main())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE
    assert after == health_pb2.HealthCheckResponse.SERVING
    assert scored.results[0].error == ""


# ---- configuration errors -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"max_batch": 0}, "max_batch"), ({"max_images": -1}, "max_images"),
    ({"max_wait_ms": -1.0}, "max_wait_ms"), ({"max_message_mb": 0}, "max_message_mb"),
    ({"max_message_mb": 4096}, "max_message_mb"), ({"tls_cert": "c.pem"}, "tls_key"),
    ({"tls_client_ca": "ca.pem"}, "tls_client_ca"), ({"address": "localhost"}, "address"),
    ({"grace_s": -1}, "grace_s"), ({"decode_threads": 0}, "decode_threads"),
])
def test_bad_config_raises_input_error_naming_the_field(kwargs, field):
    with pytest.raises(InputError, match=field):
        ServeConfig(**kwargs)


def test_missing_bundle_raises_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        start_background(tmp_path / "nope")
    with pytest.raises(BundleError, match="manifest missing"):
        start_background(tmp_path)


def test_unreadable_or_empty_token_file_raises_input_error(tiny_bundle, tmp_path):
    with pytest.raises(InputError, match="auth_token_file"):
        start_background(tiny_bundle, auth_token_file=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InputError, match="auth_token_file"):
        start_background(tiny_bundle, auth_token_file=str(tmp_path / "empty.txt"))


def free_port() -> int:
    """A loopback port nobody listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether `port` can be bound on 127.0.0.1, i.e. nothing listens on it any more."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a TIME_WAIT left over is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture()
def busy_port():
    """A loopback port held by a listening socket for the test's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture()
def hosts(monkeypatch) -> dict[str, int]:
    """How many ModelHosts the servers of the test created and closed."""
    counts = {"created": 0, "closed": 0}
    real_init, real_close = model_host.ModelHost.__init__, model_host.ModelHost.close

    def init(self, *args, **kwargs):
        counts["created"] += 1
        real_init(self, *args, **kwargs)

    async def close(self):
        counts["closed"] += 1
        await real_close(self)

    monkeypatch.setattr(model_host.ModelHost, "__init__", init)
    monkeypatch.setattr(model_host.ModelHost, "close", close)
    return counts


def test_address_in_use_raises_input_error_and_leaves_nothing_listening(server, tiny_bundle, hosts):
    metrics_port = free_port()
    with pytest.raises(InputError, match="address"):
        start_background(tiny_bundle, address=server.target, metrics_port=metrics_port,
                         device="cpu", threads=1)
    assert port_is_free(metrics_port)
    assert hosts["created"] == hosts["closed"]


def test_metrics_port_in_use_raises_input_error_and_leaves_nothing_listening(tiny_bundle, busy_port,
                                                                             hosts):
    port = free_port()
    with pytest.raises(InputError, match="metrics_port") as e:
        start_background(tiny_bundle, address=f"127.0.0.1:{port}", metrics_port=busy_port,
                         device="cpu", threads=1)
    assert str(busy_port) in str(e.value)
    assert port_is_free(port), "the gRPC port is still bound"
    assert hosts["created"] == hosts["closed"]


def test_decoding_never_runs_on_the_event_loop(tiny_bundle, images, monkeypatch):
    """Even one small image is decoded on the pool: a crafted header can cost seconds, and the
    event loop must keep answering (health checks, other clients) meanwhile."""
    from detector_server.detector import Detector

    threads: list[str] = []
    real = Detector.prepare
    monkeypatch.setattr(Detector, "prepare",
                        lambda self, item: threads.append(threading.current_thread().name)
                        or real(self, item))
    with start_background(tiny_bundle, device="cpu", threads=1) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        for n in (1, 4, 40):
            stub.Score(pb.ScoreRequest(images=[pb.Image(id=str(i), data=images[i % len(images)][1])
                                               for i in range(n)]), timeout=30)
    assert len(threads) == 45 and all(t.startswith("rwood-decode") for t in threads), set(threads)
