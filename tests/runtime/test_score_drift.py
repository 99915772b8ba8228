"""rwood-score's closing drift test: a folder of digits the tiny run never saw shows no drift, a
folder of photo crops does and fails the run with exit status 3 under --fail-on-drift; a bundle
exported before calibration scores were stored skips the test with a message."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_bundle_calibration import old_bundle  # noqa: F401  (fixture)

from detector_server.bundle import load_bundle
from detector_server.drift import drift_test
from detector_server.errors import InputError
from detector_server.score_cli import score_main
from detector_server.score_folder import score_folder
from detector_server.score_table import read_rows


def _write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, a in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(a.squeeze()).save(buf, format="PNG")
        (folder / f"{i:04d}.png").write_bytes(buf.getvalue())
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, id_images: np.ndarray,
            ood_images: np.ndarray) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift")
    return {"id": _write_pngs(root / "id", id_images[:200]),
            "photos": _write_pngs(root / "photos", ood_images[:200])}


def score(bundle: Path, folder: Path, out: Path, *args: str):
    return CliRunner().invoke(score_main, [str(bundle), str(folder), "--out", str(out),
                                           "--workers", "0", "--no-progress", *args])


def test_held_out_in_distribution_images_pass(tiny_bundle: Path, folders: dict, tmp_path: Path):
    bundle = load_bundle(tiny_bundle)
    n, expected = bundle.manifest.threshold.n_samples, 1 - bundle.manifest.threshold.achieved_tpr
    result = score(tiny_bundle, folders["id"], tmp_path / "id.csv", "--fail-on-drift", "0.01")
    assert result.exit_code == 0, result.output
    assert f"drift test  two-sample KS of 200 scores vs {n} calibration scores" in result.output
    assert "no drift at alpha 0.01" in result.output
    assert "OOD rate    " in result.output and f"(expected {expected:.1%}" in result.output


def test_photos_drift_and_fail_the_run_with_status_3(tiny_bundle: Path, folders: dict,
                                                       tmp_path: Path):
    out = tmp_path / "photos.csv"
    result = score(tiny_bundle, folders["photos"], out, "--fail-on-drift", "0.01")
    assert result.exit_code == 3, result.output
    assert "DRIFT at alpha 0.01" in result.output and out.is_file()     # the table is written
    assert score(tiny_bundle, folders["photos"], tmp_path / "t2.csv").exit_code == 0  # report only


def test_the_report_is_the_ks_test_of_every_row_in_the_table(tiny_bundle: Path, folders: dict,
                                                             tmp_path: Path):
    out = tmp_path / "s.jsonl"
    summary = score_folder(tiny_bundle, folders["photos"], out, workers=0, progress=False,
                           drift_alpha=0.05)
    bundle = load_bundle(tiny_bundle)
    scores = np.array([r.score for r in read_rows(out)])
    expected = drift_test(scores, bundle.calibration_scores(), bundle.manifest.threshold.value, 0.05)
    assert summary.drift == expected and summary.drift.n == 200 and summary.drift.drifted
    resumed = score_folder(tiny_bundle, folders["photos"], out, workers=0, progress=False,
                           resume=True)
    assert resumed.scored == 0 and resumed.drift.n == 200      # resumed rows are tested too


def test_a_bundle_without_calibration_scores_skips_the_test(old_bundle: Path,  # noqa: F811
                                                            folders: dict, tmp_path: Path):
    result = score(old_bundle, folders["photos"], tmp_path / "s.csv", "--fail-on-drift", "0.01")
    assert result.exit_code == 0, result.output
    assert ("drift test  skipped: the bundle has no calibration scores (exported before they "
            "were stored; export it again to test for drift)") in result.output


@pytest.mark.parametrize("alpha", [0.0, -0.1, 0.9, float("nan")])
def test_a_bad_significance_level_is_refused_before_scoring(tiny_bundle: Path, folders: dict,
                                                            tmp_path: Path, alpha: float):
    with pytest.raises(InputError, match="field 'fail_on_drift'"):
        score_folder(tiny_bundle, folders["id"], tmp_path / "s.csv", progress=False,
                     drift_alpha=alpha)
    assert not list(tmp_path.iterdir())
    result = score(tiny_bundle, folders["id"], tmp_path / "s.csv", "--fail-on-drift", str(alpha))
    assert result.exit_code == 2
    assert result.output.startswith("error: --fail-on-drift: expected a finite number")
