"""rwood-score killed by SIGKILL mid-run, then --resume: every file exactly once, scores unchanged.

tests/runtime/test_score_folder.py simulates a crash inside the process (an exception, a torn
line); here the real CLI process is killed from outside, with a decode worker running, and the
resume is checked against an uninterrupted run. Also: no decode worker outlives its killed parent.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hostile_corpus import PYTHON, encode, raw_jpeg_files, subprocess_env
from PIL import Image

from detector_server.score_folder import score_folder
from detector_server.score_table import partial_path, read_rows

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def folder(id_images, tmp_path_factory) -> Path:
    """240 real images (photo JPEGs, slow enough to decode to be caught mid-run, and digit PNGs)
    in two levels, plus a few bad files that must get error rows."""
    root = tmp_path_factory.mktemp("score_folder")
    (root / "sub").mkdir()
    jpegs = raw_jpeg_files(100)
    for i in range(160):
        (root / ("sub" if i % 2 else ".") / f"photo{i:03d}.jpg").write_bytes(jpegs[i % len(jpegs)])
    for i, a in enumerate(id_images[:76]):
        (root / f"c{i:03d}.png").write_bytes(encode(Image.fromarray(a), "PNG"))
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (root / "sub" / "cut.jpg").write_bytes(jpegs[0][: len(jpegs[0]) // 2])
    (root / "sub" / "html.png").write_text("<html></html>")
    return root


@pytest.fixture(scope="module")
def reference(tiny_bundle, folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("score_ref") / "ref.jsonl"
    score_folder(tiny_bundle, folder, out, recursive=True, workers=0, progress=False)
    rows = read_rows(out)
    assert len(rows) == 240 and sum(bool(r.error) for r in rows) == 4
    return {r.path: r for r in rows}


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _reap(pids: list[int]) -> None:
    """Kill what is left of the children of a killed run: no orphans, even if a test fails."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _score_cmd(bundle: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "detector_server.score_cli", str(bundle), str(folder), "--out", str(out),
            "--recursive", "--batch-size", "8", "--workers", "1", "--device", "cpu",
            "--no-progress", *extra]


def _kill_when_rows(cmd: list[str], partial: Path, min_rows: int) -> list[int]:
    """Run `cmd`, SIGKILL it once `partial` holds `min_rows` lines; returns its child pids."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        t_end = time.monotonic() + 300
        while not (partial.exists() and partial.read_bytes().count(b"\n") >= min_rows):
            assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < t_end
            time.sleep(0.005)
        children = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    return children


def _assert_complete(out: Path, reference: dict) -> None:
    rows = read_rows(out)
    paths = [r.path for r in rows]
    assert len(paths) == len(set(paths)), "a file has two rows"
    assert set(paths) == set(reference), "a file has no row"
    for r in rows:
        ref = reference[r.path]
        assert bool(r.error) == bool(ref.error), r.path
        if not r.error:
            assert r.score == pytest.approx(ref.score, abs=1e-5), r.path
            assert (r.is_ood, r.predicted_class) == (ref.is_ood, ref.predicted_class)
        else:
            assert math.isnan(r.score)


@pytest.fixture(scope="module")
def killed_run(tiny_bundle, folder, tmp_path_factory):
    """rwood-score (one decode worker) SIGKILLed after 16 rows: (out, pids of its children)."""
    out = tmp_path_factory.mktemp("killed_score") / "scores.csv"
    children = _kill_when_rows(_score_cmd(tiny_bundle, folder, out), partial_path(out), 16)
    yield out, children
    _reap(children)


def test_killed_mid_run_then_resume_scores_every_file_once(tiny_bundle, folder, reference,
                                                           killed_run):
    out, _ = killed_run
    assert not out.exists(), "a table was published by a run that never finished"
    kept = read_rows(partial_path(out))
    assert 16 <= len(kept) < len(reference)
    summary = score_folder(tiny_bundle, folder, out, recursive=True, resume=True, workers=0,
                           progress=False)
    assert summary.resumed == len(kept)
    _assert_complete(out, reference)
    assert not partial_path(out).exists()


def test_decode_workers_exit_with_their_killed_parent(killed_run):
    """The spawned decode worker and multiprocessing's resource tracker go away within seconds of
    their parent's SIGKILL (they used to live forever: fixed in score_decode._worker_init)."""
    _, children = killed_run
    assert children, "the decode worker was not running"
    t_end = time.monotonic() + 5
    while any(_alive(c) for c in children):
        assert time.monotonic() < t_end, f"decode workers outlived their parent: {children}"
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_repeatedly_then_resume_scores_every_file_once(tiny_bundle, folder, reference,
                                                              tmp_path):
    """Killed three times in a row (twice while resuming), then finished: still once per file."""
    out = tmp_path / "scores.jsonl"
    partial = partial_path(out)
    children = _kill_when_rows(_score_cmd(tiny_bundle, folder, out), partial, 16)
    for rows in (60, 120):
        children += _kill_when_rows(_score_cmd(tiny_bundle, folder, out, "--resume"), partial, rows)
    _reap(children)
    done = subprocess.run(_score_cmd(tiny_bundle, folder, out, "--resume"), env=subprocess_env(),
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    _assert_complete(out, reference)
