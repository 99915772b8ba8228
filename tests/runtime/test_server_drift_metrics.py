"""The server's drift metrics: each scored image lands in `rwood_score_rank` (its place among the
bundle's calibration scores) under the model version that scored it, and `rwood_expected_ood_ratio`
gives the OOD rate to compare with; a bundle without calibration scores has the ratio only."""
from __future__ import annotations

import io
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from test_bundle_calibration import old_bundle  # noqa: F401  (fixture)

from detector_server._proto import detector_pb2 as pb
from detector_server._proto import detector_pb2_grpc as pb_grpc
from detector_server.detector import Detector
from detector_server.errors import InputError
from detector_server.preprocess import prepare_arrays
from detector_server.serve_config import ServeConfig
from detector_server.server import start_background
from detector_server.server_metrics import RANK_BUCKETS


def _request(images: np.ndarray) -> pb.ScoreRequest:
    out = []
    for i, a in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(a.squeeze()).save(buf, format="PNG")
        out.append(pb.Image(id=str(i), data=buf.getvalue()))
    return pb.ScoreRequest(images=out)


def _samples(server) -> dict[str, float]:
    text = server.server.metrics.render().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(rwood_\S+) (\S+)$", text, re.M)}


def _serve_and_score(bundle: Path, images: np.ndarray) -> tuple[dict[str, float], str]:
    with start_background(bundle, device="cpu", threads=1) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            response = pb_grpc.DetectorStub(channel).Score(_request(images), timeout=60)
        return _samples(srv), response.model_version


def test_scores_are_counted_by_calibration_percentile(tiny_bundle: Path,
                                                     ood_images: np.ndarray) -> None:
    photos = ood_images[:40]
    got, version = _serve_and_score(tiny_bundle, photos)
    det = Detector(tiny_bundle, device="cpu", threads=1)
    ranks = det.calibration_rank(det.score_arrays(prepare_arrays(photos, det.spec)).scores)
    key = f'model_version="{version}"'
    assert got[f"rwood_score_rank_count{{{key}}}"] == 40
    for le in RANK_BUCKETS:
        assert got[f'rwood_score_rank_bucket{{le="{le}",{key}}}'] == np.sum(ranks <= le), le
    assert got[f"rwood_expected_ood_ratio{{{key}}}"] == pytest.approx(det.expected_ood_ratio)
    # photo crops pile up below the calibration's low percentiles: the drift the histogram shows
    assert got[f'rwood_score_rank_bucket{{le="0.05",{key}}}'] > 0.3 * 40


def test_a_bundle_without_calibration_scores_exports_the_ratio_only(
        old_bundle: Path, id_images: np.ndarray) -> None:  # noqa: F811
    got, version = _serve_and_score(old_bundle, id_images[:4])
    assert not [k for k in got if k.startswith("rwood_score_rank")]
    assert got[f'rwood_expected_ood_ratio{{model_version="{version}"}}'] > 0
    assert got['rwood_ood_decisions_total{decision="id"}'] + got[
        'rwood_ood_decisions_total{decision="ood"}'] == 4


def test_workers_must_be_a_positive_count_and_background_servers_are_one_process(
        tiny_bundle: Path) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="field 'workers'"):
            ServeConfig(workers=bad)
    with pytest.raises(InputError, match="field 'workers'.*--workers"):
        start_background(tiny_bundle, workers=2)
