"""The model version of exported bundles follows everything that decides a score.

Two exports of one run with another --k or --tpr used to share a version (run name + the model
file's hash), so `rwood-score --resume` mixed their rows silently and GetInfo could not tell them
apart. Now the version is the run name plus `decision_digest` (detector_server/manifest.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from detector_server.bundle import decision_digest, file_sha256, load_bundle
from detector_server.errors import InputError
from detector_server.score_cli import score_main
from detector_server.score_folder import score_folder
from detector_server.score_table import partial_path, read_rows
from exporter.export import export_bundle


@pytest.fixture(scope="module")
def k5_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported like `tiny_bundle` but with K = 5."""
    return export_bundle(tiny_run, tmp_path_factory.mktemp("k5") / "bundle", k=5, threads=1)


@pytest.fixture(scope="module")
def tpr90_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported like `tiny_bundle` but with the threshold at TPR 0.90."""
    return export_bundle(tiny_run, tmp_path_factory.mktemp("tpr90") / "bundle", k=10, tpr=0.9,
                         threads=1)


@pytest.fixture(scope="module")
def folder(id_images: np.ndarray, ood_images: np.ndarray,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 PNGs: 6 unseen digits, 6 photo patches."""
    root = tmp_path_factory.mktemp("images")
    for i, a in enumerate(np.concatenate([id_images[:6], ood_images[:6]])):
        Image.fromarray(a).save(root / f"img{i:02d}.png")
    return root


def test_another_k_or_tpr_gives_another_version(tiny_run: Path, tiny_bundle: Path,
                                                k5_bundle: Path, tpr90_bundle: Path) -> None:
    bundles = (tiny_bundle, k5_bundle, tpr90_bundle)
    manifests = [load_bundle(b).manifest for b in bundles]
    assert [m.k for m in manifests] == [10, 5, 10]
    assert [m.threshold.target_tpr for m in manifests] == [0.95, 0.95, 0.9]
    versions = [m.model_version for m in manifests]
    assert len(set(versions)) == 3, versions
    assert all(v.startswith(f"{tiny_run.name}-") for v in versions)
    # The old version (run name + model hash) could not tell these three apart: one model file.
    assert len({file_sha256(b / "model.onnx") for b in bundles}) == 1


def test_identical_settings_keep_the_version_only_if_every_decision_byte_is_equal(
        tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    again = load_bundle(export_bundle(tiny_run, tmp_path / "again", k=10, threads=1)).manifest
    first = load_bundle(tiny_bundle).manifest
    same_bytes = decision_digest(again.to_dict()) == decision_digest(first.to_dict())
    assert (again.model_version == first.model_version) == same_bytes
    print(f"\nre-export with identical settings: version {again.model_version} "
          f"({'kept: every decision-relevant byte equal' if same_bytes else 'changed'})")


def test_resume_with_another_bundle_is_refused(tiny_bundle: Path, k5_bundle: Path,
                                               folder: Path, tmp_path: Path) -> None:
    """A table begun with one bundle cannot be finished with another (its rows would mix the
    scores and decisions of two detectors): refused, by the library and by rwood-score."""
    out = tmp_path / "scores.jsonl"
    score_folder(tiny_bundle, folder, out, workers=0, progress=False)
    # an interrupted run: the journal holds half the rows, no finished table yet
    partial_path(out).write_text("".join(json.dumps(list(r)) + "\n" for r in read_rows(out)[:6]))
    out.unlink()
    with pytest.raises(InputError, match="rows were written by model") as e:
        score_folder(k5_bundle, folder, out, resume=True, workers=0, progress=False)
    assert load_bundle(tiny_bundle).manifest.model_version in str(e.value)
    result = CliRunner().invoke(score_main, [str(k5_bundle), str(folder), "--out", str(out),
                                             "--resume", "--workers", "0", "--no-progress"])
    assert result.exit_code == 2 and "--resume" in result.output, result.output
    assert len(read_rows(partial_path(out))) == 6          # nothing appended to the journal
