"""The bundle format: round trip, atomic write, every refusal of `load_bundle` naming the file."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from detector_server.bundle import (
    DESCRIPTIVE_FIELDS,
    FORMAT_VERSION,
    MANIFEST_FILE,
    Bundle,
    Manifest,
    decision_digest,
    derive_model_version,
    load_bundle,
    manifest_digest,
    staging_dir,
    version_name,
    write_bundle,
)
from detector_server.errors import BundleError
from detector_server.manifest import DESCRIPTIVE_BANK_FIELDS

PAYLOAD = ("model.onnx", "index.faiss", "labels.npy", "calibration_scores.npy", "sources.json",
           "calibration_embeddings.npy")


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the exported tiny bundle."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _manifest(path: Path) -> Manifest:
    return load_bundle(path, verify_model=False).manifest


def _republish(src: Path, manifest: Manifest, out: Path, edit=None) -> Path:
    """Copy the payload of `src` to a staging dir, apply `edit(stage)`, write with `manifest`."""
    with staging_dir(out) as stage:
        for name in manifest.files:
            shutil.copy(src / name, stage / name)
        if edit is not None:
            edit(stage)
        return write_bundle(stage, manifest, out)


def test_load_exported_bundle(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    m = b.manifest
    assert m.format_version == FORMAT_VERSION and m.served_file == "model.onnx"
    assert set(m.files) == set(PAYLOAD)
    assert b.labels.dtype == np.int64 and b.labels.shape == (m.index.ntotal,)
    assert m.outputs[m.indexed_output] == m.index.dim
    assert m.spec.size == m.input_size == 32
    index = b.read_index()
    assert (index.ntotal, index.d) == (m.index.ntotal, m.index.dim)


def test_manifest_round_trip(tiny_bundle: Path) -> None:
    raw = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    m = Manifest.from_dict(raw)
    assert m.to_dict() == raw
    assert manifest_digest(raw) == raw["manifest_sha256"]


@pytest.mark.parametrize("name", PAYLOAD)
def test_altered_file_refused(bundle_copy: Path, name: str) -> None:
    f = bundle_copy / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01                       # one flipped bit
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256 differs") as e:
        load_bundle(bundle_copy)
    assert e.value.path == str(f)


@pytest.mark.parametrize("name", PAYLOAD + (MANIFEST_FILE,))
def test_missing_file_refused(bundle_copy: Path, name: str) -> None:
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError, match="missing") as e:
        load_bundle(bundle_copy)
    assert e.value.path == str(bundle_copy / name)


def test_edited_manifest_refused(bundle_copy: Path) -> None:
    path = bundle_copy / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["threshold"]["value"] -= 0.1
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="edited after export") as e:
        load_bundle(bundle_copy)
    assert e.value.path == str(path)


def test_corrupt_manifest_refused(bundle_copy: Path) -> None:
    path = bundle_copy / MANIFEST_FILE
    path.write_text(path.read_text()[:-20])
    with pytest.raises(BundleError, match="unreadable manifest") as e:
        load_bundle(bundle_copy)
    assert e.value.path == str(path)


@pytest.mark.parametrize("key,value,match", [
    ("format_version", FORMAT_VERSION + 1, "unknown format version"),
    ("format", "something-else", "not a reweightood bundle"),
])
def test_unknown_format_refused(bundle_copy: Path, key: str, value, match: str) -> None:
    path = bundle_copy / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw[key] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=match) as e:
        load_bundle(bundle_copy)
    assert e.value.path == str(path)


def test_not_a_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.update(model_file="../model.onnx"), "model_file"),
    (lambda d: d.update(k=10_000), "k"),
    (lambda d: d["index"].update(feature="logits"), "index.feature"),
    (lambda d: d["index"].update(dim=7), "index.dim"),
    (lambda d: d["threshold"].update(achieved_tpr=1.5), "threshold.achieved_tpr"),
    (lambda d: d.update(input_size=64), "input_size"),
    (lambda d: d.pop("k"), "k"),
    (lambda d: d["index"].update(extra=1), "index"),
    (lambda d: d.update(outputs={"feature": "128", "projection": 128}), "outputs"),
    (lambda d: d.update(class_names="airplane"), "class_names"),
    (lambda d: d.update(model_version=""), "model_version"),
    (lambda d: d["training"].update(lr=float("nan")), "training"),
    (lambda d: d.update(quantization={"scale": float("inf")}), "quantization"),
])
def test_invalid_manifest_fields_refused(tiny_bundle: Path, edit, field: str) -> None:
    raw = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    edit(raw)
    with pytest.raises(BundleError) as e:
        Manifest.from_dict(raw, "manifest.json")
    assert e.value.path == "manifest.json" and f"'{field}'" in str(e.value)


def test_nan_in_free_form_manifest_field_is_a_bundle_error(bundle_copy: Path) -> None:
    """Python's json reads NaN; the manifest checksum (strict JSON) cannot: refused as a
    BundleError naming the file and field, never a bare ValueError."""
    path = bundle_copy / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["training"]["config"]["lr"] = float("nan")
    path.write_text(json.dumps(raw))
    assert "NaN" in path.read_text()
    with pytest.raises(BundleError, match="NaN") as e:
        load_bundle(bundle_copy)
    assert e.value.path == str(path) and "field 'training'" in str(e.value)


def test_outputs_not_matching_manifest_refused(bundle_copy: Path, tmp_path: Path) -> None:
    m = _manifest(bundle_copy)
    # The manifest claims a projection width the model does not have.
    wrong = dataclasses.replace(m, outputs={**m.outputs, "projection": 64})
    out = _republish(bundle_copy, wrong, tmp_path / "wrong_width")
    with pytest.raises(BundleError, match="width 128, manifest says 64") as e:
        load_bundle(out)
    assert e.value.path == str(out / "model.onnx")

    # The model lacks an output the manifest names.
    def rename_output(stage: Path) -> None:
        proto = onnx.load(str(stage / "model.onnx"))
        for node in proto.graph.node:
            node.output[:] = ["proj" if o == "projection" else o for o in node.output]
        proto.graph.output[1].name = "proj"
        onnx.save(proto, str(stage / "model.onnx"))
    out = _republish(bundle_copy, m, tmp_path / "renamed", edit=rename_output)
    with pytest.raises(BundleError, match="no output 'projection'") as e:
        load_bundle(out)
    assert e.value.path == str(out / "model.onnx")
    assert load_bundle(out, verify_model=False)  # checksums alone cannot see it


def test_labels_out_of_range_refused(bundle_copy: Path, tmp_path: Path) -> None:
    m = _manifest(bundle_copy)
    out = _republish(bundle_copy, m, tmp_path / "labels", edit=lambda s: np.save(
        s / "labels.npy", np.full(m.index.ntotal, len(m.class_names), np.int64)))
    with pytest.raises(BundleError, match="labels outside") as e:
        load_bundle(out)
    assert e.value.path == str(out / "labels.npy")


def test_read_index_checks_manifest(bundle_copy: Path) -> None:
    b = load_bundle(bundle_copy, verify_model=False)
    m = b.manifest
    small = dataclasses.replace(m, k=5, index=dataclasses.replace(m.index, ntotal=5))
    with pytest.raises(BundleError, match="index holds") as e:
        Bundle(b.path, small, b.labels[:5]).read_index()
    assert e.value.path == str(b.index_path)


def test_write_bundle_refuses_existing_unless_overwrite(bundle_copy: Path, tmp_path: Path) -> None:
    m = _manifest(bundle_copy)
    out = _republish(bundle_copy, m, tmp_path / "out")
    with pytest.raises(BundleError, match="already exists") as e:
        _republish(bundle_copy, m, out)
    assert e.value.path == str(out)
    with staging_dir(out) as stage:
        for name in m.files:
            shutil.copy(bundle_copy / name, stage / name)
        write_bundle(stage, dataclasses.replace(m, k=3), out, overwrite=True)
    assert load_bundle(out).manifest.k == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "out"]  # nothing left over


def test_write_bundle_never_replaces_a_non_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        with staging_dir(precious) as stage:
            write_bundle(stage, _manifest(bundle_copy), precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_write_bundle_refuses_incomplete_staging(bundle_copy: Path, tmp_path: Path) -> None:
    m = _manifest(bundle_copy)
    out = tmp_path / "out"
    with pytest.raises(BundleError, match="lacks a file") as e:
        _republish(bundle_copy, m, out, edit=lambda s: (s / "index.faiss").unlink())
    assert e.value.path.endswith("index.faiss")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_interrupted_write_leaves_nothing(bundle_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(out) as stage:
            shutil.copy(bundle_copy / "model.onnx", stage / "model.onnx")
            raise KeyboardInterrupt  # e.g. Ctrl-C halfway through an export
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bundle"]


# ---------------------------------------------------------------------------- model_version
def _leaves(value, path=()):
    """(path, value) of every scalar in a JSON value, lists and objects walked."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))
    else:
        yield path, value


def _changed(value):
    if isinstance(value, bool) or value is None:
        return not value
    return value + 1 if isinstance(value, (int, float)) else f"{value}x"


def test_decision_digest_follows_every_field_but_the_descriptive_ones(tiny_bundle: Path) -> None:
    """Generic over the manifest: a field added later counts without anyone listing it."""
    raw = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    base = decision_digest(raw)
    leaves = list(_leaves(raw))
    assert len(leaves) > 40 and {p[0] for p, _ in leaves} >= {"k", "threshold", "index", "files"}
    for path, value in leaves:
        edited = json.loads(json.dumps(raw))
        node = edited
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _changed(value)
        counts = path[0] not in DESCRIPTIVE_FIELDS and path[:2] not in [
            ("bank", f) for f in DESCRIPTIVE_BANK_FIELDS]
        assert (decision_digest(edited) != base) == counts, path
    # the bank's edit history is descriptive; where its files are is not
    edited = json.loads(json.dumps(raw))
    edited["bank"]["lineage"] = [{"op": "add", "parent": "x", "when": "2026-01-01T00:00:00"}]
    assert decision_digest(edited) == base
    edited["bank"]["sources_file"] = "other.json"
    assert decision_digest(edited) != base
    with pytest.raises(ValueError, match="files"):
        decision_digest({**raw, "files": {}})


def test_write_bundle_derives_the_version(bundle_copy: Path, tmp_path: Path) -> None:
    m = _manifest(bundle_copy)
    name = version_name(m.model_version)
    assert m.model_version == derive_model_version(name, m.to_dict()) != name
    same = _manifest(_republish(bundle_copy, dataclasses.replace(
        m, created="2001-01-01", training={}, model_version="anything"), tmp_path / "same"))
    assert same.model_version == f"anything-{m.model_version[-12:]}"   # nothing decisive changed
    again = _manifest(_republish(bundle_copy, m, tmp_path / "again"))
    assert again.model_version == m.model_version                      # the name is kept
    for i, edit in enumerate((dict(k=3), dict(threshold=dataclasses.replace(m.threshold,
                                                                            value=-0.5)))):
        other = _manifest(_republish(bundle_copy, dataclasses.replace(m, **edit),
                                     tmp_path / f"other{i}"))
        assert other.model_version.startswith(f"{name}-") and other.model_version != m.model_version
    labels = _manifest(_republish(bundle_copy, m, tmp_path / "labels", edit=lambda s: np.save(
        s / "labels.npy", np.roll(np.load(s / "labels.npy"), 1))))
    assert labels.model_version != m.model_version
    with staging_dir(tmp_path / "named") as stage:
        for f in m.files:
            shutil.copy(bundle_copy / f, stage / f)
        write_bundle(stage, m, tmp_path / "named", name="v2")
    assert _manifest(tmp_path / "named").model_version == f"v2-{m.model_version[-12:]}"
