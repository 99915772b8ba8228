"""Security properties not covered by the owners' tests (see SECURITY.md for the map).

Covered elsewhere, not repeated: load_state refuses a pickled object (tests/trainer/
test_checkpoint.py), altered/missing/edited bundle files (tests/runtime/test_bundle.py), TLS, mutual
TLS and the bearer token incl. constant-time comparison (tests/runtime/test_server_security.py).
Here: no unsafe deserialisation anywhere in the shipped code, pickles planted in a run directory or
in a bundle whose checksums were recomputed, loopback-only defaults, limits applied before any
decoding, and internal errors that do not leak to clients.
"""
from __future__ import annotations

import ast
import json
import shutil
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from hostile_corpus import REPO, png_bomb
from PIL import ImageFile

from detector_server.bundle import MANIFEST_FILE, file_sha256, load_bundle, manifest_digest
from detector_server.errors import BundleError, CheckpointError

PACKAGES = ("trainer", "exporter", "detector_server")


# ---------------------------------------------------------------------------------------------
# No unsafe deserialisation in the shipped code
# ---------------------------------------------------------------------------------------------
_FORBIDDEN_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
                    ("cPickle", "load"), ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"),
                    ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"),
                    ("shelve", "open"), ("yaml", "load"), ("yaml", "unsafe_load"),
                    ("pd", "read_pickle"), ("pandas", "read_pickle")}
_FORBIDDEN_NAMES = {"eval", "exec", "__import__"}


def _call_name(func: ast.expr) -> tuple[str, str] | None:
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id, func.attr
    return None


def _kw(call: ast.Call, name: str):
    kw = next((k for k in call.keywords if k.arg == name), None)
    if kw is None:
        return None
    return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value


def unsafe_deserialisation(source: str, filename: str) -> list[str]:
    """Findings in one module: pickle-family loads, torch.load without weights_only=True,
    np.load(allow_pickle=True), eval/exec."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        name = _call_name(node.func)
        if isinstance(node.func, ast.Name) and node.func.id in _FORBIDDEN_NAMES:
            found.append(f"{where} {node.func.id}()")
        elif name in _FORBIDDEN_CALLS:
            found.append(f"{where} {'.'.join(name)}()")
        elif name == ("torch", "load") and _kw(node, "weights_only") is not True:
            found.append(f"{where} torch.load without weights_only=True")
        elif name in (("np", "load"), ("numpy", "load")) and _kw(node, "allow_pickle") not in (
                None, False):
            found.append(f"{where} np.load with allow_pickle")
    return found


def test_the_scanner_finds_each_unsafe_pattern():
    bad = ("import pickle, torch, numpy as np\npickle.loads(b)\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\neval('1')\n"
           "yaml.load(s)\nmodel.eval()\ntorch.load(p, weights_only=True)\nnp.load(p)\n")
    found = unsafe_deserialisation(bad, "x.py")
    assert [f.split(" ", 1)[0] for f in found] == [f"x.py:{i}" for i in (2, 3, 4, 5, 6, 7)]


def test_no_unsafe_deserialisation_in_shipped_code():
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "_proto" not in p.parts]
    assert len(files) > 20
    found = [f for p in files
             for f in unsafe_deserialisation(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, found


# ---------------------------------------------------------------------------------------------
# Pickles planted where the tools read
# ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates `marker`: proof that attacker-chosen code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    return dst


def test_export_refuses_a_pickled_model_file(run_copy, tmp_path):
    import torch

    from exporter.export import export_bundle

    marker = tmp_path / "payload_ran"
    state = torch.load(run_copy / "model.pt", weights_only=True)
    torch.save({**state, "class_names": _Payload(marker)}, run_copy / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt"):
        export_bundle(run_copy, tmp_path / "bundle", k=10)
    assert not marker.exists() and not (tmp_path / "bundle").exists()


def test_export_refuses_a_bank_with_pickled_arrays(run_copy, tmp_path):
    from exporter.export import export_bundle

    marker = tmp_path / "payload_ran"
    with np.load(run_copy / "bank.npz") as f:
        arrays = dict(f)
    arrays["labels"] = np.array([_Payload(marker)] * len(arrays["labels"]), dtype=object)
    np.savez(run_copy / "bank.npz", **arrays)
    with pytest.raises(CheckpointError, match="bank.npz"):
        export_bundle(run_copy, tmp_path / "bundle", k=10)
    assert not marker.exists()


def test_bundle_with_recomputed_checksums_still_never_unpickles(tiny_bundle, tmp_path):
    """Checksums catch corruption; someone who can write the bundle can also rewrite them. Even
    then the labels are read with allow_pickle=False: refused, nothing executed."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    marker = tmp_path / "payload_ran"
    n = load_bundle(bundle).manifest.index.ntotal
    np.save(bundle / "labels.npy", np.array([_Payload(marker)] * n, dtype=object),
            allow_pickle=True)
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    raw["files"]["labels.npy"] = file_sha256(bundle / "labels.npy")
    raw["manifest_sha256"] = manifest_digest(raw)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="labels"):
        load_bundle(bundle)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Loopback by default
# ---------------------------------------------------------------------------------------------
def test_defaults_bind_loopback():
    from click.testing import CliRunner

    from detector_server.serve_cli import serve_main
    from detector_server.server import ServeConfig, start_background

    cfg = ServeConfig()
    assert cfg.address.rpartition(":")[0] == "127.0.0.1" and cfg.metrics_host == "127.0.0.1"
    assert start_background.__defaults__[0].startswith("127.0.0.1:")
    help_text = CliRunner().invoke(serve_main, ["--help"]).output
    assert "127.0.0.1:50051" in help_text


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))    # a route lookup only: UDP connect sends nothing
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_default_server_is_unreachable_from_other_interfaces(live_server):
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((ip, live_server.port)) != 0, f"reachable on {ip}"
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=2):
        pass


# ---------------------------------------------------------------------------------------------
# Limits before decoding, and no leaks in error details
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def prepare_calls(monkeypatch) -> list[int]:
    from detector_server.detector import Detector

    calls: list[int] = []
    real = Detector.prepare
    monkeypatch.setattr(Detector, "prepare", lambda self, item: calls.append(1) or real(self, item))
    return calls


def test_request_limits_refuse_before_any_decoding(tiny_bundle, hostile_corpus, prepare_calls):
    from detector_server._proto import detector_pb2 as pb
    from detector_server._proto import detector_pb2_grpc as pb_grpc
    from detector_server.server import start_background

    good = hostile_corpus[0].data
    with start_background(tiny_bundle, device="cpu", threads=1, max_images=4,
                          max_message_mb=0.25) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        for images, code in (([good] * 5, grpc.StatusCode.INVALID_ARGUMENT),
                             ([good, b"\0" * 300_000], grpc.StatusCode.RESOURCE_EXHAUSTED)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Score(pb.ScoreRequest(images=[pb.Image(id="x", data=d) for d in images]),
                           timeout=10)
            assert e.value.code() == code
        assert prepare_calls == [], "a refused request was decoded"
        stub.Score(pb.ScoreRequest(images=[pb.Image(id="ok", data=good)]), timeout=10)
        assert prepare_calls == [1]


def test_pixel_limit_refuses_before_pixels_are_decoded(detector, hostile_corpus, monkeypatch):
    loads: list[int] = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real(self))
    bombs = [c.data for c in hostile_corpus if c.name.startswith("bomb_")]
    results = detector.score_images(bombs + [png_bomb(8000, 6000)])
    assert all(r.error for r in results)
    assert loads == [], "pixels of an oversized image were decoded"
    detector.score_images([hostile_corpus[0].data])
    assert loads, "the probe does not see decoding at all"


def test_internal_errors_do_not_leak_details(tiny_bundle, hostile_corpus, monkeypatch):
    from detector_server._proto import detector_pb2 as pb
    from detector_server._proto import detector_pb2_grpc as pb_grpc
    from detector_server.detector import Detector
    from detector_server.model_host import ModelHost
    from detector_server.server import start_background

    class Broken(Detector):
        def score_arrays(self, images):
            raise RuntimeError("secret at /srv/models/private/path")

    real_build = ModelHost._build_detector

    def build(self):                    # breaks after the warm-up batch, on the first request
        det = real_build(self)
        det.__class__ = Broken
        return det

    monkeypatch.setattr(ModelHost, "_build_detector", build)
    with start_background(tiny_bundle, device="cpu", threads=1) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.DetectorStub(ch).Score(
                pb.ScoreRequest(images=[pb.Image(id="a", data=hostile_corpus[0].data)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in e.value.details() and "/srv" not in e.value.details()
