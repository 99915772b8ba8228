"""rwood-score (detector_server.score_folder, its score_* modules, score_cli) on real images.

The folder holds PNG/JPEG/BMP files of real images (digits, photographs), a .jpg that is a PNG,
an image without a suffix, a text file named .png, a truncated PNG, an empty file, a README (not
an image) and a subfolder. Every image file must get exactly one row, bad ones an error, good ones the score
`Detector.score_images` gives the same bytes.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import real_images
from click.testing import CliRunner
from PIL import Image

from detector_server import listing
from detector_server import score_decode as sd
from detector_server import score_folder as sf
from detector_server.errors import BundleError, InputError
from detector_server.preprocess import PreprocessSpec
from detector_server.score_cli import score_main
from detector_server.score_folder import score_folder
from detector_server.score_plot import plot_scores
from detector_server.score_table import OUTPUT_FORMATS, ROW_FIELDS, Row, partial_path, read_rows

BAD = {"text.png", "truncated.png", "empty.png"}          # error rows
NOT_IMAGES = {"README.txt"}                               # no row
TOP_GOOD = {"c0.png", "c1.png", "c2.png", "c3.png", "c4.png", "gray.png", "b0.bmp", "t0.jpg",
            "t1.jpeg", "png_named.jpg", "no_suffix"}
SUB_GOOD = {"sub/c5.png", "sub/deeper/t2.jpg"}
REPO = Path(__file__).resolve().parents[2]


def make_mixed_folder(root: Path) -> Path:
    """The mixed folder of the module docstring under root/"images" (real pixels only)."""
    digits, photos = real_images.digits_unseen(), real_images.photo_patches()
    jpegs = real_images.photo_jpegs(3)
    d = root / "images"
    (d / "sub" / "deeper").mkdir(parents=True)
    for i in range(5):
        (d / f"c{i}.png").write_bytes(real_images.png_bytes(digits[i]))
    Image.fromarray(photos[0]).convert("L").save(d / "gray.png")
    Image.fromarray(photos[1]).save(d / "b0.bmp")
    (d / "t0.jpg").write_bytes(jpegs[0])                  # 427x640 and 320x240 up: resized
    (d / "t1.jpeg").write_bytes(jpegs[1])
    (d / "png_named.jpg").write_bytes(real_images.png_bytes(digits[12]))   # content decides, not the suffix
    (d / "no_suffix").write_bytes(real_images.png_bytes(photos[13]))
    (d / "text.png").write_text("this is not an image\n")
    (d / "truncated.png").write_bytes(real_images.png_bytes(photos[14])[:300])
    (d / "empty.png").write_bytes(b"")
    (d / "README.txt").write_text("notes about these images\n")
    (d / "sub" / "c5.png").write_bytes(real_images.png_bytes(digits[15]))
    (d / "sub" / "deeper" / "t2.jpg").write_bytes(jpegs[2])
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mixed_folder(tmp_path_factory.mktemp("score_folder"))


@pytest.fixture(scope="module")
def detector(tiny_bundle: Path):
    from detector_server.detector import Detector  # not at the top: worker processes import
                                                    # this module (see _decode_or_die)
    return Detector(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def expected(folder: Path, detector) -> dict[str, Row]:
    """What Detector.score_images says about every image file (recursive)."""
    paths = sorted(TOP_GOOD | SUB_GOOD | BAD)
    res = detector.score_images([(folder / p).read_bytes() for p in paths], ids=paths)
    return {r.id: Row(r.id, r.score, r.is_ood, r.predicted_label, r.predicted_class, r.error,
                      detector.model_version) for r in res}


def assert_rows_match(rows: list[Row], expected: dict[str, Row], paths: set[str]) -> None:
    """Exactly one row per path; errors where expected; scores as the Detector's (1e-6)."""
    got = [r.path for r in rows]
    assert sorted(got) == sorted(paths), "every image file exactly once"
    for r in rows:
        e = expected[r.path]
        assert r.model_version == e.model_version
        if e.error:
            assert r.error and math.isnan(r.score), r
            assert (r.is_ood, r.predicted_class, r.predicted_label) == (None, -1, "")
        else:
            assert r.error == "", r
            assert abs(r.score - e.score) <= 1e-6, (r, e)
            assert (r.is_ood, r.predicted_class, r.predicted_label) == \
                   (e.is_ood, e.predicted_class, e.predicted_label), (r, e)


def test_mixed_folder_rows_equal_detector(tiny_bundle, folder, expected, tmp_path):
    out = tmp_path / "scores.csv"
    s = score_folder(tiny_bundle, folder, out, recursive=True, batch_size=4, workers=2,
                     progress=False)
    rows = read_rows(out)
    assert_rows_match(rows, expected, TOP_GOOD | SUB_GOOD | BAD)
    assert [r.path for r in rows] == [p for p in listing.list_files(folder).files
                                      if p in expected], \
        "rows come in file order through the worker pool"
    assert (s.files, s.resumed, s.errors, s.skipped) == (len(rows) + 1, 0, len(BAD), 1)
    assert s.scored == len(TOP_GOOD | SUB_GOOD)
    assert s.ood == sum(bool(r.is_ood) for r in rows)
    assert s.files_per_s > 0 and "files/s" in s.describe()
    assert not partial_path(out).exists()


def test_not_recursive_scores_top_level_only(tiny_bundle, folder, expected, tmp_path):
    out = tmp_path / "top.jsonl"
    score_folder(tiny_bundle, folder, out, workers=0, progress=False)
    assert_rows_match(read_rows(out), expected, TOP_GOOD | BAD)


@pytest.mark.parametrize("suffix", sorted(OUTPUT_FORMATS))
def test_output_formats_round_trip(tiny_bundle, folder, expected, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"scores{suffix}"
    score_folder(tiny_bundle, folder, out, recursive=True, workers=0, progress=False)
    assert_rows_match(read_rows(out), expected, TOP_GOOD | SUB_GOOD | BAD)
    if suffix == ".csv":   # plain CSV any tool reads: header, true/false, empty score on error
        text = out.read_text().splitlines()
        assert text[0] == ",".join(ROW_FIELDS)
        assert any(line.startswith("empty.png,,,,-1,") for line in text)


def _crash_after(n_batches: int):
    """An engine that yields `n_batches` batches of the local engine, then dies."""
    def engine(*args, **kwargs):
        for i, item in enumerate(sf.iter_local(*args, **kwargs)):
            if i == n_batches:
                raise RuntimeError("simulated crash")
            yield item
    return engine


def test_resume_after_crash_scores_every_file_once(tiny_bundle, folder, expected, tmp_path,
                                                   monkeypatch):
    out = tmp_path / "scores.parquet" if _has("pyarrow") else tmp_path / "scores.csv"
    monkeypatch.setitem(sf.ENGINES, "crashy", f"{__name__}:CRASHY")
    with pytest.raises(RuntimeError, match="simulated crash"):
        score_folder(tiny_bundle, folder, out, recursive=True, batch_size=4, workers=0,
                     engine="crashy", progress=False)
    partial = partial_path(out)
    assert not out.exists() and partial.exists()
    kept = read_rows(partial)
    assert 0 < len(kept) < len(expected)
    with open(partial, "ab") as f:                       # a line cut short by the crash
        f.write(b'["sub/c5.png", -0.2')
    s = score_folder(tiny_bundle, folder, out, recursive=True, resume=True, workers=0,
                     progress=False)
    rows = read_rows(out)
    assert_rows_match(rows, expected, TOP_GOOD | SUB_GOOD | BAD)
    assert s.resumed == len(kept) and s.scored + s.errors == len(expected) - len(kept)
    assert _keys(rows[:len(kept)]) == _keys(kept), "resumed rows are kept as they were"
    assert not partial.exists()

    # a new file appears: --resume over the finished table scores only it
    shutil.copy(folder / "c0.png", folder / "sub" / "added.png")
    try:
        s = score_folder(tiny_bundle, folder, out, recursive=True, resume=True, workers=0,
                         progress=False)
    finally:
        (folder / "sub" / "added.png").unlink()
    again = read_rows(out)
    assert (s.resumed, s.scored, s.errors) == (len(rows), 1, 0)
    assert _keys(again[:-1]) == _keys(rows) and again[-1].path == "sub/added.png"
    assert again[-1].score == pytest.approx(expected["c0.png"].score, abs=1e-6)


CRASHY = _crash_after(2)


def _keys(rows: list[Row]) -> list[tuple]:
    """Rows comparable with == (nan scores as None)."""
    return [tuple(r._replace(score=None if math.isnan(r.score) else r.score)) for r in rows]


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_crash_keeps_previous_table_and_rerun_discards_partial(tiny_bundle, folder, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "scores.jsonl"
    score_folder(tiny_bundle, folder, out, workers=0, progress=False)
    before = out.read_bytes()
    monkeypatch.setitem(sf.ENGINES, "crashy", f"{__name__}:CRASHY")
    with pytest.raises(RuntimeError):
        score_folder(tiny_bundle, folder, out, recursive=True, batch_size=4, workers=0,
                     engine="crashy", force=True, progress=False)
    assert out.read_bytes() == before, "a crash never touches the finished table"
    s = score_folder(tiny_bundle, folder, out, recursive=True, workers=0, force=True,
                     progress=False)
    assert s.resumed == 0 and len(read_rows(out)) == len(TOP_GOOD | SUB_GOOD | BAD)
    assert not partial_path(out).exists()


def _decode_or_die(root, paths, spec, max_pixels):
    """decode_files, except that the worker process dies on a file named die*."""
    if any(Path(p).name.startswith("die") for p in paths):
        os._exit(3)
    return sd.decode_files(root, paths, spec, max_pixels)


def test_dead_decoding_process_costs_one_error_row(folder, tmp_path):
    """A decoder that kills its process (as a segfault would) marks only that file."""
    shutil.copy(folder / "c0.png", tmp_path / "die.png")
    for name in ("c1.png", "c2.png", "c3.png", "empty.png"):
        shutil.copy(folder / name, tmp_path / name)
    names = ["c1.png", "c2.png", "die.png", "c3.png", "empty.png"]
    chunks = [names[:2], names[2:4], names[4:]]
    spec = PreprocessSpec(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    ahead = sd.DecodeAhead(str(tmp_path), chunks, spec, 10**6, workers=1, depth=3,
                            decode=_decode_or_die)
    try:
        got = list(ahead)
    finally:
        ahead.close()
    assert [c for c, _ in got] == chunks
    status = [st for _, (_, sts) in got for st in sts]
    assert status[:2] == ["", ""] and status[3] == ""
    assert status[2] == "the decoding process died on this file"
    assert status[4] and "empty" in status[4]
    want, _ = sd.decode_files(str(tmp_path), ["c1.png", "c2.png", "c3.png"], spec, 10**6)
    np.testing.assert_array_equal(np.concatenate([a for _, (a, _) in got]), want)


def test_odd_files_oversized_and_non_utf8_names(tiny_bundle, folder, tmp_path, monkeypatch):
    """A file over the size limit is an error row (not read); a non-UTF-8 file name round-trips
    through CSV and JSONL; a big non-image without an image suffix is skipped."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(folder / "c0.png", src / "small.png")
    shutil.copy(folder / "t0.jpg", src / "big.jpg")
    odd = os.fsdecode(b"caf\xe9.png")                   # Latin-1 name: not valid UTF-8
    shutil.copy(folder / "c1.png", src / odd)
    (src / "video.bin").write_bytes(bytes(range(256)) * 4096)
    monkeypatch.setattr(listing, "MAX_FILE_BYTES", 10_000)   # the JPEG is larger, the PNGs not
    for suffix in (".csv", ".jsonl"):
        out = tmp_path / f"s{suffix}"
        s = score_folder(tiny_bundle, src, out, workers=0, progress=False)
        rows = {r.path: r for r in read_rows(out)}
        assert set(rows) == {"small.png", "big.jpg", odd} and s.skipped == 1
        assert "over the limit" in rows["big.jpg"].error
        assert rows[odd].error == "" and rows["small.png"].error == ""
        again = score_folder(tiny_bundle, src, out, workers=0, resume=True, progress=False)
        assert (again.resumed, again.scored, again.errors) == (3, 0, 0)


def test_resume_refuses_rows_of_another_model(tiny_bundle, folder, tmp_path):
    out = tmp_path / "scores.jsonl"
    partial_path(out).write_text('["c0.png", -0.1, false, "cat", 3, "", "some-other-model"]\n')
    with pytest.raises(InputError, match="some-other-model"):
        score_folder(tiny_bundle, folder, out, resume=True, workers=0, progress=False)


def test_plot_histogram(tiny_bundle, folder, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "scores.csv", tmp_path / "hist.png"
    s = score_folder(tiny_bundle, folder, out, workers=0, plot=png, progress=False)
    assert s.plot == png
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
    with pytest.raises(InputError, match="cannot save the plot"):
        plot_scores(np.array([-0.2, np.nan]), -0.3, tmp_path / "no_dir" / "h.png")


@pytest.mark.parametrize("kwargs, match", [
    (dict(out="scores.txt"), "ending in one of"),
    (dict(batch_size=0), "batch_size"),
    (dict(workers=-1), "workers"),
    (dict(engine="spark"), "engine"),
    (dict(inputs="missing_folder"), "no such file or folder"),
    (dict(out="no_such_dir/scores.csv"), "does not exist"),
])
def test_bad_options_raise_input_error(tiny_bundle, folder, tmp_path, kwargs, match):
    args = dict(inputs=folder, out="scores.csv") | kwargs
    args["out"] = tmp_path / args["out"]
    if args["inputs"] == "missing_folder":
        args["inputs"] = tmp_path / "missing_folder"
    with pytest.raises(InputError, match=match):
        score_folder(tiny_bundle, progress=False, **args)


def test_unavailable_device_raises_before_any_row(tiny_bundle, folder, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="CUDA"):
        score_folder(tiny_bundle, folder, tmp_path / "s.csv", device="cuda", progress=False)
    assert list(tmp_path.iterdir()) == [], "no partial file without rows"


def test_missing_bundle_raises_bundle_error(folder, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        score_folder(tmp_path / "nope", folder, tmp_path / "s.csv", progress=False)


@pytest.mark.parametrize("module, option", [("pyarrow", dict(out="s.parquet")),
                                            ("matplotlib.figure", dict(plot="h.png"))])
def test_missing_optional_dependency_is_one_clear_error(tiny_bundle, folder, tmp_path,
                                                        monkeypatch, module, option):
    monkeypatch.setitem(sys.modules, module, None)      # import fails as if not installed
    args = dict(out="s.csv") | option
    args = {k: tmp_path / v for k, v in args.items()}
    with pytest.raises(InputError, match="pip install"):
        score_folder(tiny_bundle, folder, progress=False, **args)
    assert not (tmp_path / "s.parquet").exists()


def test_cli_scores_and_prints_summary(tiny_bundle, folder, tmp_path):
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(score_main, [str(tiny_bundle), str(folder), "--out", str(out),
                                          "--recursive", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert ", 3 errors" in res.stdout and "files/s" in res.stdout
    assert len(read_rows(out)) == len(TOP_GOOD | SUB_GOOD | BAD)


@pytest.mark.parametrize("case", ["missing_bundle", "bad_out"])
def test_cli_errors_exit_2_with_one_line(tiny_bundle, folder, tmp_path, case):
    """The real command (a subprocess, logging as users see it): one line on stderr, status 2."""
    bundle = tmp_path / "nope" if case == "missing_bundle" else tiny_bundle
    out = tmp_path / ("scores.csv" if case == "missing_bundle" else "scores.xlsx")
    res = subprocess.run([sys.executable, "-m", "detector_server.score_cli", str(bundle),
                          str(folder), "--out", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert ("not found" if case == "missing_bundle" else "xlsx") in lines[0]
