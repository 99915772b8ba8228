"""detector_server.listing: the one folder walk (symlinks followed, loops cut, bad entries kept with
a reason) and the guarded read (no FIFO, no device, a size limit), on real files and links."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from detector_server import listing
from detector_server.errors import InputError
from detector_server.listing import IMAGE_EXTENSIONS, list_files, read_file

pytestmark = pytest.mark.timeout(60)     # a FIFO that blocks a read fails here, never hangs


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{a.png, b.txt, .hidden.png, cls/c.png, deep/d/e.jpg} and elsewhere/{x.png, inner/y.png},
    with root/linked -> elsewhere (a symlinked folder), root/cls/up -> .. (a loop) and
    root/again -> elsewhere (a second link to one folder)."""
    root, other = tmp_path / "root", tmp_path / "elsewhere"
    for p in ("a.png", "b.txt", ".hidden.png", "cls/c.png", "deep/d/e.jpg"):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(b"x")
    (other / "inner").mkdir(parents=True)
    (other / "x.png").write_bytes(b"x")
    (other / "inner" / "y.png").write_bytes(b"x")
    (root / "linked").symlink_to(other, target_is_directory=True)
    (root / "again").symlink_to(other, target_is_directory=True)
    (root / "cls" / "up").symlink_to("..", target_is_directory=True)
    return root


def test_symlinked_folders_are_followed_once_and_loops_cut(tree: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="detector_server.listing"):
        found = list_files(tree)
    assert found.files == [".hidden.png", "a.png", "again/inner/y.png", "again/x.png", "b.txt",
                           "cls/c.png", "deep/d/e.jpg"], "sorted by path, folder by folder"
    assert sorted(found.repeated) == ["cls/up", "linked"] and found.broken == []
    assert "not entering 2 links to folders already listed" in caplog.text


def test_suffixes_hidden_and_top_level_only(tree: Path):
    assert list_files(tree, suffixes=IMAGE_EXTENSIONS, hidden=False).files == [
        "a.png", "again/inner/y.png", "again/x.png", "cls/c.png", "deep/d/e.jpg"]
    assert list_files(tree, recursive=False).files == [".hidden.png", "a.png", "b.txt"]
    assert list_files(tree, exclude=[tree / "a.png"], recursive=False).files == [
        ".hidden.png", "b.txt"]


def test_bad_entries_are_kept_with_a_reason_and_never_raise(tmp_path: Path):
    (tmp_path / "ok.png").write_bytes(b"x")
    (tmp_path / "ok.png.d").mkdir()
    (tmp_path / "loop_a").symlink_to("loop_b")
    (tmp_path / "loop_b").symlink_to("loop_a")
    (tmp_path / "through_file.png").symlink_to("ok.png/x")
    (tmp_path / "dangling.png").symlink_to("missing.png")
    os.mkfifo(tmp_path / "pipe.png")
    found = list_files(tmp_path, suffixes=IMAGE_EXTENSIONS)
    assert found.files == ["ok.png"]
    why = dict(found.broken)
    assert sorted(why) == ["dangling.png", "loop_a", "loop_b", "pipe.png", "through_file.png"]
    assert "symlink to 'ok.png/x'" in why["through_file.png"]
    assert "symbolic links" in why["loop_a"] and "missing.png" in why["dangling.png"]
    assert why["pipe.png"] == "not a regular file (a FIFO)"
    assert [p for p, _ in found.entries] == ["dangling.png", "loop_a", "loop_b", "ok.png",
                                             "pipe.png", "through_file.png"], "walk order"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_a_subfolder_that_cannot_be_listed_is_an_entry(tmp_path: Path):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "a.png").write_bytes(b"x")
    (tmp_path / "locked").chmod(0)
    try:
        found = list_files(tmp_path)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert found.broken == [("locked", f"cannot list folder: {os.strerror(13)}")]


def test_root_errors_name_the_path(tmp_path: Path):
    with pytest.raises(InputError, match="No such file") as e:
        list_files(tmp_path / "missing")
    assert e.value.path == str(tmp_path / "missing")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(InputError, match="expected a folder"):
        list_files(tmp_path / "f.png")


def test_read_file_refuses_fifos_devices_and_oversized_files(tmp_path: Path, monkeypatch):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(OSError, match="not a regular file \\(a FIFO\\)"):
        read_file(tmp_path / "pipe.png")              # before: open() waited for a writer
    with pytest.raises(OSError, match="character device"):
        read_file("/dev/zero")                        # would never end
    with open(tmp_path / "sparse.png", "wb") as f:     # sparse: no disk used, never read
        f.truncate(2000)
    with pytest.raises(OSError, match="2000 bytes, over the limit of 1000"):
        read_file(tmp_path / "sparse.png", max_bytes=1000)
    assert read_file(tmp_path / "sparse.png", max_bytes=2000) == bytes(2000)
    (tmp_path / "link.png").symlink_to("sparse.png/x")
    with pytest.raises(OSError, match="symlink to 'sparse.png/x'"):
        read_file(tmp_path / "link.png")
    assert listing.MAX_FILE_BYTES == 1 << 30
