"""rwood-export's index choice and check, and the Mahalanobis scorer, end to end on the tiny run.

The tiny run's bank holds 950 rows: with K = 100, an IVF of 32 cells holds ~30 rows per cell, so
faiss's default nprobe of 1 leaves every query short of K (the failure the index check exists
for: every score -2, threshold -2, nothing ever OOD).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import exporter.cli as cli
from detector_server.bundle import load_bundle
from detector_server.detector import Detector
from detector_server.errors import InputError
from detector_server.score_folder import score_folder
from exporter.export import export_bundle
from trainer.evaluate import evaluate
from trainer.mahalanobis import MahalanobisScorer


@pytest.fixture(scope="module")
def data(id_images: np.ndarray, ood_images: np.ndarray, tmp_path_factory) -> dict[str, Path]:
    """300 digits the tiny run never saw (calibration) and 300 photo patches (OOD), as .npz."""
    root = tmp_path_factory.mktemp("sets")
    np.savez(root / "id.npz", images=id_images[:300])
    np.savez(root / "photos.npz", images=ood_images[:300])
    return {"id": root / "id.npz", "photos": root / "photos.npz"}


@pytest.fixture(scope="module")
def ivf_bundle(tiny_run: Path, data, tmp_path_factory) -> Path:
    return export_bundle(tiny_run, tmp_path_factory.mktemp("ivf") / "b", k=100,
                         index_factory="IVF32,Flat", calibration=data["id"],
                         check_ood=(f"photos={data['photos']}",), threads=2)


def test_ivf_with_nprobe_1_is_refused_with_a_clear_message(tiny_run: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.export_main, [str(tiny_run), "--out", str(tmp_path / "b"),
                                               "--k", "100", "--index", "IVF32,Flat",
                                               "--search", "nprobe=1"])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: --search: 'IVF32,Flat' with {'nprobe': 1}: ")
    assert "calibration queries got fewer than K=100 neighbours" in line
    assert "so nprobe must be at least 4" in line and not (tmp_path / "b").exists()


def test_ivf_gets_a_stored_nprobe_and_the_check_is_in_the_manifest(ivf_bundle: Path) -> None:
    m = load_bundle(ivf_bundle).manifest
    ix = m.index
    assert m.format_version == 2 and ix.factory == "IVF32,Flat" and m.k == 100
    assert ix.search_params["nprobe"] >= 4
    c = ix.check
    assert c["recall_kth"] >= 0.99 and c["short_queries"] == 0 and c["n_queries"] == 300
    assert c["threshold"] == m.threshold.value and c["tpr_approx"] == m.threshold.achieved_tpr
    assert set(c["ood"]["photos"]) >= {"fpr_exact", "fpr_approx", "fpr_change", "recall_kth"}
    assert ix.choice["requested"] == "IVF32,Flat" and "smallest tried" in ix.choice["reason"]
    det = Detector(ivf_bundle, device="cpu", threads=1)
    assert det.info()["scorer"]["search_params"] == ix.search_params
    assert m.threshold.value > -2.0                         # it can detect


def test_auto_exports_flat_for_the_small_bank(tiny_bundle: Path) -> None:
    ix = load_bundle(tiny_bundle).manifest.index
    assert ix.factory == "Flat" and ix.search_params == {} and ix.check is None
    assert ix.choice["requested"] == "auto" and "exact search" in ix.choice["reason"]


def test_option_refusals(tiny_run: Path, tmp_path: Path) -> None:
    for kwargs, fld in ((dict(scorer="mahalanobis", index_factory="Flat"), "scorer"),
                        (dict(scorer="lof"), "scorer"), (dict(min_recall=1.5), "min_recall"),
                        (dict(search_params={"nprobe": 0}), "search.nprobe"),
                        (dict(index_memory_mib=0), "index_memory"),
                        (dict(index_memory_mib=64, index_factory="Flat"), "index_memory"),
                        (dict(check_ood=("nonsense",)), "check_ood")):
        with pytest.raises(InputError) as e:
            export_bundle(tiny_run, tmp_path / "b", **kwargs)
        assert e.value.field == fld, kwargs
    res = CliRunner().invoke(cli.export_main, [str(tiny_run), "--out", str(tmp_path / "b"),
                                               "--search", "nprobe"])
    assert res.exit_code == 2 and "error: --search: expected NAME=INTEGER" in res.output
    res = CliRunner().invoke(cli.export_main, [str(tiny_run), "--out", str(tmp_path / "b"),
                                               "--index", "Flat", "--index-memory", "64"])
    assert res.exit_code == 2 and res.output.startswith("error: --index-memory: "), res.output


@pytest.fixture(scope="module")
def mds_bundle(tiny_run: Path, data, tmp_path_factory) -> Path:
    return export_bundle(tiny_run, tmp_path_factory.mktemp("mds") / "b", scorer="mahalanobis",
                         calibration=data["id"], threads=2)


def test_mahalanobis_bundle_matches_rwood_eval(mds_bundle: Path, tiny_run: Path, data) -> None:
    """Parity with rwood-eval's Mahalanobis: the same fit on the same bank gives the same scores,
    within 1e-5, on the embeddings the bundle computes; and rwood-eval's whole path (torch
    embeddings) agrees to the precision the ONNX model reproduces torch."""
    b = load_bundle(mds_bundle)
    m = b.manifest
    assert m.scorer == "mahalanobis" and m.k is None and m.index is None
    assert set(m.files) == {"model.onnx", "mahalanobis_means.npy", "mahalanobis_precision.npy",
                            "calibration_scores.npy"}
    assert m.mahalanobis.n_bank == 950
    det = Detector(b, device="cpu", threads=1)
    images = np.load(data["id"])["images"]
    served = det.score_arrays(images)
    with np.load(tiny_run / "bank.npz") as f:
        evaluated = MahalanobisScorer(f["penultimate"], f["labels"], num_classes=10)
    scores, pred = evaluated.score(det.embed(images))
    np.testing.assert_allclose(served.scores, scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(served.predicted, pred)
    ev = evaluate(tiny_run, id_test=str(data["id"]), postprocessor="mahalanobis", device="cpu")
    np.testing.assert_allclose(served.scores, ev.scores["id"], rtol=1e-3)
    assert np.mean(~served.is_ood) == pytest.approx(m.threshold.achieved_tpr)


def test_mahalanobis_bundle_through_rwood_score(mds_bundle: Path, ood_images: np.ndarray,
                                                tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i, img in enumerate(ood_images[:8]):
        Image.fromarray(img).save(folder / f"t{i}.png")
    summary = score_folder(mds_bundle, folder, tmp_path / "out.csv", workers=0, device="cpu",
                           progress=False)
    assert summary.scored == 8
    text = (tmp_path / "out.csv").read_text()
    assert text.count("\n") == 9 and "t0.png" in text
