"""rwood-score --neighbors N: each row lists the N nearest bank rows behind its score, as the
Detector gives them; nested in JSONL and Parquet, one JSON column in CSV; the same from the Ray
engine; no such column without the option; its errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_score_folder import BAD, SUB_GOOD, TOP_GOOD, make_mixed_folder

from detector_server.errors import InputError
from detector_server.score_cli import score_main
from detector_server.score_folder import score_folder
from detector_server.score_table import NEIGHBOR_FIELDS, OUTPUT_FORMATS, ROW_FIELDS, read_rows


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mixed_folder(tmp_path_factory.mktemp("score_neighbors"))


@pytest.fixture(scope="module")
def expected(folder: Path, tiny_bundle: Path) -> dict[str, list[dict]]:
    """Each image file's 3 nearest bank rows by `Detector.score_images` ([] for bad files)."""
    from detector_server.detector import Detector

    paths = sorted(TOP_GOOD | SUB_GOOD | BAD)
    res = Detector(tiny_bundle, device="cpu").score_images(
        [(folder / p).read_bytes() for p in paths], ids=paths, neighbors=3)
    return {r.id: [{"row": n.row, "class_index": n.class_index, "label": n.label,
                    "similarity": n.similarity, "source": n.source,
                    "source_index": n.source_index} for n in r.neighbors] for r in res}


def _same(rows, expected) -> None:
    assert sorted(r.path for r in rows) == sorted(expected)
    for r in rows:
        want = expected[r.path]
        assert [(n["row"], n["label"], n["source"]) for n in r.neighbors] == \
               [(n["row"], n["label"], n["source"]) for n in want], r.path
        assert [n["similarity"] for n in r.neighbors] == pytest.approx(
            [n["similarity"] for n in want], abs=1e-6)
        assert len(r.neighbors) == (0 if r.path in BAD else 3)


@pytest.mark.parametrize("suffix", sorted(OUTPUT_FORMATS))
def test_every_format_holds_the_detectors_neighbors(tiny_bundle, folder, expected, tmp_path,
                                                    suffix):
    if suffix == ".parquet":
        pa = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / f"scores{suffix}"
    score_folder(tiny_bundle, folder, out, recursive=True, workers=0, progress=False, neighbors=3)
    _same(read_rows(out), expected)
    if suffix == ".csv":                        # one JSON array per cell, after the usual columns
        header, first = out.read_text().splitlines()[:2]
        assert header == ",".join(ROW_FIELDS + ("neighbors",))
        assert first.endswith('"[]"') or '""row"": ' in first
    elif suffix == ".jsonl":                    # a nested list of objects
        row = json.loads(out.read_text().splitlines()[1])
        assert all(set(n) == set(NEIGHBOR_FIELDS) for n in row["neighbors"])
    else:                                       # a list of structs
        field = pa.read_schema(out).field("neighbors")
        assert [f.name for f in field.type.value_type] == list(NEIGHBOR_FIELDS)


def test_without_the_option_no_column(tiny_bundle, folder, tmp_path):
    score_folder(tiny_bundle, folder, tmp_path / "s.csv", workers=0, progress=False)
    score_folder(tiny_bundle, folder, tmp_path / "s.jsonl", workers=0, progress=False)
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == ",".join(ROW_FIELDS)
    assert "neighbors" not in json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert all(r.neighbors is None for r in read_rows(tmp_path / "s.jsonl"))


def test_ray_engine_gives_the_same_neighbors(tiny_bundle, folder, expected, tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip('Ray Data not installed (pip install "reweightood[ray]")')
    out = tmp_path / "ray.jsonl"
    score_folder(tiny_bundle, folder, out, recursive=True, batch_size=4, workers=1, device="cpu",
                 engine="ray", progress=False, neighbors=3)
    _same(read_rows(out), expected)


def test_errors_and_cli(tiny_bundle, folder, tmp_path):
    with pytest.raises(InputError, match=r"\[0, 10\]") as e:
        score_folder(tiny_bundle, folder, tmp_path / "s.csv", progress=False, neighbors=11)
    assert e.value.field == "neighbors" and not (tmp_path / "s.csv").exists()
    score_folder(tiny_bundle, folder, tmp_path / "s.jsonl", workers=0, progress=False)
    with pytest.raises(InputError, match="without --neighbors"):
        score_folder(tiny_bundle, folder, tmp_path / "s.jsonl", workers=0, progress=False,
                     resume=True, neighbors=2)
    res = CliRunner().invoke(score_main, [str(tiny_bundle), str(folder), "--out",
                                          str(tmp_path / "c.jsonl"), "--neighbors", "2",
                                          "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert all(len(r.neighbors) == (0 if r.path in BAD else 2)
               for r in read_rows(tmp_path / "c.jsonl"))
    res = CliRunner().invoke(score_main, [str(tiny_bundle), str(folder), "--out",
                                          str(tmp_path / "d.csv"), "--neighbors", "99"])
    assert res.exit_code == 2 and res.output.startswith("error: --neighbors: expected an integer in [0, 10]")
