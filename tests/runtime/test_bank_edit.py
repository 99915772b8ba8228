"""rwood-bank (detector_server.bank_edit, bank_index, bank_info, bank_sources, image_sets, bank_cli)
on the tiny digits bundle, with crops of photographs as the class it was not trained on.

add (npz, class folders, flat folder), remove (by class, by source glob), info, a new class,
lineage, the kept and the recalibrated threshold, IVF/PQ/HNSW indexes, an older bundle without
sources, atomic replacement under a reader, the runtime alone (no torch), and every documented
error.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import real_images
from click.testing import CliRunner

from detector_server import bank_index
from detector_server._faiss import faiss
from detector_server.bank_cli import bank_main
from detector_server.bank_edit import add_images, remove_rows
from detector_server.bank_info import bank_info
from detector_server.bank_sources import BankSources
from detector_server.bundle import load_bundle, staging_dir, write_bundle
from detector_server.detector import Detector
from detector_server.errors import BundleError, DataError, InputError
from detector_server.knn import build_index

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photos(ood_images: np.ndarray) -> np.ndarray:
    """300 crops of two photographs: a class the digits model never saw ("photo")."""
    return ood_images


@pytest.fixture(scope="module")
def digits(id_images: np.ndarray) -> np.ndarray:
    """755 digits the tiny run never saw (not trained, banked or calibrated on)."""
    return id_images


@pytest.fixture(scope="module")
def unseen_by_class(digits_small: dict) -> dict[str, np.ndarray]:
    """Training digits the tiny run never saw, by their true class ("0".."9")."""
    rows = slice(real_images.TINY_RUN_ROWS, None)
    images, labels = digits_small["images"][rows], digits_small["labels"][rows]
    return {str(c): images[labels == c] for c in range(10)}


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def _npz(path: Path, images: np.ndarray, names: list[str]) -> Path:
    classes = sorted(set(names))
    np.savez(path, images=images, labels=np.array([classes.index(n) for n in names]),
             classes=np.array(classes))
    return path


def _folder(root: Path, per_class: dict[str, np.ndarray]) -> Path:
    for name, images in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(images):
            (root / name / f"{i:03d}.png").write_bytes(real_images.png_bytes(a))
    return root


# ---- add ------------------------------------------------------------------------------------
def test_add_new_class_from_npz(bundle, tmp_path, photos, tiny_bundle):
    data = _npz(tmp_path / "photo.npz", photos[:60], ["photo"] * 60)
    before = load_bundle(bundle)
    held_out = photos[60:]
    old = Detector(before, device="cpu", threads=1).score_arrays(held_out)
    report = add_images(bundle, data, tmp_path / "new")
    b = load_bundle(tmp_path / "new")
    m = b.manifest
    # the rows, their labels and sources
    assert m.index.ntotal == before.manifest.index.ntotal + 60 == report.rows_after
    assert m.class_names == before.manifest.class_names + ("photo",)
    np.testing.assert_array_equal(b.labels[:-60], before.labels)
    assert (b.labels[-60:] == len(m.class_names) - 1).all()
    src = b.sources()
    assert src.describe(len(src) - 60) == "photo#0" and src.describe(0) == before.sources().describe(0)
    assert src.counts() == {"train": before.manifest.index.ntotal, "photo": 60}
    # lineage and version
    assert m.model_version == report.model_version != before.manifest.model_version
    assert m.model_version.startswith(before.manifest.model_version + "+bank-")
    (entry,) = m.bank.lineage
    assert entry["op"] == "add" and entry["parent"] == before.manifest.model_version
    assert entry["rows"] == 60 and entry["new_classes"] == ["photo"]
    assert entry["from"] == f"npz:{data.resolve()}" and "version" not in entry
    # the threshold is kept; the calibration TPR at it can only rise when rows are added
    t = entry["threshold"]
    assert t["mode"] == "kept" and m.threshold.value == before.manifest.threshold.value
    assert t["n"] == before.manifest.threshold.n_samples
    assert t["calibration_tpr_after"] >= t["calibration_tpr_before"]
    assert m.threshold.achieved_tpr == t["calibration_tpr_after"]
    # the held-out images of the new class: accepted more often, and called "photo"
    new = Detector(b, device="cpu", threads=1).score_arrays(held_out)
    print(f"\nheld-out photo crops: OOD {np.mean(old.is_ood):.3f} -> {np.mean(new.is_ood):.3f},"
          f" predicted photo {np.mean(new.predicted == len(m.class_names) - 1):.3f}")
    # crops of two photographs at many scales are a loose class: 60 of them move some held-out
    # crops inside the threshold and most to the new label (the demo's digit 6: test_bank_digits)
    assert np.mean(new.is_ood) < np.mean(old.is_ood)
    assert np.mean(new.predicted == len(m.class_names) - 1) > 0.5
    # the drift reference: the stored calibration images scored on the edited bank
    det = Detector(b, device="cpu", threads=1)
    np.testing.assert_allclose(b.calibration_scores(),
                               det.score_embeddings(b.calibration_embeddings()).scores, atol=1e-6)
    assert not np.array_equal(b.calibration_scores(), before.calibration_scores()) or \
        t["calibration_tpr_after"] == t["calibration_tpr_before"]
    assert "added 60 rows" in report.describe() and "new classes photo" in report.describe()
    assert load_bundle(tiny_bundle).manifest == before.manifest      # the parent is untouched


def test_add_known_class_from_folders_records_paths(bundle, tmp_path, unseen_by_class):
    data = _folder(tmp_path / "cam2", {"3": unseen_by_class["3"][:3], "7": unseen_by_class["7"][:2]})
    report = add_images(bundle, data, tmp_path / "new")
    b = load_bundle(tmp_path / "new")
    names = list(b.manifest.class_names)
    assert b.manifest.class_names == load_bundle(bundle).manifest.class_names   # no new class
    assert [names[c] for c in b.labels[-5:]] == ["3"] * 3 + ["7"] * 2
    src = b.sources()
    assert [src.describe(i) for i in range(len(src) - 5, len(src))] == [
        "cam2/3/000.png", "cam2/3/001.png", "cam2/3/002.png", "cam2/7/000.png",
        "cam2/7/001.png"]
    # the new rows are their images' own nearest neighbours, with their source
    det = Detector(b, device="cpu", threads=1)
    (r,) = det.score_images([(data / "7" / "001.png").read_bytes()], neighbors=2)
    assert r.neighbors[0].source == "cam2/7/001.png" and r.neighbors[0].label == "7"
    assert r.neighbors[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert report.entry["classes"] == {"3": 3, "7": 2} and not report.entry["new_classes"]


def test_add_flat_folder_with_label_twice_gets_unique_origins(bundle, tmp_path, photos):
    flat = tmp_path / "scans"
    flat.mkdir()
    for i, a in enumerate(photos[200:][:4]):
        (flat / f"{i}.png").write_bytes(real_images.png_bytes(a))
    first = add_images(bundle, flat, tmp_path / "v1", label="crops")
    add_images(tmp_path / "v1", flat, tmp_path / "v2", label="crops")
    b = load_bundle(tmp_path / "v2")
    assert b.sources().counts() == {"train": len(b.labels) - 8, "scans": 4, "scans-2": 4}
    assert b.manifest.class_names.count("crops") == 1
    lineage = b.manifest.bank.lineage
    assert [e["parent"] for e in lineage] == [load_bundle(bundle).manifest.model_version,
                                              first.model_version]
    root = load_bundle(bundle).manifest.model_version      # versions stay "<export>+bank-..."
    assert b.manifest.model_version.startswith(root + "+bank-") and "+bank-" not in root


# ---- remove ---------------------------------------------------------------------------------
def test_remove_label_restores_the_exported_bank(bundle, tmp_path, photos, digits):
    data = _npz(tmp_path / "photo.npz", photos[:30], ["photo"] * 30)
    add_images(bundle, data, tmp_path / "added")
    report = remove_rows(tmp_path / "added", tmp_path / "removed", label="photo")
    b, original = load_bundle(tmp_path / "removed"), load_bundle(bundle)
    assert b.manifest.class_names == original.manifest.class_names      # trailing class dropped
    assert report.entry["dropped_classes"] == ["photo"] and report.entry["rows"] == 30
    np.testing.assert_array_equal(b.labels, original.labels)
    assert b.sources().counts() == {"train": len(original.labels)}
    new = Detector(b, device="cpu", threads=1).score_arrays(digits[:200])
    ref = Detector(original, device="cpu", threads=1).score_arrays(digits[:200])
    np.testing.assert_array_equal(new.scores, ref.scores)
    t = report.entry["threshold"]
    assert t["calibration_tpr_after"] <= t["calibration_tpr_before"]   # fewer rows, lower scores
    assert [e["op"] for e in b.manifest.bank.lineage] == ["add", "remove"]


def test_remove_by_source_glob(bundle, tmp_path, unseen_by_class):
    data = _folder(tmp_path / "cam2", {"3": unseen_by_class["3"][:3], "7": unseen_by_class["7"][:2]})
    add_images(bundle, data, tmp_path / "added")
    remove_rows(tmp_path / "added", tmp_path / "removed", source="cam2/7/*")
    src = load_bundle(tmp_path / "removed").sources()
    assert src.counts()["cam2"] == 3 and not src.matches("cam2/7/*").any()
    # training rows by their index: "train#1*" is rows 1, 10-19, 100-199, ...
    before = load_bundle(bundle).sources()
    hit = before.matches("train#1*")
    remove_rows(bundle, tmp_path / "fewer", source="train#1*")
    assert len(load_bundle(tmp_path / "fewer").labels) == len(before) - hit.sum() > 0


# ---- info -----------------------------------------------------------------------------------
def test_info_and_cli(bundle, tmp_path, photos):
    data = _npz(tmp_path / "photo.npz", photos[:20], ["photo"] * 20)
    runner = CliRunner()
    res = runner.invoke(bank_main, ["add", str(bundle), str(data), "--out", str(tmp_path / "new")])
    assert res.exit_code == 0, res.output
    assert "new classes photo" in res.output and "calibration TPR" in res.output
    info = bank_info(tmp_path / "new")
    assert info["classes"]["photo"] == 20 and info["rows"] == sum(info["classes"].values())
    assert info["sources"] == {"train": info["rows"] - 20, "photo": 20}
    assert [e["op"] for e in info["lineage"]] == ["add"] and info["warnings"] == []
    assert info["lineage"][0]["version"] == info["model_version"]
    text = runner.invoke(bank_main, ["info", str(tmp_path / "new")]).output
    assert "rows per class" in text and "photo  20" in text and "+20 rows from npz:" in text
    as_json = json.loads(runner.invoke(bank_main, ["info", str(tmp_path / "new"), "--json"]).output)
    assert as_json["model_version"] == info["model_version"]
    res = runner.invoke(bank_main, ["remove", str(tmp_path / "new"), "--label", "photo",
                                    "--out", str(tmp_path / "new"), "--force"])
    assert res.exit_code == 0, res.output
    assert "removed 20 rows" in res.output and bank_info(tmp_path / "new")["rows"] == info["rows"] - 20


# ---- thresholds -----------------------------------------------------------------------------
def test_recalibrate_on_held_out_images(bundle, tmp_path, photos, digits):
    data = _npz(tmp_path / "photo.npz", photos[:50], ["photo"] * 50)
    cal = _folder(tmp_path / "cal", {"digits": digits[:200], "photo": photos[50:100]})
    report = add_images(bundle, data, tmp_path / "new", calibration=cal, tpr=0.9)
    m = load_bundle(tmp_path / "new").manifest
    t = report.entry["threshold"]
    assert t["mode"] == "recalibrated" and t["n"] == 250 == m.threshold.n_samples
    assert m.threshold.target_tpr == 0.9 and abs(m.threshold.achieved_tpr - 0.9) <= 0.01
    assert m.threshold.source == f"rwood-bank:folder:{cal.resolve()}"
    assert t["previous"] == load_bundle(bundle).manifest.threshold.value != m.threshold.value
    # the stored calibration embeddings are the new set: a later edit measures on it
    assert load_bundle(tmp_path / "new").calibration_embeddings().shape[0] == 250
    det = Detector(tmp_path / "new", device="cpu", threads=1)
    kept = ~det.score_arrays(np.concatenate([digits[:200], photos[50:100]])).is_ood
    assert np.mean(kept) == pytest.approx(m.threshold.achieved_tpr)


def test_calibration_images_in_the_bank_are_refused(bundle, tmp_path, photos, digits):
    data = _folder(tmp_path / "data", {"photo": photos[:30]})
    cal = _folder(tmp_path / "cal", {"digits": digits[:40]})
    shutil.copy(data / "photo" / "007.png", cal / "digits" / "sneaked.png")
    with pytest.raises(DataError, match="in the bank.*sneaked.png") as e:
        add_images(bundle, data, tmp_path / "new", calibration=cal)
    assert e.value.path == str(cal) and not (tmp_path / "new").exists()


# ---- index types ----------------------------------------------------------------------------
def _with_index(bundle: Path, out: Path, factory: str, search_params: dict | None = None,
                k: int | None = None) -> Path:
    """`bundle` with its rows in a `factory` index (written through write_bundle), served with
    `search_params` (none: faiss's defaults) and K = `k` (default: the bundle's)."""
    b = load_bundle(bundle)
    rows = b.read_index().reconstruct_n(0, b.manifest.index.ntotal)
    with staging_dir(out) as stage:
        for name in b.manifest.files:
            shutil.copy(bundle / name, stage / name)
        faiss.write_index(build_index(rows, factory), str(stage / b.manifest.index.file))
        index = dataclasses.replace(b.manifest.index, factory=factory,
                                    search_params=search_params or {})
        m = dataclasses.replace(b.manifest, index=index, k=k or b.manifest.k, files={})
        write_bundle(stage, m, out)
    return out


def test_edits_keep_the_search_parameters_and_refuse_short_queries(bundle, tmp_path, photos):
    """The edited bank is searched (and its calibration scored) with the bundle's own search
    parameters, which the new bundle keeps; an edit whose index would leave calibration images
    short of K neighbours is refused, as export refuses such an index."""
    data = _npz(tmp_path / "photo.npz", photos[:20], ["photo"] * 20)
    ok = _with_index(bundle, tmp_path / "ok", "IVF16,Flat", {"nprobe": 16}, k=50)
    add_images(ok, data, tmp_path / "ok2")
    edited = load_bundle(tmp_path / "ok2").manifest
    assert edited.index.search_params == {"nprobe": 16} and edited.k == 50
    info = bank_info(tmp_path / "ok2")
    assert info["search_params"] == {"nprobe": 16} and info["index_type"] == "IndexIVFFlat"
    assert info["index_bytes"] > 950 * 128 * 4
    # nprobe 1 visits one cell of ~60 rows: many calibration images get fewer than K = 50
    short = _with_index(bundle, tmp_path / "short", "IVF16,Flat", {"nprobe": 1}, k=50)
    with pytest.raises(BundleError, match="fewer than K=50 neighbours") as e:
        add_images(short, data, tmp_path / "short2")
    assert e.value.field == "index.search_params" and not (tmp_path / "short2").exists()


def test_ivf_add_keeps_the_quantiser_and_info_warns_about_far_rows(bundle, tmp_path, photos):
    ivf = _with_index(bundle, tmp_path / "ivf", "IVF16,Flat")
    parent = load_bundle(ivf).read_index()
    centroids = faiss.extract_index_ivf(parent).quantizer.reconstruct_n(0, 16)
    data = _npz(tmp_path / "photo.npz", photos[:40], ["photo"] * 40)
    report = add_images(ivf, data, tmp_path / "new")
    index = load_bundle(tmp_path / "new").read_index()
    assert index.ntotal == load_bundle(ivf).manifest.index.ntotal + 40
    np.testing.assert_array_equal(faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 16),
                                  centroids)
    fit = report.entry["index_fit"]
    assert fit["nlist"] == 16 and 0.0 <= fit["far_fraction"] <= 1.0
    print(f"\nIVF16: {fit['far_fraction']:.0%} of the added photos are far from the centroids "
          f"(median similarity {fit['added_median']:.3f} vs {fit['reference_median']:.3f})")
    assert fit["added_median"] < fit["reference_median"]
    # info warns exactly when the added rows are far (here: photo crops vs digit centroids)
    warned = any("IVF centroids" in w for w in bank_info(tmp_path / "new")["warnings"])
    assert warned == (fit["far_fraction"] > bank_index.FAR_FRACTION_WARN) == fit["warn"]
    # rows like the calibration images are not far
    close = bank_index.ivf_fit(index, load_bundle(ivf).calibration_embeddings(),
                               load_bundle(ivf).calibration_embeddings())
    assert close["far_fraction"] <= 0.06 and not close["warn"]


def _exhaustive(index) -> None:
    """Search settings under which approximate indexes find a stored row's own entry."""
    ivf = bank_index._ivf(index)
    if ivf is not None:
        ivf.nprobe = ivf.nlist
    if hasattr(faiss.downcast_index(index), "hnsw"):
        faiss.downcast_index(index).hnsw.efSearch = 512


def _stored(index) -> list:
    """What the index holds for each row id, in id order: (list, code) in an IVF index, the code
    in a flat-codes index (Flat, PQ), the vector (rounded) in an HNSW index."""
    ivf = bank_index._ivf(index)
    if ivf is not None:
        by_id, lists = {}, ivf.invlists
        for list_no in range(ivf.nlist):
            n = lists.list_size(list_no)
            ids = faiss.rev_swig_ptr(lists.get_ids(list_no), n).copy()
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), n * lists.code_size).copy()
            for i, code in zip(ids, codes.reshape(n, -1)):
                by_id[int(i)] = (list_no, code.tobytes())
        return [by_id[i] for i in range(index.ntotal)]
    inner = faiss.downcast_index(index)
    if hasattr(inner, "hnsw"):
        return [tuple(np.round(v, 3)) for v in index.reconstruct_n(0, index.ntotal)]
    return [c.tobytes() for c in faiss.vector_to_array(inner.codes).reshape(index.ntotal, -1)]


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ16x4", "PQ16x4", "HNSW16"])
def test_remove_keeps_rows_and_order_in_every_index_type(bundle, tmp_path, factory):
    path = _with_index(bundle, tmp_path / "b", factory)
    index = load_bundle(path).read_index()
    keep = np.ones(index.ntotal, bool)
    keep[::3] = False
    before = _stored(index)
    edited = bank_index.remove_rows(index, keep, factory)
    assert edited.ntotal == keep.sum()
    assert _stored(edited) == [entry for entry, k in zip(before, keep) if k]
    if "PQ" not in factory:                    # exact vectors: each kept row finds itself
        _exhaustive(edited)
        rows = load_bundle(bundle).read_index().reconstruct_n(0, len(keep))[keep]
        _, found = edited.search(rows[:100], 1)
        np.testing.assert_array_equal(found[:, 0], np.arange(100))


# ---- compatibility, atomicity, the runtime alone ---------------------------------------------
def test_bundle_without_sources_loads_and_can_be_edited(bundle, tmp_path, photos):
    b = load_bundle(bundle)
    old = tmp_path / "old"
    with staging_dir(old) as stage:            # as exported before sources existed
        for name in ("model.onnx", "index.faiss", "labels.npy", "calibration_scores.npy"):
            shutil.copy(bundle / name, stage / name)
        write_bundle(stage, dataclasses.replace(b.manifest, bank=None, files={}), old)
    assert "bank" not in json.loads((old / "manifest.json").read_text())
    assert load_bundle(old).sources().counts() == {"": len(b.labels)}
    assert any("unknown origin" in w for w in bank_info(old)["warnings"])
    data = _npz(tmp_path / "photo.npz", photos[:5], ["photo"] * 5)
    report = add_images(old, data, tmp_path / "new")
    assert "not measured" in report.describe()
    # its calibration scores cannot be scored again: left out rather than kept stale
    assert load_bundle(tmp_path / "new").manifest.calibration_file is None
    src = load_bundle(tmp_path / "new").sources()
    assert src.describe(0) == "" and src.describe(len(src) - 1) == "photo#4"
    (r,) = Detector(tmp_path / "new", device="cpu", threads=1).score_images(
        [real_images.png_bytes(photos[4])], neighbors=1)
    assert r.neighbors[0].source == "photo#4"


def test_replacing_the_served_bundle_is_atomic_for_readers(bundle, tmp_path, photos):
    data = _npz(tmp_path / "photo.npz", photos[:10], ["photo"] * 10)
    versions, failures, stop = set(), [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                versions.add(load_bundle(bundle, verify_model=False).manifest.model_version)
            except BundleError as e:
                failures.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(3):
            add_images(bundle, data, bundle, label="photo", overwrite=True)
    finally:
        stop.set()
        reader.join()
    assert not failures, failures[:3]
    assert len(versions) >= 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]  # no leftovers


def test_runs_with_the_runtime_alone(bundle, tmp_path, photos):
    """rwood-bank add, remove and info with torch, trainer and exporter impossible to import."""
    data = _npz(tmp_path / "photo.npz", photos[:5], ["photo"] * 5)
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "trainer", "exporter"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Block())
        from detector_server.bank_cli import bank_main
        bundle, data, out = sys.argv[1:]
        for args in (["add", bundle, data, "--out", out], ["remove", out, "--label", "photo",
                     "--out", out, "--force"], ["info", out]):
            try:
                bank_main(args)
            except SystemExit as e:
                assert e.code == 0, (args, e.code)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(bundle), str(data),
                           str(tmp_path / "new")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows per class" in proc.stdout


# ---- errors ---------------------------------------------------------------------------------
def test_documented_errors(bundle, tmp_path, photos):
    data = _npz(tmp_path / "photo.npz", photos[:5], ["photo"] * 5)
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        add_images(bundle, data, tmp_path / "exists")
    with pytest.raises(DataError, match="image folder or an .npz"):
        add_images(bundle, tmp_path / "missing", tmp_path / "o")
    with pytest.raises(InputError, match="needs --calibration") as e:
        add_images(bundle, data, tmp_path / "o", tpr=0.9)
    assert e.value.field == "tpr"
    with pytest.raises(InputError, match="in \\(0, 1\\)"):
        add_images(bundle, data, tmp_path / "o", calibration=tmp_path, tpr=1.5)
    np.savez(tmp_path / "nolabels.npz", images=photos[:3])
    with pytest.raises(DataError, match="labels and classes"):
        add_images(bundle, tmp_path / "nolabels.npz", tmp_path / "o")
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.png").write_bytes(real_images.png_bytes(photos[0]))
    with pytest.raises(DataError, match="--label NAME"):
        add_images(bundle, loose, tmp_path / "o")
    (loose / "b.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot use this image") as e:
        add_images(bundle, loose, tmp_path / "o", label="photo")
    assert e.value.path == str(loose / "b.png")
    with pytest.raises(DataError, match="need at least 20"):
        add_images(bundle, data, tmp_path / "o", calibration=data)
    with pytest.raises(InputError, match="exactly one"):
        remove_rows(bundle, tmp_path / "o")
    with pytest.raises(InputError, match="exactly one"):
        remove_rows(bundle, tmp_path / "o", label="3", source="train#*")
    with pytest.raises(InputError, match="unknown class 'photo'"):
        remove_rows(bundle, tmp_path / "o", label="photo")
    with pytest.raises(InputError, match="no bank row matches"):
        remove_rows(bundle, tmp_path / "o", source="nowhere/*")
    with pytest.raises(InputError, match="fewer than K"):
        remove_rows(bundle, tmp_path / "o", source="train#*")
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(bank_main, ["remove", str(bundle), "--label", "photo",
                                         "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error: --label: unknown class")


def test_sources_file_is_checked(bundle):
    path = bundle / "sources.json"
    d = json.loads(path.read_text())
    n = len(d["origin"])
    for key, value, match in [("origin", d["origin"][:-1], f"list of {n} entries"),
                              ("index", [1.5] * n, "expected integers"),
                              ("origin", [7] * n, "origin must be in"),
                              ("format_version", 9, "unknown version")]:
        bad = {**d, key: value}
        path.write_text(json.dumps(bad))
        with pytest.raises(BundleError, match=match) as e:
            BankSources.read(bundle, "sources.json", n)
        assert e.value.path == str(path)
