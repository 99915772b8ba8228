"""detector_server.atomic: the one atomic, durable write every part of the project uses."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from detector_server import atomic
from detector_server.atomic import atomic_write, write_bytes_atomic, write_json_atomic


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old contents")

    def failing(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of the new")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of a write: same guarantee
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_creates_parents_with_normal_permissions(tmp_path):
    target = tmp_path / "a" / "b" / "c.json"
    write_json_atomic(target, {"x": 1, "p": Path("/tmp")}, default=str)
    assert json.loads(target.read_text()) == {"x": 1, "p": "/tmp"}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_strict_json_refuses_nan_and_keeps_old_file(tmp_path):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"ok": 1}, allow_nan=False)
    with pytest.raises(ValueError):
        write_json_atomic(target, {"bad": float("nan")}, allow_nan=False)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_file_and_directory_are_fsynced(tmp_path, monkeypatch):
    """The data reaches the disk before the rename, and the rename itself is made durable."""
    synced: list[tuple[str, bool]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))
        real(fd)
    monkeypatch.setattr(atomic.os, "fsync", spy)
    write_bytes_atomic(tmp_path / "out.bin", b"data")
    assert [is_dir for _, is_dir in synced] == [False, True]
    assert Path(synced[0][0]).parent == tmp_path and Path(synced[0][0]).name.startswith(".out.bin.")
    assert Path(synced[1][0]) == tmp_path
    assert (tmp_path / "out.bin").read_bytes() == b"data"
