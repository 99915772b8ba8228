"""The evidence over gRPC and a bank edited under a serving rwood-serve.

- `ScoreRequest.neighbors`: the nearest bank rows behind each score, equal to the Detector's,
  in Score and ScoreStream, with requests of different counts sharing batches; more than K or a
  negative count is INVALID_ARGUMENT; the client's `neighbors=`.
- Backward compatibility: a client generated from the proto as it was before `neighbors`
  (tests/runtime/old_proto, compiled here with grpcio-tools, run in its own process so that its
  descriptors do not meet the new ones) gets the same answers from the new server.
- `rwood-bank add --out SERVED --force` under `rwood-serve --watch`: the new version and class
  are served, and no request fails meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from real_images import png_bytes

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc
from detector_server.bank_edit import add_images
from detector_server.client import DetectorClient
from detector_server.detector import Detector
from detector_server.server import start_background

OPTS = dict(device="cpu", threads=1)
OLD_PROTO = Path(__file__).resolve().parent / "old_proto"


@pytest.fixture(scope="module")
def images(id_images: np.ndarray) -> list[bytes]:
    return [png_bytes(a) for a in id_images[:12]]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path):
    srv = start_background(tiny_bundle, **OPTS)
    yield srv
    srv.stop(grace=0)


def _request(images: list[bytes], neighbors: int = 0, rid: str = "") -> pb.ScoreRequest:
    return pb.ScoreRequest(images=[pb.Image(id=str(i), data=d) for i, d in enumerate(images)],
                           neighbors=neighbors, request_id=rid)


def test_neighbors_equal_the_detectors_in_every_call(server, tiny_bundle, images):
    det = Detector(tiny_bundle, **OPTS)
    ref = det.score_images(images, neighbors=4)
    assert all(len(r.neighbors) == 4 for r in ref)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        plain = stub.Score(_request(images), timeout=30)
        unary = stub.Score(_request(images, 4), timeout=30)
        stream = list(stub.ScoreStream(iter([_request(images[:5], 4, "a"),
                                             _request(images[5:], 4, "b")]), timeout=30))
    assert all(len(r.neighbors) == 0 for r in plain.results)
    streamed = [r for resp in stream for r in resp.results]
    for results in (unary.results, streamed):
        for got, want in zip(results, ref):
            assert got.score == pytest.approx(want.score, abs=1e-6)
            assert [(n.row, n.class_index, n.label, n.source, n.source_index)
                    for n in got.neighbors] == [(n.row, n.class_index, n.label, n.source,
                                                 n.source_index) for n in want.neighbors]
            np.testing.assert_allclose([n.similarity for n in got.neighbors],
                                       [n.similarity for n in want.neighbors], atol=1e-6)
    first = unary.results[0].neighbors
    assert [n.similarity for n in first] == sorted((n.similarity for n in first), reverse=True)
    assert first[0].source == f"train#{first[0].source_index}" and first[0].source_index >= 0
    assert first[0].label == det.class_names[first[0].class_index]


def test_requests_with_different_counts_share_batches(tiny_bundle, images):
    """Many concurrent requests (0, 2 or K neighbours) through one batcher: each gets its own."""
    k = Detector(tiny_bundle, **OPTS).k
    counts = [0, 2, k] * 6
    with start_background(tiny_bundle, max_wait_ms=20, **OPTS) as srv:
        async def all_at_once():
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = pb_grpc.DetectorStub(ch)
                return await asyncio.gather(*[stub.Score(_request(images[i % 12:i % 12 + 1], n),
                                                         timeout=30)
                                              for i, n in enumerate(counts)])
        responses = asyncio.run(all_at_once())
        batches = srv.server.metrics.registry.get_sample_value("rwood_batch_size_count")
    assert [len(r.results[0].neighbors) for r in responses] == counts
    assert batches < len(counts)                       # they did share batches
    by_image: dict[int, list] = {}
    for i, r in enumerate(responses):
        by_image.setdefault(i % 12, []).append([n.row for n in r.results[0].neighbors])
    for lists in by_image.values():                    # the same image: the same nearest rows
        longest = max(lists, key=len)
        assert all(rows == longest[:len(rows)] for rows in lists)


@pytest.mark.parametrize("neighbors", [-1, 11])
def test_more_than_k_or_negative_is_invalid(server, images, neighbors):
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(_request(images[:1], neighbors), timeout=30)
        (resp,) = stub.ScoreStream(iter([_request(images[:1], neighbors, "s")]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "neighbors" in e.value.details() and "[0, 10]" in e.value.details()
    assert resp.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not resp.results


def test_client_neighbors(server, tiny_bundle, images):
    with DetectorClient(server.target) as client:
        results = client.score(images[:3], neighbors=3)
        assert client.score(images[:1])[0].neighbors == ()
        with pytest.raises(grpc.RpcError) as e:
            client.score(images[:1], neighbors=client.info().k + 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ref = Detector(tiny_bundle, **OPTS).score_images(images[:3], neighbors=3)
    assert [[n.row for n in r.neighbors] for r in results] == [[n.row for n in r.neighbors]
                                                               for r in ref]
    assert results[0].neighbors[0].source.startswith("train#")


OLD_CLIENT = textwrap.dedent("""
    import json, sys
    import grpc
    from rwood.v1 import detector_pb2 as pb, detector_pb2_grpc as pb_grpc
    assert "neighbors" not in pb.ScoreRequest.DESCRIPTOR.fields_by_name   # really the old one
    target, paths = sys.argv[1], sys.argv[2:]
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        req = pb.ScoreRequest(images=[pb.Image(id=p, data=open(p, "rb").read()) for p in paths],
                              request_id="old")
        resp = stub.Score(req, timeout=30)
        (streamed,) = stub.ScoreStream(iter([req]), timeout=30)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    print(json.dumps({"version": resp.model_version, "rid": resp.request_id,
                      "results": [[r.id, r.score, r.is_ood, r.predicted_class, r.predicted_label,
                                   r.error] for r in resp.results],
                      "stream": [r.score for r in streamed.results],
                      "info": [info.model_version, info.k, list(info.class_names)]}))
""")


def test_a_client_generated_from_the_old_proto_works_with_the_new_server(server, images,
                                                                          tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    gen = tmp_path / "gen"
    gen.mkdir()
    assert protoc.main(["protoc", f"-I{OLD_PROTO}", f"--python_out={gen}",
                        f"--grpc_python_out={gen}",
                        str(OLD_PROTO / "rwood" / "v1" / "detector.proto")]) == 0
    paths = []
    for i, data in enumerate(images[:4] + [b"not an image"]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", OLD_CLIENT, server.target, *map(str, paths)],
                          cwd=gen, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(gen), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = json.loads(proc.stdout)
    with grpc.insecure_channel(server.target) as ch:           # the new client, with neighbours
        stub = pb_grpc.DetectorStub(ch)
        new = stub.Score(pb.ScoreRequest(images=[pb.Image(id=str(p), data=p.read_bytes())
                                                 for p in paths], neighbors=3), timeout=30)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    assert old["version"] == new.model_version and old["rid"] == "old"
    assert old["results"] == [[r.id, pytest.approx(r.score, abs=1e-6, nan_ok=True), r.is_ood,
                               r.predicted_class, r.predicted_label, r.error] for r in new.results]
    assert old["results"][-1][5]                               # the bad file: its error
    assert old["stream"][:4] == pytest.approx([r[1] for r in old["results"][:4]])
    assert old["info"] == [info.model_version, info.k, list(info.class_names)]


def test_bank_add_under_a_serving_server_reloads_without_a_failed_request(tiny_bundle, tmp_path,
                                                                           images, ood_images):
    served = tmp_path / "served"
    shutil.copytree(tiny_bundle, served)
    np.savez(tmp_path / "photo.npz", images=ood_images[:60], labels=np.zeros(60, np.int64),
             classes=np.array(["photo"]))
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def hammer(target: str) -> None:
        try:
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.DetectorStub(ch)
                while not stop.is_set():
                    r = stub.Score(_request(images[:2], 1), timeout=30)
                    assert all(x.error == "" and len(x.neighbors) == 1 for x in r.results)
                    seen.append(r.model_version)
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    with start_background(served, watch=True, watch_interval_s=0.05, **OPTS) as srv, \
            DetectorClient(srv.target) as client:
        before = client.info()
        threads = [threading.Thread(target=hammer, args=(srv.target,)) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            report = add_images(served, tmp_path / "photo.npz", served, overwrite=True)
            deadline = time.monotonic() + 60
            while client.info().model_version != report.model_version:
                assert time.monotonic() < deadline, "the edited bundle was not picked up in 60 s"
                time.sleep(0.1)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        after = client.info()
        (r,) = client.score([ood_images[0]], neighbors=1)
    assert not failures, failures[:3]
    assert before.class_names + ("photo",) == after.class_names
    assert seen[0] == before.model_version and seen[-1] == after.model_version
    assert set(seen) == {before.model_version, after.model_version}
    assert r.model_version == after.model_version and r.neighbors[0].source == "photo#0"
    ok = srv.server.metrics.registry.get_sample_value("rwood_reloads_total", {"outcome": "ok"})
    assert ok >= 1


def test_the_response_bound_covers_the_neighbours(tiny_bundle, images):
    """servicer.response_bound (what refuses a request whose answer could exceed the message
    limit) holds for real answers with K neighbours per image, and is not far above them."""
    from detector_server.servicer import _to_response, response_bound

    det = Detector(tiny_bundle, device="cpu", threads=1)
    ids = [f"image-{i}" for i in range(len(images))]
    for n in (0, 1, det.max_neighbors):
        results = det.score_images(images, ids, neighbors=n)
        assert all(len(r.neighbors) == n for r in results)
        size = _to_response(results, det.model_version, "rid", 2**30).ByteSize()
        bound = response_bound(ids, "rid", det, neighbors=n)
        assert size <= bound < 3 * size + 400 * len(ids), (n, size, bound)


def test_sources_are_read_only_when_neighbours_are_asked_for(tiny_bundle, images):
    """Scoring without neighbours never reads sources.json (a large file for a large bank)."""
    det = Detector(tiny_bundle, device="cpu", threads=1)
    det.score_images(images[:2])
    assert "sources" not in vars(det)
    (result, _) = det.score_images(images[:2], neighbors=2)
    assert "sources" in vars(det) and result.neighbors[0].source.startswith("train#")
