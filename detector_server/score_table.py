"""The output table of `rwood-score`: rows, the CSV/JSONL/Parquet formats and the crash journal.

Use `read_rows(path)` to read a table written by `score_folder` (or its partial file), and
`make_rows` to turn one scored batch into rows (both engines do). The driver writes through
`Journal` and `prior_rows`; nothing here reads images or runs a model.

Rows (`Row`, columns `ROW_FIELDS`): path (relative to INPUT when it is one folder, else as
named; "/"-separated), score (float; empty / null on error), is_ood (empty / null on error: an
image that was not scored is neither ID nor OOD), predicted_label, predicted_class (-1 on
error), error ("" when scored), model_version. CSV writes booleans as true/false; Parquet needs
pyarrow (`OUTPUT_FORMATS`). With `rwood-score --neighbors N` a last column `neighbors` holds each
image's N nearest bank rows (`NEIGHBOR_FIELDS`; [] on error): a list of objects in JSONL, a list
of structs in Parquet, one JSON array in a CSV cell; without it the table has no such column.
Test: tests/runtime/test_score_folder.py, tests/runtime/test_score_inputs.py,
tests/runtime/test_score_neighbors.py.

File names that are not valid UTF-8 survive every format, so --resume finds their rows: CSV
writes their bytes as they are, JSONL as \\udcXX escapes, and Parquet (whose strings must be
UTF-8) shows them with \\xNN escapes and keeps the bytes in the file's key-value metadata.

Crash safety and resume: rows go to `partial_path(OUT)` (OUT.partial.jsonl) as they are scored
(flushed per batch, fsynced every few seconds); the finished table is published with
`atomic.atomic_write` (a temporary file beside OUT, fsynced, moved over it, the folder fsynced),
then the partial file is removed. So OUT is always absent, the previous complete table, or the
new complete one. With resume, `prior_rows` keeps the rows of OUT and of the partial file, so
only files without a row are scored (another model's rows: refused).

A real SIGKILL: tests/reliability/test_faults_score.py.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .atomic import atomic_write
from .errors import InputError

if TYPE_CHECKING:
    from .detector import ScoreBatch

__all__ = ["ROW_FIELDS", "NEIGHBOR_FIELDS", "Row", "make_rows", "OutputFormat", "OUTPUT_FORMATS",
           "output_format", "read_rows", "partial_path", "Journal", "prior_rows"]

log = logging.getLogger(__name__)

ROW_FIELDS = ("path", "score", "is_ood", "predicted_label", "predicted_class", "error",
              "model_version")
NEIGHBOR_FIELDS = ("row", "class_index", "label", "similarity", "source", "source_index")
_PARQUET_ROWS = 65536           # rows per Parquet row group when finishing
_PARQUET_RAW_NAMES = "reweightood.raw_paths"    # key-value metadata: {row: hex of the name}
_FSYNC_S = 2.0                  # most seconds between fsyncs of the partial file


class Row(NamedTuple):
    """One output row (one image file)."""

    path: str                   # relative to the INPUT folder, or as named; "/"-separated
    score: float                # KNN score (higher = more in-distribution); nan on error
    is_ood: bool | None         # score < the bundle's threshold; None on error
    predicted_label: str        # class name of predicted_class; "" on error
    predicted_class: int        # majority vote of the K neighbours; -1 on error
    error: str                  # "" when scored
    model_version: str          # the bundle's model_version
    neighbors: Sequence[dict[str, Any]] | None = None  # with --neighbors: NEIGHBOR_FIELDS each


def make_rows(paths: Sequence[str], status: Sequence[str | None], batch: "ScoreBatch | None",
              class_names: Sequence[str], model_version: str,
              describe: Callable[..., Any] | None = None) -> list[Row]:
    """Rows for `paths` in order: scored ones take the next entry of `batch` (the decoded images
    in order), error ones get nan/-1, and status None (not an image) gets no row. With
    `describe` (`Detector.describe_neighbors`; the batch scored with neighbours) every row has a
    `neighbors` list (empty on error)."""
    # Imported here, not at the top: decode processes re-import the CLI's main module, which
    # imports this one, and must not load ONNX Runtime and FAISS (detector imports the bundle).
    from .detector import merge_results

    kept = [(p, st) for p, st in zip(paths, status) if st is not None]
    results = merge_results([p for p, _ in kept], [st or None for _, st in kept], batch,
                            class_names, describe)
    return [Row(r.id, r.score, None if r.error else r.is_ood, r.predicted_label,
                r.predicted_class, r.error, model_version,
                None if describe is None else [dataclasses.asdict(n) for n in r.neighbors])
            for r in results]


# ---------------------------------------------------------------- output formats

def _row_to_json(row: Row) -> str:
    d = row._asdict()
    if math.isnan(row.score):
        d["score"] = None
    if row.neighbors is None:
        del d["neighbors"]
    return json.dumps(d)   # ASCII: a file name that is not UTF-8 survives as \udcXX escapes


def _row_from_dict(d: dict[str, Any]) -> Row:
    score = d["score"]
    is_ood = d["is_ood"]
    if isinstance(is_ood, str):
        is_ood = is_ood.lower() == "true"
    neighbors = d.get("neighbors")
    if isinstance(neighbors, str):                          # a CSV cell
        neighbors = json.loads(neighbors) if neighbors else []
    return _checked(Row(str(d["path"]), math.nan if score in (None, "") else float(score),
                        is_ood, str(d["predicted_label"] or ""), int(d["predicted_class"]),
                        str(d["error"] or ""), str(d["model_version"]),
                        None if neighbors is None else list(neighbors)))


def _checked(row: Row) -> Row:
    """`row` with is_ood None on error and a bool otherwise (tables written before is_ood was
    left empty on error said false)."""
    return row._replace(is_ood=None if row.error else bool(row.is_ood))


def _peek(rows: Iterable[Row]) -> tuple[bool, Iterator[Row]]:
    """(whether the table has a neighbors column: its first row has one, the rows unchanged)."""
    it = iter(rows)
    first = next(it, None)
    if first is None:
        return False, iter(())
    return first.neighbors is not None, itertools.chain([first], it)


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
            yield _checked(Row(*json.loads(line)))


def _write_csv(rows: Iterable[Row], f: io.BufferedWriter) -> None:
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    w = csv.writer(text)
    with_neighbors, rows = _peek(rows)
    w.writerow(ROW_FIELDS + (("neighbors",) if with_neighbors else ()))
    for r in rows:
        w.writerow((r.path, "" if math.isnan(r.score) else repr(r.score),
                    "" if r.is_ood is None else "true" if r.is_ood else "false",
                    r.predicted_label, r.predicted_class, r.error, r.model_version)
                   + ((json.dumps(list(r.neighbors or ())),) if with_neighbors else ()))
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
    with_neighbors, rows = _peek(rows)
    neighbor = pa.struct([("row", pa.int64()), ("class_index", pa.int64()), ("label", pa.string()),
                          ("similarity", pa.float64()), ("source", pa.string()),
                          ("source_index", pa.int64())])
    schema = pa.schema([("path", pa.string()), ("score", pa.float64()), ("is_ood", pa.bool_()),
                        ("predicted_label", pa.string()), ("predicted_class", pa.int64()),
                        ("error", pa.string()), ("model_version", pa.string())]
                       + ([("neighbors", pa.list_(neighbor))] if with_neighbors else []))
    raw_names: dict[int, str] = {}          # row number -> hex bytes of a non-UTF-8 path
    with pa.parquet.ParquetWriter(f, schema) as w:
        chunk: list[Row] = []
        for i, row in enumerate(rows):
            if _has_surrogates(row.path):
                raw_names[i] = os.fsencode(row.path).hex()
            chunk.append(row)
            if len(chunk) == _PARQUET_ROWS:
                w.write_table(_arrow_table(pa, schema, chunk))
                chunk = []
        w.write_table(_arrow_table(pa, schema, chunk))
        w.add_key_value_metadata({_PARQUET_RAW_NAMES: json.dumps(raw_names)})


def _has_surrogates(name: str) -> bool:
    """True for a file name that is not valid UTF-8 (os.fsdecode made its bytes \\udcXX)."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _arrow_table(pa: Any, schema: Any, rows: list[Row]) -> Any:
    cols = list(zip(*rows)) if rows else [[] for _ in Row._fields]
    scores = [None if math.isnan(s) else s for s in cols[1]]
    # Parquet strings are UTF-8: the bytes of a non-UTF-8 file name are shown as \xNN here and
    # kept exactly in the metadata (_PARQUET_RAW_NAMES).
    paths = [p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
             for p in cols[0]]
    rest = list(cols[2:len(ROW_FIELDS)])
    if "neighbors" in schema.names:
        rest.append([list(n or ()) for n in cols[len(ROW_FIELDS)]])
    return pa.table([paths, scores, *rest], schema=schema)


def _read_parquet(path: Path) -> Iterator[Row]:
    pa = _pyarrow()
    pf = pa.parquet.ParquetFile(path)
    meta = (pf.metadata.metadata or {}).get(_PARQUET_RAW_NAMES.encode())
    raw_names = {int(i): os.fsdecode(bytes.fromhex(h))
                 for i, h in json.loads(meta or b"{}").items()}
    i = 0
    for batch in pf.iter_batches():
        for d in batch.to_pylist():
            if i in raw_names:
                d["path"] = raw_names[i]
            yield _row_from_dict(d)
            i += 1


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


def output_format(out: Path) -> OutputFormat:
    """The format of the table `out` by its suffix; InputError (field "out") for an unknown
    suffix or a format whose dependency is missing."""
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
    reader = _read_journal if p.name.endswith(".partial.jsonl") else output_format(p).read
    try:
        return list(reader(p))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read score table: {type(e).__name__}: {e}", path=p) from None


def partial_path(out: str | os.PathLike) -> Path:
    """Where rows are journalled while `out` is being written."""
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


# ---------------------------------------------------------------- the journal (crash safety)

class Journal:
    """Rows of an unfinished run: `partial_path(out)`, one JSON array per line.

    Opening it rewrites the kept `prior` rows atomically. Each append is flushed to the OS (a
    crash of this process loses nothing written) and fsynced at most every `_FSYNC_S` seconds (a
    power cut loses at most that much; --resume redoes it). `publish` writes the table, `abandon`
    keeps the journal for --resume.
    """

    def __init__(self, out: Path, prior: Iterable[Row]):
        self.path = partial_path(out)
        prior = list(prior)
        atomic_write(self.path, lambda tmp: _write_to(tmp, _write_journal, prior))
        self.rows = len(prior)
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
        """Write the final table atomically over `out`, then drop the journal."""
        self._f.close()
        atomic_write(out, lambda tmp: _write_to(tmp, fmt.write, _read_journal(self.path)))
        self.path.unlink()

    def abandon(self) -> None:
        """After a failure: keep the partial file for --resume, unless it holds no row."""
        self._f.close()
        if self.rows == 0:
            self.path.unlink(missing_ok=True)


def _write_to(path: str, write: Callable[[Iterable[Row], io.BufferedWriter], None],
              rows: Iterable[Row]) -> None:
    with open(path, "wb") as f:
        write(rows, f)


def prior_rows(out: Path, resume: bool, model_version: str, neighbors: bool = False) -> list[Row]:
    """The rows to keep: with `resume`, those of `out` and of its partial file, once per path.
    Raises InputError (naming `out`) when they were written by another model, or with(out)
    neighbours when this run wants the other (`neighbors`: whether it asks for them)."""
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
    if any((r.neighbors is not None) != neighbors for r in kept.values()):
        raise InputError(f"rows were written {'without' if neighbors else 'with'} --neighbors: "
                         "resume with the same --neighbors setting, or write to a new --out",
                         path=out)
    return list(kept.values())
