"""Bounded, link-free reads of the files inside a bundle directory (for `bundle.load_bundle`).

Use these, never a bare `open`/`np.load`/`json.loads`, for any file of a bundle the runtime reads
itself: a bundle may come from someone who can also rewrite its checksums (SECURITY.md), so every
read is bounded by the reader, not by the checksums:

- `open_member(root, name)`: a regular file directly inside `root`, opened without following a
  symbolic link (a link is refused even when it points inside the bundle; `root` itself may be a
  link) and without blocking (a FIFO or device is refused, never read): `listing.open_regular`;
- `read_json(root, name)`: at most `MAX_MANIFEST_BYTES`, nested at most `MAX_JSON_DEPTH` deep;
- `read_npy(root, name, dtype, shape)`: the header checked (length at most
  `MAX_NPY_HEADER_BYTES`, dtype, shape, file size) before a byte of data is read or allocated;
- `member_sha256(root, name)`: the SHA-256 of a member, in 1 MiB blocks.

Every refusal is a BundleError naming the file. Test: tests/reliability/test_hostile_bundle.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import BundleError
from .listing import open_regular, read_bounded

__all__ = ["MAX_MANIFEST_BYTES", "MAX_JSON_DEPTH", "MAX_NPY_HEADER_BYTES", "open_member",
           "read_json", "read_npy", "member_sha256"]

MAX_MANIFEST_BYTES = 16 << 20   # an exported manifest is a few kB (class names dominate)
MAX_JSON_DEPTH = 32             # arrays/objects inside each other; an exported manifest has 3
MAX_NPY_HEADER_BYTES = 10_000   # numpy's own default (np.save writes 128 bytes)

_NPY_MAGIC = b"\x93NUMPY"
_NPY_LENGTH = {(1, 0): "<H", (2, 0): "<I"}     # header-length field of each .npy version


def open_member(root: str | os.PathLike, name: str, *,
                missing: str = "file listed in the manifest is missing") -> BinaryIO:
    """Open the plain file name `name` inside the directory `root` for binary reading.

    Refuses (BundleError naming the file; `missing` is the message for an absent one) a
    symbolic link, anything but a regular file, and an unreadable file. `name` must be a
    plain name (the manifest's `check_file_name` guarantees it)."""
    path = Path(root) / name
    try:
        return open_regular(path, follow_symlinks=False)
    except FileNotFoundError:
        raise BundleError(missing, path=path) from None
    except OSError as e:
        if path.is_symlink():           # O_NOFOLLOW: ELOOP (EMLINK on some BSDs)
            raise BundleError("is a symbolic link: files inside a bundle must be regular files "
                              "(links are never followed)", path=path) from None
        raise BundleError(f"cannot open: {e.strerror or e}", path=path) from None


def member_sha256(root: str | os.PathLike, name: str) -> str:
    """Hex SHA-256 of the member `name` of `root` (opened with `open_member`)."""
    h = hashlib.sha256()
    with open_member(root, name) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(root: str | os.PathLike, name: str, *, missing: str,
              max_bytes: int = MAX_MANIFEST_BYTES, what: str = "manifest") -> Any:
    """Parse the member `name` of `root` as strict-enough JSON within the bounds above.

    BundleError (naming the file; its message says "unreadable <what>") for a file over
    `max_bytes` (refused from its size), not UTF-8, not JSON (an integer past Python's digit
    limit included), or nested deeper than MAX_JSON_DEPTH."""
    path = Path(root) / name
    with open_member(root, name, missing=missing) as f:
        try:
            data = read_bounded(f, max_bytes)
        except OSError as e:            # over the limit by its size (never read), or unreadable
            raise BundleError(f"unreadable {what}: {e.strerror or e}", path=path) from None
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BundleError(f"unreadable {what}: nested deeper than {MAX_JSON_DEPTH}",
                          path=path) from None
    except ValueError as e:             # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise BundleError(f"unreadable {what}: {str(e)[:200]}", path=path) from None
    if _depth_over(value, MAX_JSON_DEPTH):
        raise BundleError(f"unreadable {what}: nested deeper than {MAX_JSON_DEPTH}", path=path)
    return value


def _depth_over(value: Any, limit: int) -> bool:
    """Whether arrays/objects in `value` nest deeper than `limit` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def read_npy(root: str | os.PathLike, name: str, dtype: np.dtype | type,
             shape: tuple[int | None, ...]) -> np.ndarray:
    """Read the .npy member `name` of `root`, whose layout is known in advance.

    `dtype` must match exactly (byte order included) and `shape` dimension by dimension (None:
    any length). Checked from the header, before any data is read or allocated: the header
    length (at most MAX_NPY_HEADER_BYTES), the format version (1.0 or 2.0, what np.save writes),
    dtype and shape, and that the file holds exactly the data the header declares. No pickle.
    Returns a fresh (writable) array of that dtype and shape."""
    path = Path(root) / name
    want = np.dtype(dtype)
    with open_member(root, name) as f:
        size = os.fstat(f.fileno()).st_size
        got_shape, fortran, got = _npy_header(f, path)
        if got != want or len(got_shape) != len(shape) or any(
                s is not None and s != g for s, g in zip(shape, got_shape)):
            dims = ", ".join("N" if s is None else str(s) for s in shape)
            raise BundleError(f"expected {want} [{dims}], got {got} {got_shape}", path=path)
        count = math.prod(got_shape)            # Python ints: no overflow
        if size - f.tell() != count * want.itemsize:
            raise BundleError(f"file size {size} does not match its header ({count} x "
                              f"{want.itemsize} bytes of data after {f.tell()}): truncated or "
                              "padded", path=path)
        data = np.fromfile(f, dtype=want, count=count)
    if data.size != count:
        raise BundleError("file shrank while it was read", path=path)
    return data.reshape(got_shape, order="F" if fortran else "C")


def _npy_header(f: BinaryIO, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open .npy file, its declared header length checked
    before the header is read (numpy reads up to 4 GiB of header before checking its size)."""
    magic = f.read(8)
    if len(magic) != 8 or magic[:6] != _NPY_MAGIC:
        raise BundleError("not a .npy file (bad magic)", path=path)
    version = (magic[6], magic[7])
    if version not in _NPY_LENGTH:
        raise BundleError(f"unsupported .npy format version {version}", path=path)
    field = f.read(struct.calcsize(_NPY_LENGTH[version]))
    if len(field) != struct.calcsize(_NPY_LENGTH[version]):
        raise BundleError("truncated .npy header", path=path)
    length = struct.unpack(_NPY_LENGTH[version], field)[0]
    if length > MAX_NPY_HEADER_BYTES:
        raise BundleError(f".npy header of {length} bytes: over the limit of "
                          f"{MAX_NPY_HEADER_BYTES}", path=path)
    header = f.read(length)
    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    try:
        return reader(io.BytesIO(field + header), max_header_size=MAX_NPY_HEADER_BYTES)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as e:
        raise BundleError(f"bad .npy header: {str(e)[:200]}", path=path) from None
