"""Finding, reading and decoding the files of `rwood-score`: numpy and Pillow only.

Use this module wherever files of a folder must become model input exactly as `rwood-score` reads
them. Both engines read through it: the local engine's decode processes run `decode_files` (via
`DecodeAhead`) and the Ray engine's actors run the same `decode_files` on their batch of paths,
so both apply the same guards. It imports no ONNX Runtime or FAISS, so decode processes start fast.

Which files: `list_files` lists every regular file under a folder (its top level, or all of it
with `recursive`). Each is read once by `decode_files`. A file with a common image extension
(`IMAGE_EXTENSIONS`) or whose bytes Pillow recognises as an image gets a status: "" (decoded) or
an error message (unreadable, truncated, empty, a text file named .png), which becomes an error
row. Any other file (README.txt, .DS_Store) gets None: no row, counted as skipped. So a .jpg that
is really a PNG is scored, and a bad file never stops the run. Two guards keep one file from
exhausting memory: a file without an image suffix is read past its first 64 KiB only when those
are an image header, and a file over 1 GiB is not read at all (error row).

Decoding is `preprocess.decode_image` + `to_model_array` with the bundle's spec, what
`Detector.prepare` does with bytes, so scores equal the server's for the same file.

Test: tests/runtime/test_score_folder.py (listing, guards, dead decode processes) and
tests/runtime/test_score_ray.py (the same guards in the Ray engine).
"""
from __future__ import annotations

import errno
import io
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InputError
from .preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode_image, to_model_array

__all__ = ["IMAGE_EXTENSIONS", "list_files", "decode_files", "decode_blobs", "DecodeAhead"]

log = logging.getLogger(__name__)

# Files with these suffixes always get a row (an error row if they do not decode); other files
# get one only when Pillow recognises their bytes as an image.
IMAGE_EXTENSIONS = frozenset((".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif",
                              ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
                              ".ico", ".avif", ".qoi", ".apng"))
_MAX_FILE_BYTES = 1 << 30       # larger files get an error row without being read
_SNIFF_BYTES = 1 << 16          # header read from a file without an image suffix
_ORPHAN_CHECK_S = 0.5           # how often a decoding process checks that its parent lives


def list_files(root: str | os.PathLike, recursive: bool = False,
               exclude: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Regular files under `root` (top level, or the whole tree with `recursive`; symlinked
    folders are not followed) as "/"-separated paths relative to `root`: each folder's files
    sorted by name, then its subfolders'. `exclude`: paths to leave out (the output files).
    Raises InputError naming the path when `root` is not a directory."""
    base = Path(root)
    if not base.is_dir():
        raise InputError("expected a directory of images", path=base)
    top = os.path.abspath(base)
    skip = {Path(os.path.relpath(os.path.abspath(p), top)).as_posix() for p in exclude}
    found: list[str] = []
    stack = [("", top)]
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list %s: %s", folder, e.strerror or e)
            continue
        subdirs = []
        for e in entries:
            if e.is_file():
                if prefix + e.name not in skip:
                    found.append(prefix + e.name)
            elif recursive and e.is_dir(follow_symlinks=False):
                subdirs.append((prefix + e.name + "/", e.path))
        stack.extend(reversed(subdirs))
    return found


def decode_blobs(blobs: Sequence[Any], names: Sequence[str], spec: PreprocessSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str | None]]:
    """Decode encoded files exactly as `Detector.prepare` does with bytes.

    blobs: file contents (bytes), or an `OSError` for a file that could not be read; names: the
    file names (their suffix decides whether an undecodable file is an error or not an image).
    Returns (uint8 [n_decoded, S, S, 3] in order, status per file): status "" = decoded, a
    message = error row, None = not an image (no row).
    """
    arrays: list[np.ndarray] = []
    status: list[str | None] = []
    for blob, name in zip(blobs, names):
        if isinstance(blob, OSError):
            status.append(f"cannot read file: {blob.strerror or blob}")
            continue
        try:
            arrays.append(to_model_array(decode_image(bytes(blob), max_pixels), spec))
            status.append("")
        except Exception as e:  # InputError, or anything a decoder may raise: one row, not a crash
            known = Path(name).suffix.lower() in IMAGE_EXTENSIONS or _looks_like_image(blob)
            status.append((str(e) or type(e).__name__) if known else None)
    s = spec.size
    out = np.stack(arrays) if arrays else np.empty((0, s, s, 3), np.uint8)
    return out, status


def decode_files(root: str, paths: Sequence[str], spec: PreprocessSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str | None]]:
    """Read `paths` (relative to `root`) and `decode_blobs` them: the task of a local decode
    process and of a Ray actor, so both engines apply the same guards.

    Files without an image suffix are read only when their first bytes are an image header, and
    files over `_MAX_FILE_BYTES` are not read at all (error row), so no file can exhaust memory.
    """
    return decode_blobs([_read_file(os.path.join(root, p)) for p in paths], paths, spec,
                        max_pixels)


def _read_file(path: str) -> bytes | OSError:
    """The file's bytes; b"" for a file that is not an image by suffix or header; or the OSError."""
    try:
        with open(path, "rb") as f:
            head = b""
            if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
                head = f.read(_SNIFF_BYTES)
                if not _looks_like_image(head):
                    return b""
            size = os.fstat(f.fileno()).st_size
            if size > _MAX_FILE_BYTES:
                return OSError(errno.EFBIG, f"file is {size} bytes, over the limit of "
                                            f"{_MAX_FILE_BYTES}")
            return head + f.read()
    except OSError as e:
        return e


def _looks_like_image(data: bytes) -> bool:
    """True when Pillow recognises `data` (or its first bytes) as an image header.

    Pillow raises UnidentifiedImageError when no format claims the bytes; any other error
    (a header cut short, a decompression bomb) comes from a format that did claim them.
    """
    if not data:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)):
                return True
    except Image.UnidentifiedImageError:
        return False
    except Exception:
        return True


# ---------------------------------------------------------------- the decode process pool

def _worker_init(parent: int) -> None:
    """In each decoding process: leave Ctrl-C to the main process (it stops the pool), and exit
    within a second when the main process is gone (killed by SIGKILL, say) instead of lingering."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_ORPHAN_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


class DecodeAhead:
    """Iterating yields (chunk, decode(root, chunk, spec, max_pixels)) in order.

    With workers, spawned processes (not forked: the parent runs ONNX Runtime / OpenMP threads)
    start at once and keep `depth` chunks decoded or in progress ahead of the consumer. If a
    worker dies (a decoder crash, the OOM killer), the pool is restarted and the chunk at the
    head is decoded file by file in a process of its own, so the file at fault gets an error
    instead of stopping the run. `close()` stops the workers. workers=0 decodes in this process.
    """

    def __init__(self, root: str, chunks: list[list[str]], spec: PreprocessSpec,
                 max_pixels: int, workers: int, depth: int, decode: Callable = decode_files):
        self._root, self._args, self._decode = root, (spec, max_pixels), decode
        self._todo, self._workers = iter(chunks), workers
        self._inflight: deque = deque()
        self._pool = self._new_pool(workers) if workers > 0 else None
        for _ in range(depth if self._pool else 0):
            if not self._submit():
                break

    @staticmethod
    def _new_pool(workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))

    def _submit(self) -> bool:
        chunk = next(self._todo, None)
        if chunk is not None:
            fut = self._pool.submit(self._decode, self._root, chunk, *self._args)
            self._inflight.append((chunk, fut))
        return chunk is not None

    def __iter__(self) -> Iterator[tuple[list[str], tuple[np.ndarray, list[str | None]]]]:
        if self._pool is None:
            for chunk in self._todo:
                yield chunk, self._decode(self._root, chunk, *self._args)
            return
        while self._inflight:
            chunk, fut = self._inflight.popleft()
            try:
                result = fut.result()
            except BrokenProcessPool:
                result = self._recover(chunk)
            self._submit()
            yield chunk, result

    def _recover(self, chunk: list[str]) -> tuple[np.ndarray, list[str | None]]:
        """The pool broke: restart it with the other chunks in flight, isolate this one."""
        log.warning("a decoding process died; decoding %d files one by one", len(chunk))
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._new_pool(self._workers)
        pending = [c for c, _ in self._inflight]
        self._inflight.clear()
        for c in pending:
            self._inflight.append((c, self._pool.submit(self._decode, self._root, c, *self._args)))
        arrays, status = [], []
        solo = self._new_pool(1)
        try:
            for path in chunk:
                try:
                    a, st = solo.submit(self._decode, self._root, [path], *self._args).result()
                except BrokenProcessPool:
                    solo.shutdown(wait=True)
                    solo = self._new_pool(1)
                    a, st = None, ["the decoding process died on this file"]
                arrays += [a] if a is not None and len(a) else []
                status += st
        finally:
            solo.shutdown(wait=True)
        s = self._args[0].size
        return (np.concatenate(arrays) if arrays else np.empty((0, s, s, 3), np.uint8)), status

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
