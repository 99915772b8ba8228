"""Hot reload in-process: a good bundle replaces the model, a broken one is refused and the old model
keeps serving, --watch notices a republished bundle (and retries one copied manifest first, and
follows a switched symlink), requests in flight during a reload succeed, a hung load is abandoned."""
from __future__ import annotations

import dataclasses
import io
import logging
import os
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


def republish(source: Path, bundle: Path, name: str) -> str:
    """Publish `source`'s payload at `bundle` under the version name `name` (atomic, as
    rwood-export does); returns the new model_version ("<name>-<decision digest>")."""
    manifest = load_bundle(source).manifest
    with staging_dir(bundle) as stage:
        for f in manifest.files:
            shutil.copy2(source / f, stage / f)
        write_bundle(stage, dataclasses.replace(manifest, files={}), bundle, overwrite=True,
                     name=name)
    version = load_bundle(bundle, verify_model=False).manifest.model_version
    assert version.startswith(f"{name}-")
    return version


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
        v2 = republish(tiny_bundle, bundle, "v2")
        assert srv.reload() is True
        second = _score(srv.target, request_)
        assert first.model_version != v2 and second.model_version == v2
        assert [r.score for r in second.results] == [r.score for r in first.results]

        corrupt(bundle)
        with caplog.at_level(logging.ERROR, logger="detector_server.server"):
            assert srv.reload() is False
        assert any("refused" in r.getMessage() and f"still serving {v2}" in r.getMessage()
                   for r in caplog.records)
        third = _score(srv.target, request_)
        assert third.model_version == v2 and all(r.error == "" for r in third.results)
        metrics = srv.server.metrics.render().decode()
        assert 'rwood_reloads_total{outcome="ok"} 1.0' in metrics
        assert 'rwood_reloads_total{outcome="refused"} 1.0' in metrics
        assert f'rwood_model_info{{model_version="{v2}"}} 1.0' in metrics


def test_watch_reloads_a_republished_bundle(tiny_bundle, bundle, request_):
    with start_background(bundle, watch=True, watch_interval_s=0.1, **OPTS) as srv:
        watched = republish(tiny_bundle, bundle, "watched")
        deadline = time.monotonic() + 20
        while _score(srv.target, request_).model_version != watched:
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
        rank = {original: 0}
        for name in ("r1", "r2"):
            time.sleep(0.2)
            rank[republish(tiny_bundle, bundle, name)] = len(rank)
            assert srv.reload() is True
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures
    for versions in seen:   # each client's versions only move forward, ending on the newest
        ranks = [rank[v] for v in versions]
        assert ranks == sorted(ranks) and ranks[-1] == 2


def _metric(srv, name: str) -> float:
    line = next(x for x in srv.server.metrics.render().decode().splitlines()
                if x.startswith(name + " "))
    return float(line.split()[1])


def new_version(source: Path, out: Path, model_version: str) -> Path:
    """A complete bundle at `out` with `source`'s payload but other labels (so every file's
    checksum but the model's differs from `source`)."""
    manifest = load_bundle(source).manifest
    with staging_dir(out) as stage:
        for name in manifest.files:
            shutil.copy2(source / name, stage / name)
        labels = np.load(stage / manifest.labels_file)
        np.save(stage / manifest.labels_file, np.roll(labels, 1))
        write_bundle(stage, dataclasses.replace(manifest, model_version=model_version, files={}),
                     out)
    return out


def test_watch_retries_until_a_plain_copy_is_whole(tiny_bundle, bundle, request_, tmp_path):
    """`cp` of a new version lands manifest.json before the files it names: the first reload is
    refused; --watch retries (with backoff) until the bundle is whole. It used to try once and
    serve the stale model for good, with health still SERVING."""
    new = new_version(tiny_bundle, tmp_path / "new", "copied")
    copied = load_bundle(new).manifest.model_version        # "copied-<decision digest>"
    with start_background(bundle, watch=True, watch_interval_s=0.1, **OPTS) as srv:
        shutil.copy2(new / "manifest.json", bundle / "manifest.json")
        deadline = time.monotonic() + 20
        while _metric(srv, 'rwood_reloads_total{outcome="refused"}') < 2:
            assert time.monotonic() < deadline, "--watch did not try (and retry) the new manifest"
            time.sleep(0.1)
        assert _metric(srv, "rwood_last_reload_ok") == 0        # the stale model shows
        assert _score(srv.target, request_).model_version != copied
        for f in new.iterdir():
            if f.name != "manifest.json":
                shutil.copy2(f, bundle / f.name)
        while _score(srv.target, request_).model_version != copied:
            assert time.monotonic() < deadline, "--watch gave up on the bundle"
            time.sleep(0.1)
        assert _metric(srv, "rwood_last_reload_ok") == 1
        assert _metric(srv, "rwood_last_reload_timestamp_seconds") > 0


def test_a_hung_reload_is_abandoned_and_blocks_nothing(tiny_bundle, bundle, request_,
                                                      monkeypatch):
    """A load that never finishes (a bundle on a hung network file system) is abandoned after
    reload_timeout_s: later reloads and the shutdown go ahead while it still hangs."""
    from detector_server.model_host import ModelHost

    hang = threading.Event()
    builds: list[int] = []
    real = ModelHost._build_detector

    def build(self):
        builds.append(1)
        if len(builds) == 2:            # the first reload (the second load) hangs
            hang.wait()
        return real(self)

    monkeypatch.setattr(ModelHost, "_build_detector", build)
    try:
        with start_background(bundle, reload_timeout_s=1.0, **OPTS) as srv:
            t0 = time.monotonic()
            assert srv.reload() is False
            assert time.monotonic() - t0 < 10
            assert _metric(srv, 'rwood_reloads_total{outcome="timeout"}') == 1
            assert _metric(srv, "rwood_last_reload_ok") == 0
            assert all(r.error == "" for r in _score(srv.target, request_).results)
            version = republish(tiny_bundle, bundle, "after-hang")
            assert srv.reload() is True             # not blocked by the hung one
            assert _score(srv.target, request_).model_version == version
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 10           # stop() did not wait for the hung load
        assert not hang.is_set() and len(builds) == 3
    finally:
        hang.set()


def test_watch_follows_the_documented_symlink_switch(tiny_bundle, request_, tmp_path):
    """README: serve a symlink, copy the new version beside it, rename a new link over it."""
    root = tmp_path / "bundles"
    root.mkdir()
    shutil.copytree(tiny_bundle, root / "v1")
    switched = load_bundle(new_version(tiny_bundle, root / "v2", "switched")).manifest.model_version
    (root / "served").symlink_to("v1")
    with start_background(root / "served", watch=True, watch_interval_s=0.1, **OPTS) as srv:
        (root / ".served.new").symlink_to("v2")
        os.rename(root / ".served.new", root / "served")        # what `mv -T` does
        deadline = time.monotonic() + 20
        while _score(srv.target, request_).model_version != switched:
            assert time.monotonic() < deadline, "--watch did not follow the switched link"
            time.sleep(0.1)
        assert _metric(srv, 'rwood_reloads_total{outcome="refused"}') == 0


def test_bundle_watch_retries_a_refused_stamp_with_backoff(monkeypatch):
    """The policy both --watch loops use (one server, and the supervisor of --workers)."""
    from detector_server import bundle_watch

    now = [100.0]
    monkeypatch.setattr(bundle_watch.time, "monotonic", lambda: now[0])
    watch = bundle_watch.BundleWatch(1.0, served=(1,))
    assert not watch.due((1,)) and not watch.due(None) and watch.due((2,))
    waits = []
    for _ in range(8):                   # the copy of stamp 2 stays incomplete
        assert watch.due((2,))
        waits.append(watch.done((2,), ok=False))
        now[0] += waits[-1] - 0.01
        assert not watch.due((2,))       # not before its backoff
        now[0] += 0.01
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert watch.due((3,)) and watch.done((3,), ok=False) == 1.0    # a newer stamp: at once
    assert watch.done((3,), ok=True) is None and not watch.due((3,))
