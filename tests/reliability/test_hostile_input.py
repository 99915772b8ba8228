"""The hostile corpus (hostile_corpus.build_hostile_corpus) through Detector.score_images and the
server.

Every input gets a score or a per-item error, never an exception; bad neighbours never change a
good image's score; ids come back exactly as sent; bombs are refused from the header, fast.
"""
from __future__ import annotations

import math
import subprocess
import textwrap
import time

import grpc
import numpy as np
import pytest
from hostile_corpus import HOSTILE_IDS, PYTHON, check_result, encode, png_bomb, subprocess_env
from PIL import Image

pytestmark = pytest.mark.timeout(300)


def test_corpus_through_detector(detector, hostile_corpus):
    results = detector.score_images([c.data for c in hostile_corpus],
                                    ids=[c.name for c in hostile_corpus])
    assert [r.id for r in results] == [c.name for c in hostile_corpus]
    for case, r in zip(hostile_corpus, results):
        check_result(case.expect, r, len(detector.class_names))
    kinds = {c.expect for c in hostile_corpus}
    assert kinds == {"score", "error", "either"}


def test_bad_neighbours_do_not_change_good_scores(detector, hostile_corpus):
    good = [c for c in hostile_corpus if c.expect == "score"]
    alone = [detector.score_images([c.data])[0].score for c in good]
    mixed = detector.score_images([c.data for c in hostile_corpus])
    in_mix = [r.score for c, r in zip(hostile_corpus, mixed) if c.expect == "score"]
    np.testing.assert_allclose(in_mix, alone, rtol=1e-5, atol=1e-5)


def test_bombs_refused_from_the_header_fast(detector, hostile_corpus):
    bombs = [c for c in hostile_corpus if c.name.startswith("bomb_")]
    assert len(bombs) == 5
    for case in bombs:
        t0 = time.perf_counter()
        (r,) = detector.score_images([case.data], ids=[case.name])
        assert time.perf_counter() - t0 < 1.0, case.name
        assert "pixels" in r.error or "too large" in r.error, (case.name, r.error)


def test_pixel_limit_boundary(tiny_bundle):
    """max_pixels is inclusive: exactly at the limit scores, one pixel over is refused."""
    from detector_server.detector import Detector

    det = Detector(tiny_bundle, device="cpu", threads=1, max_pixels=64 * 64)
    at, over = encode(Image.new("RGB", (64, 64), "red"), "PNG"), png_bomb(64, 65)
    a, b = det.score_images([at, over])
    assert a.error == "" and math.isfinite(a.score)
    assert "4160 pixels" in b.error


def test_hostile_ids_echoed(detector, hostile_corpus):
    good = hostile_corpus[0].data
    results = detector.score_images([good] * len(HOSTILE_IDS), ids=HOSTILE_IDS)
    assert [r.id for r in results] == HOSTILE_IDS
    assert len({r.score for r in results}) == 1


def test_non_bytes_items_are_per_item_errors(detector, hostile_corpus):
    items = [None, 12, "a/path.png", [1, 2], np.zeros((4, 4), np.float32),
             np.zeros((0, 5), np.uint8), np.zeros((2, 2, 4), np.uint8), hostile_corpus[0].data]
    results = detector.score_images(items)
    assert all(r.error for r in results[:-1]) and results[-1].error == ""


def test_extreme_aspect_ratio_is_bounded(tmp_path):
    """A 3 KB PNG of 1,000,000 x 1 pixels (inside max_pixels) must become model input or a per-item
    InputError within 800 MB of address space and a few seconds, never a MemoryError."""
    script = textwrap.dedent("""
        import io, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (800_000_000, 800_000_000))
        from PIL import Image
        from detector_server.errors import InputError
        from detector_server.preprocess import PreprocessSpec, decode_image, to_model_array
        spec = PreprocessSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        buf = io.BytesIO(); Image.new("RGB", (1_000_000, 1), "red").save(buf, "PNG")
        try:
            a = to_model_array(decode_image(buf.getvalue()), spec)
            print("ok", a.shape)
        except InputError as e:
            print("refused", e)
    """)
    t0 = time.perf_counter()
    p = subprocess.run([PYTHON, "-c", script], env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.perf_counter() - t0 < 15


_MEMORY_PROBE = textwrap.dedent("""
    import io, resource, sys
    import numpy as np
    from PIL import Image
    from detector_server.preprocess import PreprocessSpec, decode_image, to_model_array
    mode, side = sys.argv[1], 6300                     # 39.7 Mpx, just under the default limit
    img = (Image.fromarray(np.zeros((side, side), np.uint16)) if mode == "I;16"
           else Image.new(mode, (side, side)))
    buf = io.BytesIO(); img.save(buf, "PNG"); data = buf.getvalue(); del img, buf
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    to_model_array(decode_image(data), PreprocessSpec(32, (0.5,) * 3, (0.25,) * 3))
    print(len(data), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    "L", "RGB", "RGBA", "P", "I;16"])
def test_decoding_at_the_pixel_limit_has_bounded_cost(mode):
    """An image just under max_pixels (a few KB of PNG) may cost at most ~10 bytes per pixel of
    peak memory while decoding (RGB alone is 3; conversions add copies) and a few seconds."""
    t0 = time.perf_counter()
    p = subprocess.run([PYTHON, "-c", _MEMORY_PROBE, mode], env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    size, peak_mb = (int(x) for x in p.stdout.split())
    assert size < 200_000
    assert peak_mb < 400, f"{mode}: {peak_mb} MB peak for a {size}-byte file"
    assert time.perf_counter() - t0 < 8


# ---------------------------------------------------------------------------------------------
# Through the gRPC server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub(live_server):
    from detector_server._proto import detector_pb2_grpc as pb_grpc

    with grpc.insecure_channel(live_server.target) as channel:
        yield pb_grpc.DetectorStub(channel)


def _request(items):
    from detector_server._proto import detector_pb2 as pb

    return pb.ScoreRequest(images=[pb.Image(id=i, data=d) for i, d in items])


def test_corpus_through_server(stub, detector, hostile_corpus):
    response = stub.Score(_request([(c.name, c.data) for c in hostile_corpus]), timeout=60)
    assert [r.id for r in response.results] == [c.name for c in hostile_corpus]
    for case, r in zip(hostile_corpus, response.results):
        check_result(case.expect, r, len(detector.class_names))
    local = detector.score_images([c.data for c in hostile_corpus])
    for case, r, ref in zip(hostile_corpus, response.results, local):
        assert bool(r.error) == bool(ref.error), case.name
        if not r.error:
            assert r.score == pytest.approx(ref.score, rel=1e-5, abs=1e-5), case.name
            assert r.predicted_class == ref.predicted_class and r.is_ood == ref.is_ood


def test_corpus_through_stream(stub, detector, hostile_corpus):
    requests = [_request([(c.name, c.data)]) for c in hostile_corpus]
    responses = list(stub.ScoreStream(iter(requests), timeout=60))
    assert len(responses) == len(hostile_corpus)
    for case, resp in zip(hostile_corpus, responses):
        assert resp.error_code == 0 and len(resp.results) == 1
        assert resp.results[0].id == case.name
        check_result(case.expect, resp.results[0], len(detector.class_names))


def test_hostile_ids_through_server(stub, hostile_corpus):
    good = hostile_corpus[0].data
    response = stub.Score(_request([(i, good) for i in HOSTILE_IDS]), timeout=30)
    assert [r.id for r in response.results] == HOSTILE_IDS
    assert all(r.error == "" for r in response.results)


def test_server_alive_after_corpus(stub, live_server, hostile_corpus):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from detector_server._proto import detector_pb2 as pb

    stub.Score(_request([(c.name, c.data) for c in hostile_corpus]), timeout=60)
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.model_version
    with grpc.insecure_channel(live_server.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
