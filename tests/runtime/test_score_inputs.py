"""rwood-score through its CLI: what it reads (folders, files, --files-from, symlinks, bad entries,
FIFOs), what it refuses (an existing --out, inputs without an image), what its rows say about a
bad file, the summary it prints, and the memory a decode worker holds.

Real digit scans (shipped with scikit-learn) as PNG files; every file is small (sparse files stand
in for large ones).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from real_images import png_bytes

from detector_server import score_decode as sd
from detector_server.preprocess import PreprocessSpec
from detector_server.score_cli import score_main
from detector_server.score_folder import score_folder
from detector_server.score_table import partial_path, read_rows

pytestmark = pytest.mark.timeout(300)    # a read that blocks on a FIFO fails, never hangs
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pngs(id_images: np.ndarray) -> list[bytes]:
    return [png_bytes(a) for a in id_images[:12]]


def _folder(root: Path, pngs: list[bytes], names: list[str]) -> Path:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(pngs[i % len(pngs)])
    return root


def score(bundle: Path, *args: str | Path, stdin: str | None = None):
    """rwood-score in process (decoding in this process, no progress bar)."""
    return CliRunner().invoke(score_main, [str(bundle), *map(str, args), "--workers", "0",
                                           "--no-progress"], input=stdin)


def _ok(res) -> str:
    assert res.exit_code == 0, (res.output, res.exception)
    return res.stdout


def _error(res, *words: str) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _rows(out: Path) -> dict:
    return {r.path: r for r in read_rows(out)}


# ------------------------------------------------------------------ 15.10, 16.4: links, bad entries

def test_symlinked_class_folders_are_scored_and_bad_links_become_error_rows(tiny_bundle, pngs,
                                                                            tmp_path):
    """Before: symlinked folders were not entered (0 files, a header-only CSV, exit 0), and one
    symlink loop or link to file.png/x stopped the run with an OSError traceback."""
    store = _folder(tmp_path / "store", pngs, ["cat/0.png", "cat/1.png", "dog/2.png"])
    src = tmp_path / "in"
    src.mkdir()
    for cls in ("cat", "dog"):
        (src / cls).symlink_to(store / cls, target_is_directory=True)
    (src / "cat_again").symlink_to(store / "cat", target_is_directory=True)   # listed once
    (store / "dog" / "loop").symlink_to(src, target_is_directory=True)        # a loop
    (src / "loop_a.png").symlink_to("loop_b.png")
    (src / "loop_b.png").symlink_to("loop_a.png")
    (src / "through.png").symlink_to("cat/0.png/x")
    out = tmp_path / "scores.csv"
    text = _ok(score(tiny_bundle, src, "--recursive", "--out", out))
    rows = _rows(out)
    assert sorted(rows) == ["cat/0.png", "cat/1.png", "dog/2.png", "loop_a.png", "loop_b.png",
                            "through.png"]
    assert all(rows[p].error == "" for p in ("cat/0.png", "cat/1.png", "dog/2.png"))
    assert "symbolic links" in rows["loop_a.png"].error
    assert "symlink to 'cat/0.png/x'" in rows["through.png"].error
    assert all(math.isnan(rows[p].score) for p in ("loop_a.png", "loop_b.png", "through.png"))
    assert "this call   3 scored" in text and ", 3 errors" in text


def test_folders_without_images_exit_2_and_write_nothing(tiny_bundle, pngs, tmp_path):
    empty, notes, nested = tmp_path / "empty", tmp_path / "notes", tmp_path / "nested"
    empty.mkdir()
    notes.mkdir()
    (notes / "README.txt").write_text("no images here\n")
    _folder(nested, pngs, ["sub/0.png"])
    out = tmp_path / "scores.csv"
    _error(score(tiny_bundle, empty, "--out", out), "no files in this folder", str(empty))
    _error(score(tiny_bundle, notes, "--out", out), "no image files among the 1 files")
    _error(score(tiny_bundle, nested, "--out", out), "--recursive")
    assert list(tmp_path.glob("scores*")) == [], "no table, no partial file"


# ------------------------------------------------------------------ 15.11: files, paths, lists

def test_files_several_paths_and_files_from(tiny_bundle, pngs, tmp_path, monkeypatch):
    """Before: a file as INPUT was refused ("Directory ... is a file") and only one INPUT was
    accepted. Row paths are as named, relative to the current folder."""
    _folder(tmp_path / "a", pngs, ["0.png", "1.png", "sub/2.png"])
    _folder(tmp_path / "b", pngs, ["3.png", "4.png"])
    monkeypatch.chdir(tmp_path)
    _ok(score(tiny_bundle, "b/3.png", "--out", "one.csv"))
    assert list(_rows(Path("one.csv"))) == ["b/3.png"]
    _ok(score(tiny_bundle, "a/", "b/4.png", "a/0.png", "--out", "two.jsonl"))
    assert list(_rows(Path("two.jsonl"))) == ["a/0.png", "a/1.png", "b/4.png"], "each file once"
    Path("list.txt").write_text("b/3.png\na/sub/2.png\n\nb/missing.png\n")
    _ok(score(tiny_bundle, "--files-from", "list.txt", "--out", "three.csv"))
    rows = _rows(Path("three.csv"))
    assert list(rows) == ["b/3.png", "a/sub/2.png", "b/missing.png"]
    assert rows["a/sub/2.png"].error == "" and "No such file" in rows["b/missing.png"].error
    _ok(score(tiny_bundle, "a/0.png", "--files-from", "-", "--out", "four.csv",
              stdin="b/4.png\n"))
    assert list(_rows(Path("four.csv"))) == ["a/0.png", "b/4.png"]
    _error(score(tiny_bundle, "a/nope.png", "--out", "five.csv"), "no such file", "a/nope.png")
    _error(score(tiny_bundle, "--out", "five.csv"), "--files-from")


# ------------------------------------------------------------------ 15.12, 15.14: error rows

@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_error_rows_say_what_is_wrong_and_leave_is_ood_empty(tiny_bundle, pngs, tmp_path,
                                                             suffix):
    """Before: "field 'data': cannot decode image: ..." (the gRPC field name) and is_ood false,
    so an undecodable file read as in-distribution."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    src = _folder(tmp_path / "in", pngs, ["ok.png"])
    (src / "text.png").write_text("this is not an image\n")
    (src / "empty.jpg").write_bytes(b"")
    (src / "cut.png").write_bytes(pngs[1][:300])
    out = tmp_path / f"scores{suffix}"
    _ok(score(tiny_bundle, src, "--out", out))
    rows = _rows(out)
    assert rows["text.png"].error == ("not an image: no supported image format starts with "
                                      "b'this is not an i'")
    assert rows["empty.jpg"].error == "empty file (0 bytes)"
    assert rows["cut.png"].error.startswith("cannot decode image:")
    assert not any("field" in r.error for r in rows.values())
    assert [r.is_ood for p, r in rows.items() if r.error] == [None] * 3
    assert isinstance(rows["ok.png"].is_ood, bool)
    if suffix == ".csv":
        lines = {ln.split(",", 1)[0]: ln.split(",") for ln in out.read_text().splitlines()[1:]}
        assert lines["text.png"][2] == "" and lines["ok.png"][2] in ("true", "false")
    elif suffix == ".jsonl":
        raw = {d["path"]: d for d in map(json.loads, out.read_text().splitlines())}
        assert raw["empty.jpg"]["is_ood"] is None and raw["ok.png"]["is_ood"] in (True, False)
    else:
        import pyarrow.parquet as pq

        t = pq.read_table(out).to_pydict()
        assert [o for p, o in zip(t["path"], t["is_ood"]) if p != "ok.png"] == [None] * 3


# ------------------------------------------------------------------ 15.13: existing output

def test_existing_output_is_refused_without_resume_or_force(tiny_bundle, pngs, tmp_path):
    """Before: a second run silently replaced the table of the first."""
    src = _folder(tmp_path / "in", pngs, ["0.png", "1.png"])
    out = tmp_path / "scores.csv"
    _ok(score(tiny_bundle, src, "--out", out))
    before = out.read_bytes()
    _error(score(tiny_bundle, src, "--out", out), "the output exists", "--resume", "--force")
    assert out.read_bytes() == before
    partial_path(out).write_text("")
    out.unlink()
    _error(score(tiny_bundle, src, "--out", out), "an unfinished run left rows here")
    _ok(score(tiny_bundle, src, "--out", out, "--force"))
    assert out.read_bytes() == before and not partial_path(out).exists()
    assert "0 read now" in _ok(score(tiny_bundle, src, "--out", out, "--resume"))


# ------------------------------------------------------------------ 15.15: the summary

def _summary(text: str) -> dict:
    m = re.search(r"time +([\d.]+) s = ([\d.]+) s listing \+ ([\d.]+) s start-up \+ ([\d.]+) s "
                  r"scoring \(([\d.]+) files/s\) \+ ([\d.]+) s writing", text)
    assert m, text
    total, listing_s, startup, scoring, rate, writing = map(float, m.groups())
    out = re.search(r"output +.*: (\d+) rows, (\d+) scored \((\d+) OOD, ([\d.]+)%\), (\d+) errors",
                    text)
    read = re.search(r"input +(\d+) files: (\d+) read now", text)
    assert out and read, text
    return dict(total=total, parts=(listing_s, startup, scoring, writing), rate=rate,
                rows=int(out[1]), scored=int(out[2]), ood=int(out[3]), share=float(out[4]),
                errors=int(out[5]), read=int(read[2]))


def test_summary_times_add_up_and_totals_cover_the_whole_table(tiny_bundle, pngs, tmp_path,
                                                              monkeypatch):
    """Before: start-up was the time to the first scored batch (all of it, for a folder that
    fits one batch, with the same rate before and after it), and after --resume the counts and
    the OOD share were those of the last call only."""
    src = _folder(tmp_path / "in", pngs, [f"{i:02d}.png" for i in range(12)])
    (src / "bad.png").write_text("not an image")
    (tmp_path / "half.txt").write_text("".join(f"{i:02d}.png\n" for i in range(6)))
    out = tmp_path / "scores.jsonl"
    monkeypatch.chdir(src)                  # the listed names are then the folder's row paths
    first = _summary(_ok(score(tiny_bundle, "--files-from", tmp_path / "half.txt", "--out", out)))
    assert first["rows"] == 6 and first["read"] == 6
    text = _ok(score(tiny_bundle, src, "--out", out, "--resume"))
    s = _summary(text)
    rows = read_rows(out)
    assert s["rows"] == len(rows) == 13 and s["read"] == 7
    assert s["scored"] == sum(not r.error for r in rows) and s["errors"] == 1
    assert s["ood"] == sum(bool(r.is_ood) for r in rows)
    assert s["share"] == pytest.approx(100 * s["ood"] / s["scored"], abs=0.05)
    assert sum(s["parts"]) == pytest.approx(s["total"], abs=1e-6), "the printed parts add up"
    demo = _demo_module().score_figures(text)      # `make demo` repeats these very figures
    assert demo.startswith(f"13 files in {s['total']} s ({s['parts'][1]} s start-up)"), demo
    assert demo.endswith(f"{s['rate']:.0f} files/s scoring"), demo
    # the same numbers unrounded: start-up (the model load) is apart from scoring, and the rate
    # is that of the scoring phase
    summary = score_folder(tiny_bundle, src, tmp_path / "again.csv", workers=0, progress=False)
    assert summary.startup_s > 0 and summary.scoring_s > 0
    assert summary.files_per_s == pytest.approx(13 / summary.scoring_s)
    assert summary.seconds == pytest.approx(summary.list_s + summary.startup_s +
                                            summary.scoring_s + summary.write_s)


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ 16.10: Parquet names

def test_parquet_resume_keeps_a_name_that_is_not_utf8(tiny_bundle, pngs, tmp_path):
    """Before: the name was written as \\xNN text, read back as another name, and --resume
    scored the file again (13 rows became 14)."""
    pytest.importorskip("pyarrow")
    odd = os.fsdecode(b"caf\xe9.png")
    src = _folder(tmp_path / "in", pngs, ["a.png", odd, "b\\xe9.png"])   # and a look-alike
    out = tmp_path / "scores.parquet"
    _ok(score(tiny_bundle, src, "--out", out))
    text = _ok(score(tiny_bundle, src, "--out", out, "--resume"))
    assert "0 read now" in text
    assert sorted(_rows(out)) == sorted(["a.png", odd, "b\\xe9.png"])
    import pyarrow.parquet as pq

    assert "caf\\xe9.png" in pq.read_table(out).column("path").to_pylist(), "readable elsewhere"


# ------------------------------------------------------------------ 16.11: a FIFO at read time

def test_a_file_replaced_by_a_fifo_after_listing_gets_an_error_row(tiny_bundle, pngs, tmp_path,
                                                                   monkeypatch):
    """Before: open() of the FIFO waited for a writer forever."""
    src = _folder(tmp_path / "in", pngs, ["a.png", "b.png", "c"])
    os.mkfifo(src / "listed_fifo.png")
    collect = sd.collect_inputs

    def then_swap(*args, **kwargs):
        found = collect(*args, **kwargs)
        for name in ("b.png", "c"):
            (src / name).unlink()
            os.mkfifo(src / name)
        return found

    monkeypatch.setattr(sd, "collect_inputs", then_swap)
    monkeypatch.setattr("detector_server.score_folder.collect_inputs", then_swap)
    out = tmp_path / "scores.csv"
    _ok(score(tiny_bundle, src, "--out", out))
    rows = _rows(out)
    assert sorted(rows) == ["a.png", "b.png", "c", "listed_fifo.png"]
    for name in ("b.png", "c", "listed_fifo.png"):
        assert rows[name].error == "cannot read file: not a regular file (a FIFO)"
    assert rows["a.png"].error == ""


# ------------------------------------------------------------------ 16.9: bytes per worker

def test_a_decode_task_holds_one_file_at_a_time(tmp_path):
    """A worker's task is a chunk of up to 32 files of up to 1 GiB each. Before, it read the whole
    chunk before decoding any of it (6 sparse 400 MiB files made a 2.4 GB worker); now the peak
    is about one file. Six sparse 16 MiB files with an image suffix stand in for them."""
    size, n = 16 << 20, 6
    for i in range(n):
        with open(tmp_path / f"big{i}.png", "wb") as f:
            f.truncate(size)
    spec = PreprocessSpec(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    tracemalloc.start()
    try:
        _, status = sd.decode_files(str(tmp_path), [f"big{i}.png" for i in range(n)], spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(st and st.startswith("not an image") for st in status)
    assert peak < 2.5 * size, f"peak {peak / 2**20:.0f} MiB for {n} files of {size >> 20} MiB"


def test_decode_processes_and_resume_are_unchanged_by_the_one_file_read(tiny_bundle, pngs,
                                                                        tmp_path):
    """The local engine with a decode process gives the rows of the in-process path."""
    src = _folder(tmp_path / "in", pngs, [f"{i}.png" for i in range(5)])
    shutil.copy(src / "0.png", src / "copy.png")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _ok(score(tiny_bundle, src, "--out", a))
    res = CliRunner().invoke(score_main, [str(tiny_bundle), str(src), "--out", str(b),
                                          "--workers", "1", "--batch-size", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    ra, rb = _rows(a), _rows(b)
    assert list(ra) == list(rb)
    assert all(abs(ra[p].score - rb[p].score) <= 1e-6 for p in ra)
