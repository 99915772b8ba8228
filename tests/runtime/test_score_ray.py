"""rwood-score's Ray engine (detector_server.score_ray) gives the local engine's rows.

Runs a local Ray instance (started and shut down by the engine) on the mixed folder of
test_score_folder.py; skipped when Ray Data is not installed (the optional [ray] extra).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_score_folder import BAD, SUB_GOOD, TOP_GOOD, make_mixed_folder

from detector_server.errors import InputError
from detector_server.score_folder import score_folder
from detector_server.score_table import read_rows


def test_ray_engine_rows_equal_local_engine(tiny_bundle, shared_data, tmp_path):
    pytest.importorskip("ray.data", reason='Ray Data not installed (pip install "reweightood[ray]")')
    folder = make_mixed_folder(tmp_path, shared_data)
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


def test_both_engines_apply_the_same_read_guards(tiny_bundle, shared_data, tmp_path):
    """Both engines read files through score_decode.decode_files, so a file over the size limit
    gets the same error row without being read, a file without an image suffix and without an
    image header gets no row, and a file name that is not UTF-8 keeps its row.

    The Ray engine used to read whole files with Ray Data's read_binary_files: a 1 GiB file was
    read into memory and then failed to decode, with another error than the local engine's."""
    pytest.importorskip("ray.data", reason='Ray Data not installed (pip install "reweightood[ray]")')
    src = tmp_path / "in"
    src.mkdir()
    cifar = np.load(shared_data / "cifar10_test.npz")["images"]
    Image.fromarray(cifar[0]).save(src / "ok.png")
    odd = os.fsdecode(b"caf\xe9.png")                   # Latin-1 name: not valid UTF-8
    Image.fromarray(cifar[1]).save(src / odd)
    with open(src / "huge.png", "wb") as f:              # sparse: no disk used, never read
        f.truncate((1 << 30) + 1)
    (src / "notes").write_text("plain text without a suffix\n" * 100)
    tables = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.jsonl"
        s = score_folder(tiny_bundle, src, out, batch_size=4, workers=1, device="cpu",
                         engine=engine, progress=False)
        assert (s.files, s.scored, s.errors, s.skipped) == (4, 2, 1, 1), engine
        tables[engine] = {r.path: r for r in read_rows(out)}
    local, ray_rows = tables["local"], tables["ray"]
    assert sorted(ray_rows) == sorted(local) == sorted(["ok.png", odd, "huge.png"])
    assert "over the limit" in local["huge.png"].error
    assert ray_rows["huge.png"].error == local["huge.png"].error
    for p in ("ok.png", odd):
        assert ray_rows[p].error == local[p].error == ""
        assert abs(ray_rows[p].score - local[p].score) <= 1e-6
