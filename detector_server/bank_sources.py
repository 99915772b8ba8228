"""Where each bank row came from: the origin data set, the row in it and the file's relative path.

Use `BankSources` wherever bank rows must be traced back to images: the exporter writes the
training rows' sources into the bundle, `rwood-bank` appends and removes rows with theirs, the
`Detector` names the source of every neighbour it returns, and `rwood-bank remove --source GLOB`
matches them. A bundle without a sources file (exported before sources existed) reads as
`BankSources.unknown(n)`: every row of unknown origin.

A row's source string (`describe`): `ORIGIN/PATH` when the row came from a file (a folder
dataset, or images added from a folder), `ORIGIN#INDEX` when only its row in the origin data set
is known (an npz, a built-in dataset), "" when nothing is known. ORIGIN is a short name: "train"
for the rows the bundle was exported with, the data set's name (its file or folder name without
suffix) for rows added by `rwood-bank add`.

On disk (bundle file `sources.json`, named by `manifest.bank.sources_file`), one JSON object with
columns of length N (the bank rows, in index order):

    {"format": "reweightood-bank-sources", "format_version": 1,
     "origins": ["train", "digit6"],        names, referenced by position
     "origin": [0, 0, ..., 1],              int, -1 = unknown
     "index":  [17, 18, ..., 0],            row of the origin data set, -1 = unknown
     "path":   ["", "", ..., "6/0001.png"]} relative, "/"-separated, "" = not a file

Numpy and the standard library only. Test: tests/runtime/test_bank_edit.py.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import write_text_atomic
from .bundle_files import read_json
from .errors import BundleError

__all__ = ["BankSources", "SOURCES_FORMAT", "TRAIN_ORIGIN"]

SOURCES_FORMAT = "reweightood-bank-sources"
_VERSION = 1
TRAIN_ORIGIN = "train"                  # the origin of the rows a bundle was exported with

MAX_PATH_BYTES = 4096      # the bound on sources.json per row (PATH_MAX and its JSON quoting)


@dataclass(frozen=True, eq=False)
class BankSources:
    """Sources of N bank rows (see the module docstring). Arrays are never modified in place."""

    origins: tuple[str, ...]            # origin names; `origin` holds positions in this tuple
    origin: np.ndarray                  # int32 [N], -1 = unknown
    index: np.ndarray                   # int64 [N], row in the origin data set, -1 = unknown
    path: tuple[str, ...]               # [N] relative file path, "" = none

    def __len__(self) -> int:
        return int(self.origin.shape[0])

    @classmethod
    def unknown(cls, n: int) -> "BankSources":
        """N rows of unknown origin (a bundle written before sources were recorded)."""
        return cls((), np.full(n, -1, np.int32), np.full(n, -1, np.int64), ("",) * n)

    @classmethod
    def of(cls, origin: str, index: Sequence[int] | np.ndarray,
           path: Sequence[str] | None = None) -> "BankSources":
        """Rows all from one origin: their rows in it (`index`) and, for files, their paths."""
        index = np.asarray(index, dtype=np.int64)
        path = tuple(path) if path is not None else ("",) * len(index)
        if len(path) != len(index):
            raise ValueError(f"{len(path)} paths for {len(index)} rows")
        return cls((origin,), np.zeros(len(index), np.int32), index, path)

    def describe(self, row: int) -> str:
        """The source string of bank row `row` ("train#17", "digit6/6/0001.png", "")."""
        o = int(self.origin[row])
        if o < 0:
            return ""
        name, path = self.origins[o], self.path[row]
        if path:
            return f"{name}/{path}"
        i = int(self.index[row])
        return f"{name}#{i}" if i >= 0 else name

    @functools.cached_property
    def max_describe_bytes(self) -> int:
        """An upper bound on the UTF-8 length of any `describe(row)` (one pass over the paths,
        the first time it is asked)."""
        name = max((len(o.encode()) for o in self.origins), default=0)
        path = max((len(p.encode()) for p in self.path), default=0)
        return name + 1 + max(path, 20)          # "name/path" or "name#index" (int64: 20 chars)

    def matches(self, pattern: str) -> np.ndarray:
        """bool [N]: rows whose source string matches the shell glob `pattern` (fnmatch, where
        `*` also matches "/"). Rows of unknown origin never match."""
        return np.array([bool(s) and fnmatch.fnmatchcase(s, pattern)
                         for s in (self.describe(i) for i in range(len(self)))], dtype=bool)

    def take(self, rows: np.ndarray) -> "BankSources":
        """The sources of `rows` (int indices or a bool mask), in that order."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return BankSources(self.origins, self.origin[rows], self.index[rows],
                           tuple(self.path[int(i)] for i in rows))

    def concat(self, other: "BankSources") -> "BankSources":
        """These rows, then `other`'s; origins of the same name are merged."""
        origins = list(self.origins)
        remap = np.empty(len(other.origins) + 1, np.int32)   # last slot: -1 stays -1
        remap[-1] = -1
        for i, name in enumerate(other.origins):
            if name not in origins:
                origins.append(name)
            remap[i] = origins.index(name)
        return BankSources(tuple(origins), np.concatenate([self.origin, remap[other.origin]]),
                           np.concatenate([self.index, other.index]), self.path + other.path)

    def counts(self) -> dict[str, int]:
        """Rows per origin name ("" for rows of unknown origin), in origin order."""
        out: dict[str, int] = {}
        for o, n in zip(*np.unique(self.origin, return_counts=True)):
            out[self.origins[o] if o >= 0 else ""] = int(n)
        return dict(sorted(out.items(), key=lambda kv: (kv[0] == "", self._rank(kv[0]))))

    def _rank(self, name: str) -> int:
        return self.origins.index(name) if name in self.origins else len(self.origins)

    # -- disk -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": SOURCES_FORMAT, "format_version": _VERSION,
                "origins": list(self.origins), "origin": self.origin.tolist(),
                "index": self.index.tolist(), "path": list(self.path)}

    def write(self, path: str | os.PathLike) -> Path:
        """Write sources.json atomically (compact: one line); returns its path."""
        return write_text_atomic(path, json.dumps(self.to_json(), separators=(",", ":")))

    @classmethod
    def read(cls, root: str | os.PathLike, name: str, n: int) -> "BankSources":
        """Read and check the sources file `name` of the bundle directory `root` for an index of
        `n` rows, through `bundle_files` (a regular file, at most MAX_PATH_BYTES per row and
        1 MiB); BundleError naming the file and the key at fault."""
        path = Path(root) / name
        d = read_json(root, name, missing="bank sources file is missing",
                      max_bytes=(1 << 20) + MAX_PATH_BYTES * n, what="bank sources")
        if not isinstance(d, dict) or d.get("format") != SOURCES_FORMAT:
            raise BundleError(f"expected format {SOURCES_FORMAT!r}", path=path, field="format")
        if d.get("format_version") != _VERSION:
            raise BundleError(f"unknown version {d.get('format_version')!r}; this runtime reads "
                              f"version {_VERSION}", path=path, field="format_version")
        origins = d.get("origins")
        if not isinstance(origins, list) or not all(isinstance(o, str) and o for o in origins):
            raise BundleError("expected a list of non-empty names", path=path, field="origins")
        cols = {key: d.get(key) for key in ("origin", "index", "path")}
        for key, col in cols.items():
            if not isinstance(col, list) or len(col) != n:
                raise BundleError(f"expected a list of {n} entries (one per indexed row)",
                                  path=path, field=key)
        if not all(isinstance(p, str) for p in cols["path"]):
            raise BundleError("expected strings", path=path, field="path")
        for key in ("origin", "index"):
            if not all(type(v) is int for v in cols[key]):
                raise BundleError("expected integers", path=path, field=key)
        origin = np.asarray(cols["origin"], dtype=np.int64).reshape(n)
        index = np.asarray(cols["index"], dtype=np.int64).reshape(n)
        if n and (origin.min() < -1 or origin.max() >= len(origins) or index.min() < -1):
            raise BundleError(f"origin must be in [-1, {len(origins)}) and index >= -1",
                              path=path, field="origin/index")
        return cls(tuple(origins), origin.astype(np.int32), index, tuple(cols["path"]))
