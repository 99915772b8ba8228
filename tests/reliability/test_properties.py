"""Property-based tests (hypothesis, bounded and derandomised) of decoding and the Score handler.

Properties: any bytes -> an RGB image or InputError (decode_image); any bytes, array or object ->
uint8 [S, S, 3] or InputError (Detector.prepare); any list of (id, bytes) -> one result per image,
in order, ids echoed, a score or an error each (Score over gRPC); any bytes as the request message
-> a status code, and the server still answers.
"""
from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hostile_corpus import encode, seed_images
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from detector_server.errors import InputError
from detector_server.preprocess import decode_image

pytestmark = pytest.mark.timeout(300)

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FAST, max_examples=40)


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    """Real images encoded in the formats a client would send."""
    imgs = seed_images(4)
    return [encode(imgs[0], "PNG"), encode(imgs[1], "JPEG", quality=90),
            encode(imgs[2].resize((64, 48)), "GIF"), encode(imgs[3].resize((40, 40)), "WEBP"),
            encode(imgs[0], "BMP"), encode(imgs[1], "TIFF")]


def mutate(data: bytes, flips: list[tuple[float, int]], cut: float | None,
           splice: tuple[float, bytes] | None) -> bytes:
    """Flip bits at relative positions, optionally cut at a relative point and splice in bytes."""
    b = bytearray(data)
    for pos, bit in flips:
        i = min(int(pos * len(b)), len(b) - 1)
        b[i] ^= 1 << bit
    if splice is not None:
        i = int(splice[0] * len(b))
        b[i:i] = splice[1]
    if cut is not None:
        b = b[:max(0, int(cut * len(b)))]
    return bytes(b)


mutation = st.tuples(
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=8),
    st.none() | st.floats(0, 1),
    st.none() | st.tuples(st.floats(0, 1), st.binary(max_size=64)))


def _decodes_or_refuses(data: bytes) -> None:
    try:
        img = decode_image(data)
    except InputError:
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


@FAST
@given(st.binary(max_size=4096))
def test_decode_any_bytes(data):
    _decodes_or_refuses(data)


@FAST
@given(st.integers(0, 5), mutation)
def test_decode_mutated_real_images(seeds, k, m):
    _decodes_or_refuses(mutate(seeds[k], *m))


@FAST
@given(st.integers(0, 5), mutation)
def test_prepare_mutated_real_images(detector, seeds, k, m):
    s = detector.spec.size
    try:
        a = detector.prepare(mutate(seeds[k], *m))
    except InputError:
        return
    assert a.dtype == np.uint8 and a.shape == (s, s, 3)


_arrays = hnp.arrays(dtype=st.sampled_from([np.uint8, np.float32, np.int64, np.bool_]),
                     shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12)
                     | hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=48))


@FAST
@given(st.one_of(_arrays, st.none(), st.integers(), st.text(max_size=20), st.binary(max_size=64),
                 st.lists(st.integers(), max_size=4)))
def test_prepare_any_object(detector, item):
    s = detector.spec.size
    try:
        a = detector.prepare(item)
    except InputError:
        return
    assert a.dtype == np.uint8 and a.shape == (s, s, 3)


@FEW
@given(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F", "I;16", "YCbCr"]),
       st.integers(1, 80), st.integers(1, 80))
def test_prepare_pil_images_of_any_mode(detector, mode, w, h):
    img = Image.new(mode, (w, h))
    a = detector.prepare(img)
    assert a.shape == (detector.spec.size, detector.spec.size, 3)


# ---------------------------------------------------------------------------------------------
# The Score handler over gRPC
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def channel(live_server):
    with grpc.insecure_channel(live_server.target) as ch:
        yield ch


@FEW
@given(st.lists(st.tuples(st.text(max_size=30),
                          st.one_of(st.binary(max_size=300), st.integers(0, 5))),
                min_size=1, max_size=12))
def test_score_handler_any_images(channel, seeds, detector, items):
    from detector_server._proto import detector_pb2 as pb
    from detector_server._proto import detector_pb2_grpc as pb_grpc

    items = [(i, seeds[d] if isinstance(d, int) else d) for i, d in items]
    request = pb.ScoreRequest(images=[pb.Image(id=i, data=d) for i, d in items])
    response = pb_grpc.DetectorStub(channel).Score(request, timeout=30)
    assert [r.id for r in response.results] == [i for i, _ in items]
    for r in response.results:
        assert bool(r.error) != math.isfinite(r.score)
        if not r.error:
            assert 0 <= r.predicted_class < len(detector.class_names)
    for (_, data), r in zip(items, response.results):
        if data in seeds:
            assert r.error == ""


# Bytes that do not parse get INVALID_ARGUMENT (server_guard), as do requests without images.
_ALLOWED_RAW = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@FEW
@given(st.binary(max_size=2048))
def test_score_handler_any_request_bytes(channel, data):
    """Arbitrary bytes as the serialized ScoreRequest: a status code, never a dead server."""
    from detector_server._proto import detector_pb2 as pb
    from detector_server._proto import detector_pb2_grpc as pb_grpc

    call = channel.unary_unary("/rwood.v1.Detector/Score")   # raw bytes in and out
    try:
        call(data, timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    assert code in _ALLOWED_RAW, code
    info = pb_grpc.DetectorStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.model_version
