"""Batch scoring of an image folder into one table: the library behind `rwood-score`.

Use `score_folder(bundle, input_dir, out)` to score every image under a folder offline (thousands
to millions of files) into CSV, JSONL or Parquet; `rwood-serve` is for live requests. Scores equal
the server's for the same file and bundle: files are decoded by `preprocess.decode_image` +
`to_model_array` with the bundle's spec (what `Detector.prepare` does with bytes) and scored by
`Detector.score_arrays`.

Which files: every regular file under INPUT (its top level, or all of it with `recursive`) is
read once, in a worker. A file with a common image extension (`IMAGE_EXTENSIONS`) or whose bytes
Pillow recognises as an image gets exactly one row: scored, or with `error` set (unreadable,
truncated, empty, a text file named .png). Any other file (README.txt, .DS_Store) is skipped and
counted. So a .jpg that is really a PNG is scored, and a bad file never stops the run.

Pipeline (engine "local"): the main process lists the files; `workers` spawned processes read and
decode chunks of them; the main process scores batches of `batch_size` while the workers decode the
next ones. Engine "ray" (detector_server/score_ray.py) produces the same rows on Ray Data.

Rows (`Row`, columns `ROW_FIELDS`): path relative to INPUT ("/"-separated), score (float; empty /
null on error), is_ood, predicted_label, predicted_class (-1 on error), error ("" when scored),
model_version. CSV writes booleans as true/false; Parquet needs pyarrow.

Crash safety and resume: rows go to `OUT.partial.jsonl` as they are scored (flushed per batch,
fsynced every few seconds); the finished table is written to a temporary file beside OUT and
moved over it with `os.replace`, then the partial file is removed. So OUT is always absent, the
previous complete table, or the new complete one. With `resume`, the rows of OUT and of the
partial file are kept and only files without a row are scored (another model's rows: refused).

Test: tests/runtime/test_score_folder.py. Benchmark: bench/score_folder.py.
"""
from __future__ import annotations

import csv
import errno
import importlib
import io
import json
import logging
import math
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from .errors import InputError
from .preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode_image, to_model_array
from .validate import check_int

if TYPE_CHECKING:  # the heavy runtime (onnxruntime, faiss) is imported only in the main process
    from .bundle import Bundle
    from .detector import Detector, ScoreBatch

__all__ = ["ROW_FIELDS", "Row", "ScoreSummary", "IMAGE_EXTENSIONS", "OUTPUT_FORMATS", "ENGINES",
           "score_folder", "list_files", "decode_files", "decode_blobs", "make_rows", "read_rows",
           "plot_scores", "partial_path"]

log = logging.getLogger(__name__)

ROW_FIELDS = ("path", "score", "is_ood", "predicted_label", "predicted_class", "error",
              "model_version")
# Files with these suffixes always get a row (an error row if they do not decode); other files
# get one only when Pillow recognises their bytes as an image.
IMAGE_EXTENSIONS = frozenset((".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif",
                              ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
                              ".ico", ".avif", ".qoi", ".apng"))
DEFAULT_BATCH_SIZE = 256
_CHUNK = 32                     # files per decoding task
_PARQUET_ROWS = 65536           # rows per Parquet row group when finishing
_FSYNC_S = 2.0                  # most seconds between fsyncs of the partial file
_MAX_FILE_BYTES = 1 << 30       # larger files get an error row without being read
_SNIFF_BYTES = 1 << 16          # header read from a file without an image suffix
_ORPHAN_CHECK_S = 0.5           # how often a decoding process checks that its parent lives


class Row(NamedTuple):
    """One output row (one image file)."""

    path: str                   # relative to INPUT, "/"-separated
    score: float                # KNN score (higher = more in-distribution); nan on error
    is_ood: bool                # score < the bundle's threshold; False on error
    predicted_label: str        # class name of predicted_class; "" on error
    predicted_class: int        # majority vote of the K neighbours; -1 on error
    error: str                  # "" when scored
    model_version: str          # the bundle's model_version


@dataclass(frozen=True)
class ScoreSummary:
    """What one `score_folder` call did (counts are of this call; `resumed` rows were kept)."""

    out: Path
    files: int                  # regular files found under INPUT
    resumed: int                # of them already in the output (not read again)
    scored: int                 # rows with a score written by this call
    ood: int                    # of those, flagged out-of-distribution
    errors: int                 # error rows written by this call
    skipped: int                # files that are not images (no row)
    seconds: float              # wall time of the scoring loop
    startup_s: float = 0.0      # of which until the first batch was scored (model load, workers)
    first_batch: int = 0        # files in that first batch
    plot: Path | None = None

    @property
    def images_per_s(self) -> float:
        """Files read and scored per second of the scoring loop (errors and skipped included)."""
        done = self.scored + self.errors + self.skipped
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Files per second after the first batch: the rate to expect on a large folder."""
        done = self.scored + self.errors + self.skipped - self.first_batch
        t = self.seconds - self.startup_s
        return done / t if done > 0 and t > 0 else self.images_per_s

    def describe(self) -> str:
        """The human summary the CLI prints."""
        rate = f" ({self.ood / self.scored:.1%} of scored)" if self.scored else ""
        lines = [f"files       {self.files} ({self.resumed} already in the output, "
                 f"{self.skipped} not images)",
                 f"scored      {self.scored}", f"OOD         {self.ood}{rate}",
                 f"errors      {self.errors}",
                 f"throughput  {self.images_per_s:.1f} images/s ({self.seconds:.1f} s, of which "
                 f"{self.startup_s:.1f} s start-up; {self.steady_images_per_s:.1f} images/s "
                 f"after it)",
                 f"output      {self.out}"]
        if self.plot is not None:
            lines.append(f"plot        {self.plot}")
        return "\n".join(lines)


# ---------------------------------------------------------------- finding and decoding files

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
    """Read `paths` (relative to `root`) and `decode_blobs` them; a worker process's task.

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


def make_rows(paths: Sequence[str], status: Sequence[str | None], batch: "ScoreBatch",
              class_names: Sequence[str], model_version: str) -> list[Row]:
    """Rows for `paths` in order: scored ones take the next entry of `batch` (the decoded images
    in order), error ones get nan/-1, and status None (not an image) gets no row."""
    from .detector import merge_results

    kept = [(p, st) for p, st in zip(paths, status) if st is not None]
    results = merge_results([p for p, _ in kept], [st or None for _, st in kept], batch,
                            class_names)
    return [Row(r.id, r.score, r.is_ood, r.predicted_label, r.predicted_class, r.error,
                model_version) for r in results]


# ---------------------------------------------------------------- the local engine

def iter_local(bundle: "Bundle", root: Path, paths: Sequence[str], *, batch_size: int,
               workers: int | None, device: str, max_pixels: int) -> Iterator[tuple[int, list[Row]]]:
    """The local engine: yields (files consumed, their rows) per scored batch, in file order.

    `workers` spawned processes decode chunks of up to `_CHUNK` files (0: in this process);
    the main process holds the one Detector and scores a batch while the workers decode ahead
    (up to two batches in flight). Default workers: the available cores minus one, at least 1.
    """
    from .detector import Detector
    from .runtime import available_cores

    n_workers = max(1, available_cores() - 1) if workers is None else workers
    size = max(1, min(_CHUNK, batch_size // 2))
    chunks = [list(paths[i:i + size]) for i in range(0, len(paths), size)]
    # Start the workers first: they import and decode while the Detector loads.
    decoded = _DecodeAhead(str(root), chunks, bundle.spec, max_pixels,
                           min(n_workers, len(chunks)), depth=max(2, 2 * batch_size // size))
    try:
        detector = Detector(bundle, device=device, max_pixels=max_pixels)
        buf_paths: list[str] = []
        buf_status: list[str | None] = []
        buf_arrays: list[np.ndarray] = []
        for chunk, (arrays, status) in decoded:
            buf_paths += chunk
            buf_status += status
            buf_arrays.append(arrays)
            if len(buf_paths) >= batch_size:
                yield len(buf_paths), _score(detector, buf_paths, buf_status, buf_arrays)
                buf_paths, buf_status, buf_arrays = [], [], []
        if buf_paths:
            yield len(buf_paths), _score(detector, buf_paths, buf_status, buf_arrays)
    finally:
        decoded.close()


def _score(detector: "Detector", paths: list[str], status: list[str | None],
           arrays: list[np.ndarray]) -> list[Row]:
    images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    batch = detector.score_arrays(images)
    return make_rows(paths, status, batch, detector.class_names, detector.model_version)


def _worker_init(parent: int) -> None:
    """In each decoding process: leave Ctrl-C to the main process (it stops the pool), and exit
    within a second when the main process is gone (killed by SIGKILL, say) instead of lingering."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_ORPHAN_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


class _DecodeAhead:
    """Iterating yields (chunk, decode(root, chunk, spec, max_pixels)) in order.

    With workers, spawned processes (not forked: the parent runs ONNX Runtime / OpenMP threads)
    start at once and keep `depth` chunks decoded or in progress ahead of the consumer. If a
    worker dies (a decoder crash, the OOM killer), the pool is restarted and the chunk at the
    head is decoded file by file in a process of its own, so the file at fault gets an error
    instead of stopping the run. `close()` stops the workers.
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


# Engines: name -> "module:function" with iter_local's signature, imported when used (so that
# ray stays an optional dependency). A module may define `check_available()`, called first, which
# raises InputError when what the engine needs is not installed.
ENGINES: dict[str, str] = {"local": f"{__name__}:iter_local",
                           "ray": "detector_server.score_ray:iter_ray"}


def _engine(name: str) -> Callable[..., Iterator[tuple[int, list[Row]]]]:
    if name not in ENGINES:
        raise InputError(f"expected one of {sorted(ENGINES)}, got {name!r}", field="engine")
    module_name, func = ENGINES[name].split(":")
    module = importlib.import_module(module_name)
    getattr(module, "check_available", lambda: None)()
    return getattr(module, func)


# ---------------------------------------------------------------- output formats

def _row_to_json(row: Row) -> str:
    d = row._asdict()
    if math.isnan(row.score):
        d["score"] = None
    return json.dumps(d)   # ASCII: a file name that is not UTF-8 survives as \udcXX escapes


def _row_from_dict(d: dict[str, Any]) -> Row:
    score = d["score"]
    is_ood = d["is_ood"]
    if isinstance(is_ood, str):
        is_ood = is_ood.lower() == "true"
    return Row(str(d["path"]), math.nan if score in (None, "") else float(score), bool(is_ood),
               str(d["predicted_label"] or ""), int(d["predicted_class"]), str(d["error"] or ""),
               str(d["model_version"]))


def _write_jsonl(rows: Iterable[Row], f: io.BufferedWriter) -> None:
    for row in rows:
        f.write((_row_to_json(row) + "\n").encode("utf-8"))


def _read_jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for line in f:
            yield _row_from_dict(json.loads(line))


def _write_journal(rows: Iterable[Row], f: io.BufferedWriter) -> None:
    """The partial file: one JSON array per row, fields in ROW_FIELDS order (NaN allowed)."""
    text = "".join(json.dumps(row) + "\n" for row in rows)   # a Row is a tuple: an array
    f.write(text.encode("ascii"))


def _read_journal(path: Path) -> Iterator[Row]:
    """Rows of a partial file; a last line cut short by a crash is ignored."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            yield Row(*json.loads(line))


def _write_csv(rows: Iterable[Row], f: io.BufferedWriter) -> None:
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    w = csv.writer(text)
    w.writerow(ROW_FIELDS)
    for r in rows:
        w.writerow((r.path, "" if math.isnan(r.score) else repr(r.score),
                    "true" if r.is_ood else "false", r.predicted_label, r.predicted_class,
                    r.error, r.model_version))
    text.flush()
    text.detach()


def _read_csv(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for d in csv.DictReader(f):
            yield _row_from_dict(d)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError("Parquet output needs pyarrow: pip install pyarrow (or use .csv / .jsonl)",
                         field="out") from None
    return pyarrow


def _write_parquet(rows: Iterable[Row], f: io.BufferedWriter) -> None:
    pa = _pyarrow()
    schema = pa.schema([("path", pa.string()), ("score", pa.float64()), ("is_ood", pa.bool_()),
                        ("predicted_label", pa.string()), ("predicted_class", pa.int64()),
                        ("error", pa.string()), ("model_version", pa.string())])
    with pa.parquet.ParquetWriter(f, schema) as w:
        chunk: list[Row] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == _PARQUET_ROWS:
                w.write_table(_arrow_table(pa, schema, chunk))
                chunk = []
        w.write_table(_arrow_table(pa, schema, chunk))


def _arrow_table(pa: Any, schema: Any, rows: list[Row]) -> Any:
    cols = list(zip(*rows)) if rows else [[] for _ in ROW_FIELDS]
    scores = [None if math.isnan(s) else s for s in cols[1]]
    # Parquet strings are UTF-8: the bytes of a non-UTF-8 file name are written as \xNN.
    paths = [p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
             for p in cols[0]]
    return pa.table([paths, scores, *cols[2:]], schema=schema)


def _read_parquet(path: Path) -> Iterator[Row]:
    pa = _pyarrow()
    pf = pa.parquet.ParquetFile(path)
    for batch in pf.iter_batches():
        for d in batch.to_pylist():
            yield _row_from_dict(d)


@dataclass(frozen=True)
class OutputFormat:
    """How a table is written (all rows, to an open binary file) and read back."""

    write: Callable[[Iterable[Row], io.BufferedWriter], None]
    read: Callable[[Path], Iterator[Row]]
    check: Callable[[], Any] = lambda: None     # raises InputError when a dependency is missing


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    ".csv": OutputFormat(_write_csv, _read_csv),
    ".jsonl": OutputFormat(_write_jsonl, _read_jsonl),
    ".parquet": OutputFormat(_write_parquet, _read_parquet, _pyarrow),
}


def _output_format(out: Path) -> OutputFormat:
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"expected a file name ending in one of {sorted(OUTPUT_FORMATS)}, got "
                         f"{out.name!r}", field="out")
    fmt.check()
    return fmt


def read_rows(path: str | os.PathLike) -> list[Row]:
    """All rows of a table written by `score_folder` (format from the suffix; the partial file
    `partial_path(out)` reads as JSONL). Raises InputError naming the path if it cannot be read."""
    p = Path(path)
    reader = _read_journal if p.name.endswith(".partial.jsonl") else _output_format(p).read
    try:
        return list(reader(p))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read score table: {type(e).__name__}: {e}", path=p) from None


def partial_path(out: str | os.PathLike) -> Path:
    """Where rows are journalled while `out` is being written."""
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


# ---------------------------------------------------------------- the journal (crash safety)

class _Journal:
    """Rows of an unfinished run: `partial_path(out)`, one JSON array per line.

    Each append is flushed to the OS (a crash of this process loses nothing written) and fsynced
    at most every `_FSYNC_S` seconds (a power cut loses at most that much; --resume redoes it).
    """

    def __init__(self, out: Path, prior: Iterable[Row]):
        self.path = partial_path(out)
        tmp = self.path.with_name(self.path.name + ".tmp")
        prior = list(prior)
        with open(tmp, "wb") as f:                      # the kept rows, rewritten atomically
            _write_journal(prior, f)
            _sync(f)
        self.rows = len(prior)
        os.replace(tmp, self.path)
        self._f = open(self.path, "ab")
        self._synced = time.monotonic()

    def append(self, rows: Sequence[Row]) -> None:
        _write_journal(rows, self._f)
        self._f.flush()
        self.rows += len(rows)
        if time.monotonic() - self._synced >= _FSYNC_S:
            os.fsync(self._f.fileno())
            self._synced = time.monotonic()

    def publish(self, out: Path, fmt: OutputFormat) -> None:
        """Write the final table next to `out`, move it over `out`, drop the journal."""
        self._f.close()
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                fmt.write(_read_journal(self.path), f)
                _sync(f)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        _sync_dir(out.parent)
        self.path.unlink()

    def abandon(self) -> None:
        """After a failure: keep the partial file for --resume, unless it holds no row."""
        self._f.close()
        if self.rows == 0:
            self.path.unlink(missing_ok=True)


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prior_rows(out: Path, resume: bool, model_version: str) -> list[Row]:
    """The rows to keep: with `resume`, those of `out` and of its partial file, once per path."""
    partial = partial_path(out)
    if not resume:
        if partial.exists():
            log.warning("discarding %s from an unfinished run (use --resume to continue it)",
                        partial)
        return []
    kept: dict[str, Row] = {}
    for path in (out, partial):
        if path.exists():
            for row in read_rows(path):
                kept.setdefault(row.path, row)
    other = {r.model_version for r in kept.values()} - {model_version}
    if other:
        raise InputError(f"rows were written by model {sorted(other)[0]!r}, the bundle is "
                         f"{model_version!r}: write to a new --out or drop --resume", path=out)
    return list(kept.values())


# ---------------------------------------------------------------- the driver

def score_folder(bundle: "str | os.PathLike | Bundle", input_dir: str | os.PathLike,
                 out: str | os.PathLike, *, recursive: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                 device: str = "auto", resume: bool = False, plot: str | os.PathLike | None = None,
                 engine: str = "local", progress: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> ScoreSummary:
    """Score every image file under `input_dir` with `bundle` into the table `out`.

    bundle: a bundle directory (or a loaded `Bundle`); out: *.csv, *.jsonl or *.parquet;
    batch_size: images per model call; workers: decoding processes (local engine; default cores-1,
    0 = in this process) or Detector actors (ray engine); device: auto|cpu|cuda; resume: keep the
    rows already in `out` / its partial file and score only the other files; plot: also save a
    histogram of all scores in `out` with the threshold line (needs matplotlib); engine: a key of
    `ENGINES`; progress: show a tqdm bar (images/s, running OOD rate).
    Raises InputError (bad option, missing folder, missing pyarrow/matplotlib/ray, resume over
    another model's rows) or BundleError, naming the path or field; bad image files never raise.
    """
    out = Path(out)
    fmt = _output_format(out)
    if not out.parent.is_dir():
        raise InputError("the folder of the output file does not exist", path=out.parent)
    _check_options(batch_size, workers, plot, max_pixels)
    run = _engine(engine)
    b = _load_bundle(bundle)
    version = b.manifest.model_version
    exclude = [out, partial_path(out)] + ([Path(plot)] if plot is not None else [])
    files = list_files(input_dir, recursive, exclude)
    prior = _prior_rows(out, resume, version)
    done = {r.path for r in prior}
    todo = [p for p in files if p not in done]
    journal = _Journal(out, prior)
    try:
        counts, times = _consume(run(b, Path(input_dir), todo, batch_size=batch_size,
                                     workers=workers, device=device, max_pixels=max_pixels),
                                 journal, len(todo), progress)
        journal.publish(out, fmt)
    except BaseException:
        journal.abandon()
        raise
    plot_path = None
    if plot is not None:
        scores = np.array([r.score for r in read_rows(out)], dtype=np.float64)
        plot_path = plot_scores(scores, b.manifest.threshold.value, plot, title=version)
    return ScoreSummary(out, len(files), len(files) - len(todo), counts["scored"], counts["ood"],
                        counts["errors"], counts["skipped"], *times, plot=plot_path)


def _consume(batches: Iterator[tuple[int, list[Row]]], journal: _Journal, total: int,
             progress: bool) -> tuple[dict[str, int], tuple[float, float, int]]:
    """Append each batch's rows to the journal; count; drive the progress bar.
    Returns the counts and (seconds, seconds to the first batch, files in the first batch)."""
    from tqdm import tqdm

    counts = dict(scored=0, ood=0, errors=0, skipped=0)
    t0 = time.perf_counter()
    first: tuple[float, int] | None = None
    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True,
              desc="scoring") as bar:
        for consumed, rows in batches:
            journal.append(rows)
            errors = sum(1 for r in rows if r.error)
            counts["errors"] += errors
            counts["scored"] += len(rows) - errors
            counts["ood"] += sum(1 for r in rows if r.is_ood)
            counts["skipped"] += consumed - len(rows)
            bar.update(consumed)
            first = first or (time.perf_counter() - t0, consumed)
            if counts["scored"]:
                bar.set_postfix(ood=f"{counts['ood'] / counts['scored']:.1%}",
                                errors=counts["errors"], refresh=False)
    return counts, (time.perf_counter() - t0, *(first or (0.0, 0)))


def _load_bundle(bundle: "str | os.PathLike | Bundle") -> "Bundle":
    from .bundle import Bundle, load_bundle

    # The model itself is checked by the Detector that opens it (locally or in each actor).
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify_model=False)


def _check_options(batch_size: Any, workers: Any, plot: Any, max_pixels: Any) -> None:
    for name, v, lo in (("batch_size", batch_size, 1), ("max_pixels", max_pixels, 1),
                        ("workers", 0 if workers is None else workers, 0)):
        check_int(v, name, minimum=lo)
    if plot is not None:
        _matplotlib_figure()


# ---------------------------------------------------------------- the histogram

def _matplotlib_figure() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib (or drop --plot)",
                         field="plot") from None
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    return fig


def plot_scores(scores: np.ndarray, threshold: float, path: str | os.PathLike,
                title: str = "") -> Path:
    """Save a histogram of `scores` (float [N]; nan = error rows, left out) with the threshold
    line to `path` (PNG, PDF or SVG by suffix). Needs matplotlib (InputError otherwise)."""
    fig = _matplotlib_figure()
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    ax = fig.add_subplot(1, 1, 1)
    ood = int((s < threshold).sum())
    ax.hist(s, bins=min(80, max(10, int(np.sqrt(max(1, s.size))))), color="tab:blue", alpha=0.8)
    ax.axvline(threshold, color="tab:red", linestyle="--",
               label=f"threshold {threshold:.4g}: {ood} of {s.size} OOD")
    ax.set_xlabel("KNN score (higher = more in-distribution)")
    ax.set_ylabel("images")
    ax.set_title(f"rwood-score {title}".strip())
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot save the plot: {e}", path=path) from None
    return path
