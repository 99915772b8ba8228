"""Finding, reading and decoding the files of `rwood-score`: numpy and Pillow only.

Use this module wherever files must become model input exactly as `rwood-score` reads them. Both
engines read through it: the local engine's decode processes run `decode_files` (via
`DecodeAhead`) and the Ray engine's actors run the same `decode_files` on their batch of paths,
so both apply the same guards. It imports no ONNX Runtime or FAISS, so decode processes start fast.

Which files (`collect_inputs`): the INPUT paths of `rwood-score` are folders, files, or the lines
of a `--files-from` list. Folders are walked by `listing.list_files`, the one listing of the
project (symlinks followed, loops cut, an entry that cannot be followed kept so that it gets an
error row). Each file is read once by `decode_files`. A file with a common image extension
(`IMAGE_EXTENSIONS`) or whose bytes Pillow recognises as an image gets a status: "" (decoded) or
an error message saying what is wrong with the file (not an image, truncated, empty, unreadable,
not a regular file), which becomes an error row. Any other file (README.txt, .DS_Store) gets None:
no row, counted as skipped. So a .jpg that is really a PNG is scored, and a bad file never stops
the run.

Guards (`_read_file`): a file is opened non-blocking and refused unless it is a regular file (a
FIFO cannot hang a worker); a file without an image suffix is read past its first 64 KiB only
when those are an image header; a file over `MAX_FILE_BYTES` (1 GiB) is not read at all (error
row). Files are read and decoded one at a time, so a worker holds the bytes of one file, never of
a whole chunk.

Decoding is `preprocess.decode_image` + `to_model_array` with the bundle's spec, what
`Detector.prepare` does with bytes, so scores equal the server's for the same file.

Test: tests/runtime/test_score_folder.py and tests/runtime/test_score_inputs.py (inputs, guards,
dead decode processes), tests/runtime/test_score_ray.py (the same guards in the Ray engine).
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import listing
from .errors import InputError, ReweightOODError
from .listing import IMAGE_EXTENSIONS, describe_os_error, open_regular, read_bounded
from .preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode_image, to_model_array

__all__ = ["IMAGE_EXTENSIONS", "Inputs", "collect_inputs", "decode_files", "decode_blobs",
           "DecodeAhead"]

log = logging.getLogger(__name__)

_SNIFF_BYTES = 1 << 16          # header read from a file without an image suffix
_ORPHAN_CHECK_S = 0.5           # how often a decoding process checks that its parent lives


# ---------------------------------------------------------------- which files

@dataclass(frozen=True)
class Inputs:
    """The files of one `rwood-score` call. Row paths are `paths`; a file is read at
    os.path.join(root, path)."""

    root: str           # the one INPUT folder (paths relative to it), or "" (paths as given)
    paths: list[str]    # each file once, in order: folders walked, then the next INPUT


def collect_inputs(inputs: Sequence[str | os.PathLike], files_from: str | os.PathLike | None = None,
                   recursive: bool = False, exclude: Iterable[str | os.PathLike] = ()) -> Inputs:
    """The files named by INPUT paths and by the list `files_from` (one path a line; "-": stdin).

    One folder and no list: paths relative to it (the table's historic form). Otherwise each row
    path is the file as named, or FOLDER/relative path for the files of a folder. A folder gives
    its regular files (its subfolders too with `recursive`) and its entries that cannot be read
    (they get error rows); `exclude` (the outputs) is left out. Raises InputError naming the path
    for an INPUT that does not exist or a folder without files; a listed path that does not exist
    is kept (its row says why).
    """
    named = [os.fspath(p) for p in inputs]
    listed = _read_list(files_from) if files_from is not None else []
    if not named and files_from is None:
        raise InputError("give INPUT folders or files, or --files-from LIST", field="input")
    exclude = list(exclude)
    if len(named) == 1 and not listed and files_from is None and os.path.isdir(named[0]):
        return Inputs(named[0], _walk(named[0], recursive, exclude, ""))
    paths: list[str] = []
    for p in named:
        if not os.path.lexists(p):
            raise InputError("no such file or folder", path=p)
        paths += _walk(p, recursive, exclude, p.rstrip("/") + "/") if os.path.isdir(p) else [p]
    for p in listed:
        paths += _walk(p, recursive, exclude, p.rstrip("/") + "/") if os.path.isdir(p) else [p]
    if not paths:
        raise InputError("the list names no files", path=files_from)
    return Inputs("", list(dict.fromkeys(paths)))


def _walk(folder: str, recursive: bool, exclude: list, prefix: str) -> list[str]:
    found = listing.list_files(folder, recursive=recursive, exclude=exclude)
    if not found.entries:
        sub = "" if recursive else "; its subfolders are scored with --recursive"
        raise InputError(f"no files in this folder{sub}", path=folder)
    return [prefix + p for p, _ in found.entries]


def _read_list(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a --files-from list, as file system paths (any bytes)."""
    try:
        if os.fspath(path) == "-":
            data = sys.stdin.buffer.read()
        else:
            with open_regular(path) as f:
                data = read_bounded(f, listing.MAX_FILE_BYTES)
    except OSError as e:
        raise InputError(f"cannot read the list: {describe_os_error(path, e)}",
                         path=path) from None
    return [os.fsdecode(line.rstrip(b"\r")) for line in data.split(b"\n") if line.strip()]


# ---------------------------------------------------------------- reading and decoding

def decode_blobs(blobs: Sequence[Any], names: Sequence[str], spec: PreprocessSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str | None]]:
    """Decode encoded files exactly as `Detector.prepare` does with bytes.

    blobs: file contents (bytes), or an `OSError` for a file that could not be read; names: the
    file names (their suffix decides whether an undecodable file is an error or not an image).
    Returns (uint8 [n_decoded, S, S, 3] in order, status per file): status "" = decoded, a
    message = error row, None = not an image (no row).
    """
    arrays: list[np.ndarray] = []
    status = [_decode_one(blob, name, spec, max_pixels, arrays) for blob, name in zip(blobs, names)]
    s = spec.size
    out = np.stack(arrays) if arrays else np.empty((0, s, s, 3), np.uint8)
    return out, status


def decode_files(root: str, paths: Sequence[str], spec: PreprocessSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str | None]]:
    """Read `paths` (relative to `root`) and decode them as `decode_blobs` does: the task of a
    local decode process and of a Ray actor, so both engines apply the same guards.

    One file at a time: its bytes are dropped once decoded, so the memory held is that of the
    largest file (at most `MAX_FILE_BYTES`) plus the decoded images (S x S x 3 each).
    """
    arrays: list[np.ndarray] = []
    status = [_decode_one(_read_file(os.path.join(root, p)), p, spec, max_pixels, arrays)
              for p in paths]
    s = spec.size
    return (np.stack(arrays) if arrays else np.empty((0, s, s, 3), np.uint8)), status


def _decode_one(blob: Any, name: str, spec: PreprocessSpec, max_pixels: int,
                arrays: list[np.ndarray]) -> str | None:
    """Decode one file into `arrays`; its status ("" decoded, a message, None not an image)."""
    if isinstance(blob, OSError):
        return f"cannot read file: {blob.strerror or blob}"
    try:
        arrays.append(to_model_array(decode_image(bytes(blob), max_pixels), spec))
        return ""
    except Exception as e:  # InputError, or anything a decoder may raise: one row, not a crash
        known = Path(name).suffix.lower() in IMAGE_EXTENSIONS or _looks_like_image(blob)
        return _what_is_wrong(e, blob) if known else None


def _what_is_wrong(e: Exception, blob: bytes) -> str:
    """The error row's message: what is wrong with the file (not the gRPC field it came in)."""
    if not blob:
        return "empty file (0 bytes)"
    if not _looks_like_image(blob):
        return f"not an image: no supported image format starts with {bytes(blob[:16])!r}"
    msg = e.message if isinstance(e, ReweightOODError) else f"{type(e).__name__}: {e}"
    return msg or type(e).__name__


def _read_file(path: str) -> bytes | OSError:
    """The file's bytes; b"" for a file that is not an image by suffix or header; or an OSError
    saying why it cannot be read (not a regular file, over the size limit, ...)."""
    try:
        with open_regular(path) as f:
            if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
                if not _looks_like_image(f.read(_SNIFF_BYTES)):
                    return b""
            return read_bounded(f, listing.MAX_FILE_BYTES)
    except OSError as e:
        return OSError(e.errno, describe_os_error(path, e))


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
