"""Hot reload in-process: a good bundle replaces the model, a broken one is refused and the old model
keeps serving, --watch notices a republished bundle, requests in flight during a reload succeed."""
from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc
from detector_server.bundle import load_bundle, staging_dir, write_bundle
from detector_server.server import start_background

OPTS = dict(device="cpu", threads=1)


def republish(source: Path, bundle: Path, model_version: str) -> None:
    """Publish `source`'s payload as a new version at `bundle` (atomic, as rwood-export does)."""
    manifest = load_bundle(source).manifest
    with staging_dir(bundle) as stage:
        for name in manifest.files:
            shutil.copy2(source / name, stage / name)
        write_bundle(stage, dataclasses.replace(manifest, model_version=model_version, files={}),
                     bundle, overwrite=True)


def corrupt(bundle: Path) -> None:
    """Damage the index after export: the checksum no longer matches, loading must refuse it."""
    with open(bundle / "index.faiss", "ab") as f:
        f.write(b"tampered")


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


@pytest.fixture(scope="module")
def request_(id_images: np.ndarray) -> pb.ScoreRequest:
    imgs = id_images[:4]
    items = []
    for i, a in enumerate(imgs):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        items.append(pb.Image(id=str(i), data=buf.getvalue()))
    return pb.ScoreRequest(images=items)


def _score(target: str, request: pb.ScoreRequest) -> pb.ScoreResponse:
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.DetectorStub(ch).Score(request, timeout=30)


def test_reload_good_then_broken_bundle(tiny_bundle, bundle, request_, caplog):
    with start_background(bundle, metrics_port=0, **OPTS) as srv:
        first = _score(srv.target, request_)
        republish(tiny_bundle, bundle, "v2")
        assert srv.reload() is True
        second = _score(srv.target, request_)
        assert first.model_version != "v2" and second.model_version == "v2"
        assert [r.score for r in second.results] == [r.score for r in first.results]

        corrupt(bundle)
        with caplog.at_level(logging.ERROR, logger="detector_server.server"):
            assert srv.reload() is False
        assert any("refused" in r.getMessage() and "still serving v2" in r.getMessage()
                   for r in caplog.records)
        third = _score(srv.target, request_)
        assert third.model_version == "v2" and all(r.error == "" for r in third.results)
        metrics = srv.server.metrics.render().decode()
        assert 'rwood_reloads_total{outcome="ok"} 1.0' in metrics
        assert 'rwood_reloads_total{outcome="refused"} 1.0' in metrics
        assert 'rwood_model_info{model_version="v2"} 1.0' in metrics


def test_watch_reloads_a_republished_bundle(tiny_bundle, bundle, request_):
    with start_background(bundle, watch=True, watch_interval_s=0.1, **OPTS) as srv:
        republish(tiny_bundle, bundle, "watched")
        deadline = time.monotonic() + 20
        while _score(srv.target, request_).model_version != "watched":
            assert time.monotonic() < deadline, "--watch did not reload within 20 s"
            time.sleep(0.1)


def test_requests_during_reloads_all_succeed(tiny_bundle, bundle, request_):
    seen: list[list[str]] = [[] for _ in range(3)]
    failures: list[BaseException] = []
    stop = threading.Event()

    def hammer(target: str, out: list[str]) -> None:
        try:
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.DetectorStub(ch)
                while not stop.is_set():
                    r = stub.Score(request_, timeout=30)
                    assert all(x.error == "" for x in r.results)
                    out.append(r.model_version)
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    with start_background(bundle, **OPTS) as srv:
        original = _score(srv.target, request_).model_version
        threads = [threading.Thread(target=hammer, args=(srv.target, out)) for out in seen]
        for t in threads:
            t.start()
        for version in ("r1", "r2"):
            time.sleep(0.2)
            republish(tiny_bundle, bundle, version)
            assert srv.reload() is True
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures
    rank = {original: 0, "r1": 1, "r2": 2}
    for versions in seen:   # each client's versions only move forward, ending on the newest
        ranks = [rank[v] for v in versions]
        assert ranks == sorted(ranks) and ranks[-1] == 2
