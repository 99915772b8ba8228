"""Listing the files of an image folder and reading them, the same way in every command.

Use `list_files(root)` wherever a folder of images is read: `rwood-score` (through
`score_decode`), `rwood-train --dataset folder`, `rwood-eval`'s folder sets and `rwood-export
--calibration FOLDER` all list through it, so a folder gives the same files everywhere. Use
`read_file(path)` to read one of them with the guards below. Standard library only (no numpy, no
Pillow), so anything may import it.

How a folder is walked:
- symlinks are followed, to files and to folders, wherever they point;
- each real folder is entered once: a link to a folder already entered (a loop such as
  `sub/up -> ..`, or a second link to the same folder) is not followed again (logged);
- an entry that cannot be followed or is not a regular file is listed as `broken` with the reason
  (a dangling link, a link loop, a link to `file.png/x`, a folder that cannot be listed, a FIFO,
  socket or device), never raised: one bad entry does not hide the rest (logged);
- order: sorted by path, folder by folder (a folder's entries by name, a subfolder's contents at
  its place), as `sorted(Path.rglob("*"))` would give them.

How a file is read (`read_file`, `open_regular`): opened non-blocking, so a FIFO put in place of a
file after listing cannot hang the reader, then refused unless it is a regular file; refused
unread over `max_bytes`, and never more than `max_bytes` is read even if the file grows.

Test: tests/runtime/test_listing.py.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "MAX_FILE_BYTES", "Listing", "list_files", "open_regular",
           "read_file", "describe_os_error"]

log = logging.getLogger(__name__)

# The suffixes of image files. `rwood-score` gives every file with one a row (an error row if it
# does not decode) and sniffs the others; the dataset readers read only these.
IMAGE_EXTENSIONS = frozenset((".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif",
                              ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
                              ".ico", ".avif", ".qoi", ".apng"))
MAX_FILE_BYTES = 1 << 30        # larger files are refused without being read
_SHOWN = 5                      # broken entries named in the log line


@dataclass(frozen=True)
class Listing:
    """What `list_files` found under `root`; paths are relative to it, "/"-separated."""

    root: Path
    entries: list[tuple[str, str | None]] = field(default_factory=list)
    # every entry in walk order: (path, None) for a regular file, (path, why) for a broken one
    repeated: list[str] = field(default_factory=list)   # links to folders already entered

    @property
    def files(self) -> list[str]:
        """The regular files, in walk order."""
        return [p for p, why in self.entries if why is None]

    @property
    def broken(self) -> list[tuple[str, str]]:
        """(path, why) of the entries that cannot be read as files, in walk order."""
        return [(p, why) for p, why in self.entries if why is not None]


def list_files(root: str | os.PathLike, *, recursive: bool = True,
               suffixes: Collection[str] | None = None, hidden: bool = True,
               exclude: Iterable[str | os.PathLike] = ()) -> Listing:
    """Walk the folder `root` (see the module docstring for the rules).

    recursive: enter subfolders (else only the top level); suffixes: keep only regular files whose
    lower-cased suffix is in it (None: every regular file; broken entries are always kept);
    hidden: False leaves out every entry whose name starts with "." and all below it; exclude:
    paths to leave out (an output file inside `root`, say).
    Raises InputError naming `root` when it is missing, not a folder or cannot be listed.
    """
    base = Path(root)
    top = os.path.abspath(base)
    try:
        st = os.stat(top)
    except OSError as e:
        raise InputError(describe_os_error(top, e), path=base) from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError("expected a folder of images", path=base)
    skip = {Path(os.path.relpath(os.path.abspath(p), top)).as_posix() for p in exclude}
    out = Listing(base)
    seen = {(st.st_dev, st.st_ino)}
    stack = [("", iter(_entries(top, base)))]       # raises InputError for the root only
    while stack:
        prefix, entries = stack[-1]
        e = next(entries, None)
        if e is None:
            stack.pop()
            continue
        rel = prefix + e.name
        if (not hidden and e.name.startswith(".")) or rel in skip:
            continue
        try:
            st = e.stat()                               # follows symlinks
        except OSError as err:
            out.entries.append((rel, describe_os_error(e.path, err)))
            continue
        if stat.S_ISDIR(st.st_mode):
            if recursive and (st.st_dev, st.st_ino) in seen:
                out.repeated.append(rel)
            elif recursive:
                seen.add((st.st_dev, st.st_ino))
                try:
                    stack.append((rel + "/", iter(_entries(e.path))))
                except OSError as err:
                    out.entries.append((rel, f"cannot list folder: {describe_os_error(e.path, err)}"))
        elif stat.S_ISREG(st.st_mode):
            if suffixes is None or os.path.splitext(e.name)[1].lower() in suffixes:
                out.entries.append((rel, None))
        else:
            out.entries.append((rel, f"not a regular file ({_kind(st.st_mode)})"))
    _log_problems(out)
    return out


def _entries(folder: str, root: Path | None = None) -> list[os.DirEntry]:
    """The entries of `folder` sorted by name. OSError, or InputError naming `root` when given."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        if root is None:
            raise
        raise InputError(describe_os_error(folder, e), path=root) from None


def _log_problems(listing: Listing) -> None:
    broken = listing.broken
    if broken:
        shown = "; ".join(f"{p}: {why}" for p, why in broken[:_SHOWN])
        more = f"; and {len(broken) - _SHOWN} more" if len(broken) > _SHOWN else ""
        log.warning("%s: %d entries cannot be read (%s%s)", listing.root, len(broken), shown, more)
    if listing.repeated:
        log.warning("%s: not entering %d links to folders already listed (a link loop, or a "
                    "second link to one folder): %s", listing.root, len(listing.repeated),
                    ", ".join(listing.repeated[:_SHOWN]))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a file"


def describe_os_error(path: str | os.PathLike, err: OSError) -> str:
    """What went wrong with `path`, in words: the OS's reason, and the target of a symlink."""
    why = err.strerror or str(err)
    try:
        if os.path.islink(path):
            return f"symlink to {os.readlink(path)!r}: {why}"
    except OSError:
        pass
    return why


def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = True) -> BinaryIO:
    """Open `path` for reading without blocking; OSError unless it is a regular file.

    A FIFO opens at once in non-blocking mode (instead of waiting for a writer) and is then
    refused, as are devices, sockets and folders. Reads from the returned file block as usual.
    With `follow_symlinks=False` a symbolic link as the last component is refused (OSError
    ELOOP; the bundle loader's choice), never followed."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_kind(mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file `path`. Raises OSError (with a message that says why) when
    it is not a regular file, cannot be read, or is larger than `max_bytes`."""
    try:
        with open_regular(path) as f:
            return read_bounded(f, max_bytes)
    except OSError as e:
        raise OSError(e.errno, describe_os_error(path, e)) from None


def read_bounded(f: BinaryIO, max_bytes: int) -> bytes:
    """All bytes of the open regular file `f`, from its start; OSError (EFBIG) when it is over
    `max_bytes` by its size, or once more than that has been read (a file that grows while read).
    Memory: one buffer of the file's size (plus the growth, if any)."""
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        raise OSError(errno.EFBIG, f"file is {size} bytes, over the limit of {max_bytes}")
    f.seek(0)
    data = f.read(size + 1)                 # one byte more than expected: did it grow?
    if len(data) > size:
        data += f.read(max_bytes + 1 - len(data))
        if len(data) > max_bytes:
            raise OSError(errno.EFBIG, f"file grew past the limit of {max_bytes} bytes while read")
    return data
