"""rwood-score's Ray engine (detector_server.score_ray) gives the local engine's rows.

Runs a local Ray instance (started and shut down by the engine) on the mixed folder of
test_score_folder.py; skipped when Ray Data is not installed (the optional [ray] extra).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from test_score_folder import BAD, SUB_GOOD, TOP_GOOD, make_mixed_folder

from detector_server.errors import InputError
from detector_server.score_folder import read_rows, score_folder


def test_ray_engine_rows_equal_local_engine(tiny_bundle, tmp_path):
    pytest.importorskip("ray.data", reason='Ray Data not installed (pip install "reweightood[ray]")')
    folder = make_mixed_folder(tmp_path)
    local_out, ray_out = tmp_path / "local.csv", tmp_path / "ray.jsonl"
    score_folder(tiny_bundle, folder, local_out, recursive=True, workers=0, progress=False)
    s = score_folder(tiny_bundle, folder, ray_out, recursive=True, batch_size=4, workers=1,
                     device="cpu", engine="ray", progress=False)
    local = {r.path: r for r in read_rows(local_out)}
    rows = read_rows(ray_out)
    assert sorted(r.path for r in rows) == sorted(TOP_GOOD | SUB_GOOD | BAD) == sorted(local)
    assert (s.files, s.skipped, s.errors) == (len(rows) + 1, 1, len(BAD))
    for r in rows:
        e = local[r.path]
        assert bool(r.error) == bool(e.error), (r, e)
        if e.error:
            assert math.isnan(r.score) and r.predicted_class == -1
        else:
            assert abs(r.score - e.score) <= 1e-6, (r, e)
            assert (r.is_ood, r.predicted_class, r.predicted_label, r.model_version) == \
                   (e.is_ood, e.predicted_class, e.predicted_label, e.model_version)


def test_ray_engine_without_ray_is_one_clear_error(tiny_bundle, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)           # as if the extra were not installed
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match=r"reweightood\[ray\]"):
        score_folder(tiny_bundle, tmp_path / "in", tmp_path / "s.csv", engine="ray",
                     progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "in"], "refused before writing anything"
