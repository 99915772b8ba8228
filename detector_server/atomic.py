"""Atomic, durable file writes: the one helper every part of the project writes files with.

Use `atomic_write(path, write)` for any file a crash must never leave torn (checkpoints, the
bank, reports, manifests, score tables): `write(tmp_path)` fills a temporary file beside `path`,
which is fsynced, renamed over `path` (atomic on POSIX within one filesystem) and then the
directory is fsynced so the rename itself survives a power cut. Readers see the old file or the
new one, never a mix. Standard library only: the torch-free runtime and the trainer share it.
Test: tests/runtime/test_atomic.py.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "write_bytes_atomic", "write_text_atomic", "write_json_atomic",
           "fsync_file", "fsync_dir", "exchange_paths"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file (or a directory) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so renames inside it are durable; a no-op where the filesystem refuses."""
    try:
        fsync_file(path)
    except OSError:  # some filesystems do not support fsync on directories
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then move it over `path` durably.

    The temporary file is hidden (`.NAME.*`), gets the permissions a plain `open` would give,
    and is removed if `write` raises (the old `path`, if any, is left untouched). Parent
    folders are created. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, allow_nan: bool = True,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """Write `obj` as indented JSON (with a final newline) to `path` atomically.

    allow_nan=False refuses NaN/inf (ValueError) where the reader needs strict JSON;
    `default` converts objects json cannot (e.g. `str`).
    """
    text = json.dumps(obj, indent=2, allow_nan=allow_nan, default=default) + "\n"
    return write_text_atomic(path, text)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2     # <fcntl.h>, <linux/fs.h>


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths (e.g. directories) in one atomic step: Linux `renameat2` with
    RENAME_EXCHANGE, so a reader of `b` sees the old or the new content and never nothing.

    Returns False where the system or the filesystem cannot (not Linux, old kernel, a filesystem
    without the flag): the caller falls back to two renames. Raises OSError for other failures
    (a missing path, paths on different filesystems).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):       # a C library without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))
