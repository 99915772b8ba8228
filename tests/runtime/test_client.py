"""DetectorClient: every input kind, ids, batching into requests, info, retries of UNAVAILABLE
within the deadline, no retry of other errors, and its input errors."""
from __future__ import annotations

import math
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from real_images import png_bytes

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc
from detector_server.client import DetectorClient, RemoteResult, ServerInfo
from detector_server.detector import Detector, ItemResult
from detector_server.errors import InputError
from detector_server.server import start_background


@pytest.fixture(scope="module")
def server(tiny_bundle: Path):
    srv = start_background(tiny_bundle, device="cpu", threads=1)
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def detector(tiny_bundle: Path) -> Detector:
    return Detector(tiny_bundle, device="cpu", threads=1)


@pytest.fixture(scope="module")
def arrays(id_images: np.ndarray) -> np.ndarray:
    return id_images[:7]


def _ok_count(server) -> float:
    return server.server.metrics.registry.get_sample_value(
        "rwood_requests_total", {"method": "Score", "code": "OK"}) or 0.0


def test_every_input_kind_scores_like_the_detector(server, detector, arrays, photo_jpeg_files,
                                                    tmp_path):
    jpeg = photo_jpeg_files[0]
    png_path = tmp_path / "img.png"
    png_path.write_bytes(png_bytes(arrays[0]))
    items = [jpeg, str(png_path), png_bytes(arrays[1]), Image.fromarray(arrays[2]), arrays[3],
             arrays[4].mean(axis=2).astype(np.uint8)]
    with DetectorClient(server.target) as client:
        results = client.score(items)
    reference = detector.score_images([jpeg.read_bytes(), png_path.read_bytes(), png_bytes(arrays[1]),
                                       arrays[2], arrays[3], arrays[4].mean(axis=2).astype(np.uint8)])
    assert [r.id for r in results] == [str(jpeg), str(png_path), "2", "3", "4", "5"]
    for r, ref in zip(results, reference):
        assert isinstance(r, RemoteResult) and isinstance(r, ItemResult)
        assert r.error == "" and r.model_version == detector.model_version
        assert r.score == pytest.approx(ref.score, rel=1e-5, abs=1e-6)
        assert (r.is_ood, r.predicted_class, r.predicted_label) == \
            (ref.is_ood, ref.predicted_class, ref.predicted_label)


def test_batches_into_requests_in_order_with_ids_and_per_item_errors(server, arrays):
    data = [png_bytes(a) for a in arrays] + [b"junk"]
    ids = [f"img-{i}" for i in range(len(data))]
    before = _ok_count(server)
    with DetectorClient(server.target, max_batch=3) as client:
        results = client.score(data, ids=ids)
    assert _ok_count(server) - before == 3          # 8 images in requests of 3, 3, 2
    assert [r.id for r in results] == ids
    assert all(r.error == "" for r in results[:-1])
    assert results[-1].error and math.isnan(results[-1].score)
    with DetectorClient(server.target) as client:
        assert client.score([]) == []


def test_info(server, detector):
    with DetectorClient(server.target) as client:
        info = client.info()
    assert isinstance(info, ServerInfo)
    assert info.model_version == detector.model_version and info.k == detector.k
    assert info.class_names == tuple(detector.class_names) and info.input_size == detector.spec.size


@pytest.mark.parametrize("kwargs, field", [({"max_batch": 0}, "max_batch"),
                                           ({"timeout": 0}, "timeout"),
                                           ({"retries": -1}, "retries"),
                                           ({"client_cert": b"x"}, "client_key")])
def test_bad_options_raise_input_error(kwargs, field):
    with pytest.raises(InputError, match=field):
        DetectorClient("127.0.0.1:1", **kwargs)


def test_bad_items_raise_input_error(tmp_path):
    with DetectorClient("127.0.0.1:1") as client:
        with pytest.raises(InputError, match=r"images\[0\]"):
            client.score([12345])
        with pytest.raises(InputError, match="missing.png"):
            client.score([tmp_path / "missing.png"])
        with pytest.raises(InputError, match=r"images\[0\]"):
            client.score([np.zeros((4, 4), np.float32)])
        with pytest.raises(InputError, match="ids"):
            client.score([b"a", b"b"], ids=["only-one"])


# ---- retries against a scripted server ----------------------------------------------------------
class _Scripted(pb_grpc.DetectorServicer):
    """Fails the first `failures` Score calls with `code`, then answers every image with score 0.5."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code, self.calls = failures, code, 0

    def Score(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, "scripted failure")
        return pb.ScoreResponse(model_version="scripted", results=[
            pb.Result(id=im.id, score=0.5, predicted_class=0, predicted_label="a")
            for im in request.images])


def _scripted_server(servicer: _Scripted):
    srv = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_DetectorServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    return srv, f"127.0.0.1:{port}"


def test_unavailable_is_retried_until_it_succeeds():
    servicer = _Scripted(failures=2)
    srv, target = _scripted_server(servicer)
    try:
        with DetectorClient(target, retries=3, timeout=10) as client:
            results = client.score([b"x", b"y"])
        assert [r.score for r in results] == [0.5, 0.5] and servicer.calls == 3
        assert results[0].model_version == "scripted"
    finally:
        srv.stop(0)


def test_retries_are_bounded_by_count_and_by_the_deadline():
    servicer = _Scripted(failures=100)
    srv, target = _scripted_server(servicer)
    try:
        with DetectorClient(target, retries=2, timeout=10) as client:
            with pytest.raises(grpc.RpcError) as e:
                client.score([b"x"])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == 3
        servicer.calls = 0
        t0 = time.monotonic()
        with DetectorClient(target, retries=1000, timeout=0.5) as client:
            with pytest.raises(grpc.RpcError):
                client.score([b"x"])
        assert time.monotonic() - t0 < 2.0 and 1 < servicer.calls < 1000
    finally:
        srv.stop(0)


def test_other_errors_are_not_retried():
    servicer = _Scripted(failures=100, code=grpc.StatusCode.INVALID_ARGUMENT)
    srv, target = _scripted_server(servicer)
    try:
        with DetectorClient(target, retries=3) as client:
            with pytest.raises(grpc.RpcError) as e:
                client.score([b"x"])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and servicer.calls == 1
    finally:
        srv.stop(0)
