"""Bundles with approximate indexes and Mahalanobis scorers: search parameters stored, applied,
overridden (Detector, rwood-score --search) and reported; short queries counted; version 1
manifests still load; the model version follows the scorer and its settings; the Mahalanobis
files read within bundle_files' bounds; refusals."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import real_images
from ann_data import ivf_bundle, publish
from click.testing import CliRunner
from PIL import Image

from detector_server.bank_edit import remove_rows
from detector_server.bank_info import bank_info
from detector_server.bundle import (
    MANIFEST_FILE,
    IndexInfo,
    MahalanobisInfo,
    Manifest,
    load_bundle,
    manifest_digest,
    version_name,
)
from detector_server.detector import Detector
from detector_server.errors import BundleError, InputError
from detector_server.mahalanobis import fit_mahalanobis
from detector_server.score_cli import score_main
from detector_server.score_table import read_rows


@pytest.fixture(scope="module")
def images(id_images: np.ndarray) -> np.ndarray:
    return id_images[:200]


def test_search_params_survive_save_and_load_and_win_over_the_file(tiny_bundle: Path,
                                                                   tmp_path: Path) -> None:
    out = ivf_bundle(tiny_bundle, tmp_path / "b", "IVF16,Flat", {"nprobe": 5}, {"nprobe": 1})
    m = load_bundle(out).manifest
    assert m.index.search_params == {"nprobe": 5} and m.index.factory == "IVF16,Flat"
    info = Detector(out, device="cpu", threads=1).info()["scorer"]
    assert info["search_params"] == {"nprobe": 5} and info["kind"] == "ivf"
    assert info["type"] == "IndexIVFFlat" and info["rows"] == m.index.ntotal
    assert info["bytes"] > m.index.ntotal * m.index.dim * 4 and info["nlist"] == 16


def test_override_is_applied_and_logged(tiny_bundle: Path, tmp_path: Path, caplog) -> None:
    out = ivf_bundle(tiny_bundle, tmp_path / "b", "IVF16,Flat", {"nprobe": 5})
    with caplog.at_level(logging.WARNING, logger="detector_server.scorer"):
        det = Detector(out, device="cpu", threads=1, search_params={"nprobe": 16})
    assert det.info()["scorer"]["search_params"] == {"nprobe": 16}
    assert "{'nprobe': 16} override the bundle's {'nprobe': 5}" in caplog.text
    with pytest.raises(InputError, match="no search parameter 'efSearch'") as e:
        Detector(out, device="cpu", threads=1, search_params={"efSearch": 16})
    assert e.value.field == "search"
    with pytest.raises(InputError, match="exact search") as e:
        Detector(tiny_bundle, device="cpu", threads=1, search_params={"nprobe": 2})
    assert e.value.field == "search"


def test_short_queries_are_counted_and_logged(tiny_bundle: Path, tmp_path: Path, images,
                                              caplog) -> None:
    """A hand-made bundle export would refuse: 64 cells of ~15 rows, nprobe 1, K = 100."""
    out = ivf_bundle(tiny_bundle, tmp_path / "b", "IVF64,Flat", {"nprobe": 1}, k=100)
    det = Detector(out, device="cpu", threads=1)
    with caplog.at_level(logging.WARNING, logger="detector_server.knn"):
        batch = det.score_arrays(images)
    assert batch.short.all() and (batch.scores == -2).all()
    s = det.info()["scorer"]
    assert s["queries"] == len(images) and s["short_queries"] == len(images)
    assert "200 of 200 queries so far got fewer than K=100 neighbours" in caplog.text
    assert not Detector(tiny_bundle, device="cpu", threads=1).score_arrays(images).short.any()


def test_bad_search_params_in_a_manifest_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    raw = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    raw["index"]["search_params"] = {"nprobe": 0}
    with pytest.raises(BundleError, match="field 'index.search_params'"):
        Manifest.from_dict(raw)
    out = ivf_bundle(tiny_bundle, tmp_path / "b", "IVF16,Flat", {"efSearch": 8})
    with pytest.raises(BundleError, match="no search parameter 'efSearch'") as e:
        Detector(out, device="cpu", threads=1)
    assert e.value.path == str(out / "index.faiss")


def test_version_1_manifest_still_loads(tiny_bundle: Path, tmp_path: Path, images) -> None:
    """A bundle written before search parameters and scorers existed (Flat, KNN)."""
    out = Path(shutil.copytree(tiny_bundle, tmp_path / "v1"))
    raw = json.loads((out / MANIFEST_FILE).read_text())
    for key in ("scorer", "mahalanobis"):
        del raw[key]
    for key in ("search_params", "choice", "check"):
        del raw["index"][key]
    raw["format_version"] = 1
    raw["manifest_sha256"] = manifest_digest(raw)
    (out / MANIFEST_FILE).write_text(json.dumps(raw))
    m = load_bundle(out).manifest
    assert m.format_version == 1 and m.scorer == "knn" and m.index.search_params == {}
    np.testing.assert_array_equal(Detector(out, device="cpu", threads=1).score_arrays(images).scores,
                                  Detector(tiny_bundle, device="cpu", threads=1)
                                  .score_arrays(images).scores)


def _mahalanobis_bundle(tiny_run: Path, tiny_bundle: Path, out: Path,
                        write=None) -> tuple[Path, Manifest]:
    m = load_bundle(tiny_bundle, verify_model=False).manifest
    with np.load(tiny_run / "bank.npz") as f:
        means, precision = fit_mahalanobis(f["penultimate"], f["labels"], len(m.class_names))
    mm = dataclasses.replace(m, scorer="mahalanobis", index=None, k=None, bank=None,
                             mahalanobis=MahalanobisInfo(m.index.dim, m.index.ntotal))
    files = {"mahalanobis_means.npy": lambda p: np.save(p, means),
             "mahalanobis_precision.npy": lambda p: np.save(p, precision), **(write or {})}
    return publish(tiny_bundle, out, mm, files), mm


def test_mahalanobis_bundle_scores_with_the_nearest_mean(tiny_run: Path, tiny_bundle: Path,
                                                         tmp_path: Path, images) -> None:
    out, _ = _mahalanobis_bundle(tiny_run, tiny_bundle, tmp_path / "m")
    b = load_bundle(out)
    assert b.labels is None and set(b.manifest.files) == {
        "model.onnx", "mahalanobis_means.npy", "mahalanobis_precision.npy",
        "calibration_scores.npy"}
    det = Detector(b, device="cpu", threads=1)
    means, precision = b.read_mahalanobis()
    emb = det.embed(images).astype(np.float64)
    d = np.array([[(x - mu) @ precision @ (x - mu) for mu in means] for x in emb])
    batch = det.score_arrays(images)
    np.testing.assert_allclose(batch.scores, -d.min(1), rtol=1e-5)
    np.testing.assert_array_equal(batch.predicted, d.argmin(1))
    s = det.info()["scorer"]
    assert s["scorer"] == s["kind"] == "mahalanobis" and s["rows"] == 10 and det.k is None
    with pytest.raises(InputError, match="no search parameters"):
        Detector(b, device="cpu", threads=1, search_params={"nprobe": 1})
    # no bank rows behind a mahalanobis score: no neighbours, nothing for rwood-bank to edit
    assert det.max_neighbors == 0
    with pytest.raises(InputError, match=r"neighbors.*\[0, 0\]"):
        det.score_arrays(images, neighbors=1)
    with pytest.raises(BundleError, match="no bank rows") as e:
        bank_info(out)
    assert e.value.field == "scorer"
    with pytest.raises(BundleError, match="no bank rows"):
        remove_rows(out, tmp_path / "edited", label="0")
    assert not (tmp_path / "edited").exists()
    with pytest.raises(BundleError, match="must be null for the mahalanobis scorer") as e:
        dataclasses.replace(b.manifest, bank=load_bundle(tiny_bundle).manifest.bank)
    assert e.value.field == "bank"


def test_mahalanobis_manifest_and_file_refusals(tiny_run: Path, tiny_bundle: Path,
                                                tmp_path: Path) -> None:
    out, mm = _mahalanobis_bundle(tiny_run, tiny_bundle, tmp_path / "m")
    raw = json.loads((out / MANIFEST_FILE).read_text())
    for edit, fld in ((lambda d: d.update(index={"ntotal": 1, "dim": 128}), "index"),
                      (lambda d: d.update(mahalanobis=None), "mahalanobis"),
                      (lambda d: d.update(k=10), "k"), (lambda d: d.update(scorer="lof"), "scorer"),
                      (lambda d: d["mahalanobis"].update(dim=64), "mahalanobis.dim")):
        bad = json.loads(json.dumps(raw))
        edit(bad)
        with pytest.raises(BundleError, match=f"field '{fld}'"):
            Manifest.from_dict(bad)
    wrong = _mahalanobis_bundle(tiny_run, tiny_bundle, tmp_path / "w", write={
        "mahalanobis_means.npy": lambda p: np.save(p, np.zeros((10, 128), np.float32))})[0]
    with pytest.raises(BundleError, match=r"expected float64 \[10, 128\], got float32") as e:
        Detector(wrong, device="cpu", threads=1)
    assert e.value.path == str(wrong / "mahalanobis_means.npy")
    nan = _mahalanobis_bundle(tiny_run, tiny_bundle, tmp_path / "n", write={
        "mahalanobis_precision.npy": lambda p: np.save(p, np.full((128, 128), np.nan))})[0]
    with pytest.raises(BundleError, match="NaN or infinity") as e:
        Detector(nan, device="cpu", threads=1)
    assert e.value.path == str(nan / "mahalanobis_precision.npy")
    assert IndexInfo(1, 1).search_params == {}          # older bundles: no parameters


def test_search_params_check_and_scorer_count_in_the_model_version(tiny_run: Path,
                                                                   tiny_bundle: Path,
                                                                   tmp_path: Path) -> None:
    """Every manifest field but DESCRIPTIVE_FIELDS counts in model_version: the very same files
    with another nprobe, another export check or another choice are another model, and so is
    the Mahalanobis scorer of the same run; the export time and training metadata are not."""
    a = ivf_bundle(tiny_bundle, tmp_path / "a", "IVF16,Flat", {"nprobe": 5})
    ma = load_bundle(a).manifest
    same_files = {n: (lambda p, n=n: shutil.copy(a / n, p)) for n in ("index.faiss", "labels.npy")}
    variants = {"nprobe6": {"search_params": {"nprobe": 6}},
                "check": {"check": {"recall_kth": 0.999}},
                "choice": {"choice": {"requested": "IVF16,Flat", "reason": "as requested"}}}
    versions = {"knn": ma.model_version}
    for what, change in variants.items():
        m = dataclasses.replace(ma, index=dataclasses.replace(ma.index, **change))
        got = load_bundle(publish(a, tmp_path / what, m, same_files)).manifest
        assert got.files == ma.files                       # every payload byte equal
        versions[what] = got.model_version
    versions["mahalanobis"] = _mahalanobis_bundle(tiny_run, tiny_bundle, tmp_path / "m")[0]
    versions["mahalanobis"] = load_bundle(versions["mahalanobis"]).manifest.model_version
    assert len(set(versions.values())) == len(versions), versions
    assert {version_name(v) for v in versions.values()} == {tiny_run.name}
    described = dataclasses.replace(ma, created="2000-01-01T00:00:00", training={"note": "x"})
    again = load_bundle(publish(a, tmp_path / "described", described, same_files)).manifest
    assert again.model_version == ma.model_version


def test_mahalanobis_files_are_read_within_bounds_never_through_links(
        tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """The parameters go through bundle_files.read_npy like labels.npy: with recomputed checksums
    (whoever can write the bundle can), a header declaring 10^12 values is refused before any
    data is allocated, a truncated file from its size, and a symbolic link is never followed."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    huge = _mahalanobis_bundle(tiny_run, tiny_bundle, tmp_path / "huge", write={
        "mahalanobis_precision.npy": lambda p: p.write_bytes(_npy(header))})[0]
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match=r"expected float64 \[128, 128\], got float64 "
                       r"\(1000000, 1000000\)") as e:
        Detector(huge, device="cpu", threads=1)
    assert e.value.path == str(huge / "mahalanobis_precision.npy")
    assert time.perf_counter() - t0 < 5.0
    cut = _mahalanobis_bundle(tiny_run, tiny_bundle, tmp_path / "cut", write={
        "mahalanobis_means.npy": lambda p: p.write_bytes(_saved(np.zeros((10, 128)))[:-8])})[0]
    with pytest.raises(BundleError, match="truncated or padded") as e:
        Detector(cut, device="cpu", threads=1)
    assert e.value.path == str(cut / "mahalanobis_means.npy")
    outside = tmp_path / "means_elsewhere.npy"
    np.save(outside, np.zeros((10, 128)))
    linked = _mahalanobis_bundle(tiny_run, tiny_bundle, tmp_path / "link", write={
        "mahalanobis_means.npy": lambda p: p.symlink_to(outside)})[0]
    with pytest.raises(BundleError, match="symbolic link") as e:
        load_bundle(linked)
    assert e.value.path == str(linked / "mahalanobis_means.npy")


def _npy(header: str) -> bytes:
    """A version 1.0 .npy file holding `header` (padded as numpy does) and no data."""
    h = header.encode("latin1")
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h


def _saved(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_rwood_score_search_overrides_the_bundle_and_names_the_flag(tiny_bundle: Path,
                                                                  tmp_path: Path) -> None:
    """rwood-score --search reaches the index: the bundle's nprobe 1 leaves every query short of
    K = 100 neighbours (score -2), nprobe 64 (every cell) scores them all. The rows of the
    override carry the bundle's version plus the override, so --resume never mixes the two."""
    out = ivf_bundle(tiny_bundle, tmp_path / "b", "IVF64,Flat", {"nprobe": 1}, k=100)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(real_images.digits_unseen()[:6]):
        Image.fromarray(img).save(folder / f"d{i}.png")
    scores = {}
    for name, extra in (("bundle", []), ("override", ["--search", "nprobe=64"])):
        table = tmp_path / f"{name}.csv"
        res = CliRunner().invoke(score_main, [str(out), str(folder), "--out", str(table),
                                              "--workers", "0", "--no-progress", *extra])
        assert res.exit_code == 0, res.output
        rows = read_rows(table)
        assert len(rows) == 6 and not any(r.error for r in rows)
        version = load_bundle(out).manifest.model_version + ("+nprobe=64" if extra else "")
        assert {r.model_version for r in rows} == {version}
        scores[name] = np.array([r.score for r in rows])
    assert (scores["bundle"] == -2).all() and (scores["override"] > -2).all()
    res = CliRunner().invoke(score_main, [str(out), str(folder), "--out",
                                          str(tmp_path / "override.csv"), "--resume",
                                          "--no-progress", "--search", "nprobe=32"])
    assert res.exit_code == 2 and "+nprobe=64" in res.output and "+nprobe=32" in res.output
    res = CliRunner().invoke(score_main, [str(out), str(folder), "--out",   # the recorded value
                                          str(tmp_path / "bundle.csv"), "--resume",
                                          "--no-progress", "--search", "nprobe=1"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(score_main, [str(out), str(folder), "--out", str(tmp_path / "x.csv"),
                                          "--search", "nprobe"])
    assert res.exit_code == 2 and "error: --search: expected NAME=INTEGER" in res.output
