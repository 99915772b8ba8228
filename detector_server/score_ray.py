"""The Ray engine of `rwood-score` (`--engine ray`): the same rows as the local engine, on Ray Data.

Use it when one machine cannot read, decode and score the folder fast enough. The dataset is the
list of file paths; `map_batches` sends batches of them through an actor pool in which every
actor holds one `Detector` and reads and decodes its files with `score_decode.decode_files`, the
very function the local engine's decode processes run. So both engines give a file the same row,
with the same guards: a file over 1 GiB gets an error row without being read, and a file without
an image suffix is read only when its header is an image. The driver (`score_folder`) lists the
folder, writes the table (`score_table`) and handles --resume as for the local engine. Ray is an
optional extra: `pip install "reweightood[cpu,ray]"`. Test: tests/runtime/test_score_ray.py.

Where it runs: if Ray is already initialised in the process (`ray.init(address=...)` before
calling `score_folder(..., engine="ray")`), that cluster is used as is. Otherwise `ray.init()` is
called, which joins the cluster named by the RAY_ADDRESS environment variable, or starts a local
one (shut down again at the end) when it is unset:

    ray start --head --port 6379                        # on the head node; `ray start
                                                        #   --address HEAD:6379` on the others
    RAY_ADDRESS=auto rwood-score BUNDLE /shared/images --out scores.parquet --recursive \\
        --engine ray --workers 32                       # on a node of the cluster
    RAY_ADDRESS=ray://HEAD:10001 rwood-score ...        # from outside it (Ray Client)

On a cluster every node needs reweightood with the [ray] extra, and BUNDLE and INPUT must be
paths that every node can read (a shared filesystem): actors open the bundle and the files.
`--workers` is the number of actors (default: the cluster's CPUs minus one), each reserving one
CPU, or one GPU as well with `--device cuda`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .detector import Detector
from .errors import InputError
from .score_decode import decode_files
from .score_table import ROW_FIELDS, Row, make_rows

__all__ = ["iter_ray", "RayScorer", "check_available"]

log = logging.getLogger(__name__)


def check_available() -> None:
    """Raise InputError (how to install it) when Ray Data cannot be imported."""
    _import_ray()


# Ray finds "its" address by asking the OS for the outgoing interface, and a local instance started
# by `ray.init()` then listens there (and on every interface). A local instance only ever talks to
# itself, so it stays on loopback: Ray uses 127.0.0.1 as the node address when this is off. It is
# read once, when ray is first imported, and only set when no cluster is named (RAY_ADDRESS) and
# nothing imported ray before us (a caller who did may have connected to a cluster already).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _import_ray() -> Any:
    if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(_LOCAL_ONLY_ENV, "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError('the ray engine needs Ray Data: pip install "reweightood[ray]" '
                         '(or use --engine local)', field="engine") from None
    return ray


class RayScorer:
    """A Ray Data actor: one Detector; a batch of file paths -> one output row per file.

    Input column `path`: file paths relative to `root`, as bytes (`os.fsencode`, so that names
    that are not UTF-8 survive Arrow). Output columns: `ROW_FIELDS` (with `path` as given) plus
    `is_image` (False for a file that is not an image, whose other columns are placeholders: it
    gets no row) and, with `neighbors` > 0, `neighbors` (each row's list as a JSON string).
    """

    def __init__(self, bundle_dir: str, root: str, device: str, threads: int, max_pixels: int,
                 search_params: dict[str, int] | None = None, neighbors: int = 0):
        self.detector = Detector(bundle_dir, device=device, threads=threads, max_pixels=max_pixels,
                                 search_params=search_params)
        self.root = root
        self.max_pixels = max_pixels
        self.neighbors = neighbors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        det = self.detector
        paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
        images, status = decode_files(self.root, paths, det.spec, self.max_pixels)
        scored = det.score_arrays(images, self.neighbors) if len(images) else None
        rows = iter(make_rows(paths, status, scored, det.class_names, det.model_version,
                              det.describe_neighbors if self.neighbors else None))
        placeholder = Row("", float("nan"), None, "", -1, "", det.model_version)
        full = [next(rows) if st is not None else placeholder._replace(path=p)
                for p, st in zip(paths, status)]
        cols: dict[str, np.ndarray] = {name: np.array([getattr(r, name) for r in full],
                                                      dtype=object)
                                       for name in ROW_FIELDS}
        cols["path"] = np.array([os.fsencode(r.path) for r in full], dtype=object)
        cols["score"] = np.array([r.score for r in full], dtype=np.float64)
        cols["is_ood"] = np.array([bool(r.is_ood) for r in full], dtype=bool)  # error: see _row
        cols["predicted_class"] = np.array([r.predicted_class for r in full], dtype=np.int64)
        cols["is_image"] = np.array([st is not None for st in status], dtype=bool)
        if self.neighbors:
            cols["neighbors"] = np.array([json.dumps(r.neighbors or []) for r in full],
                                         dtype=object)
        return cols


def iter_ray(bundle: Bundle, root: Path, paths: Sequence[str], *, batch_size: int,
             workers: int | None, device: str, max_pixels: int,
             search_params: dict[str, int] | None = None,
             neighbors: int = 0) -> Iterator[tuple[int, list[Row]]]:
    """The ray engine, with `score_folder.iter_local`'s contract: yields (0, []) once Ray is up,
    then (files consumed, their rows) per batch, in no particular order. See the module
    docstring for the cluster set-up."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        if paths:
            yield 0, []                 # start-up over: the cluster is up (actors load lazily)
            yield from _run(ray, bundle, root, paths, batch_size, workers, device, max_pixels,
                            search_params or {}, neighbors)
    finally:
        if started:
            ray.shutdown()


def _run(ray: Any, bundle: Bundle, root: Path, paths: Sequence[str], batch_size: int,
         workers: int | None, device: str, max_pixels: int,
         search_params: dict[str, int], neighbors: int) -> Iterator[tuple[int, list[Row]]]:
    ray.data.DataContext.get_current().enable_progress_bars = False   # the driver has its own
    actors = workers or max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    ds = ray.data.from_items([{"path": os.fsencode(p)} for p in paths])
    ds = ds.map_batches(RayScorer, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs=dict(bundle_dir=str(bundle.path.resolve()),
                                                   root=os.path.abspath(root), device=device,
                                                   threads=1, max_pixels=max_pixels,
                                                   search_params=search_params,
                                                   neighbors=neighbors),
                        num_cpus=1, num_gpus=1 if device == "cuda" else 0)
    seen: set[str] = set()
    for cols in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows = [_row(cols, i) for i in range(len(cols["path"])) if cols["is_image"][i]]
        seen.update(os.fsdecode(bytes(p)) for p in cols["path"])
        yield len(cols["path"]), rows
    missing = [p for p in paths if p not in seen]      # read by no task: report, never drop
    if missing:
        yield len(missing), [Row(p, float("nan"), None, "", -1, "not read by the ray engine",
                                 bundle.manifest.model_version, [] if neighbors else None)
                             for p in missing]


def _row(cols: dict[str, np.ndarray], i: int) -> Row:
    error = str(cols["error"][i])
    near = json.loads(cols["neighbors"][i]) if "neighbors" in cols else None
    return Row(os.fsdecode(bytes(cols["path"][i])), float(cols["score"][i]),
               None if error else bool(cols["is_ood"][i]), str(cols["predicted_label"][i]),
               int(cols["predicted_class"][i]), error, str(cols["model_version"][i]), near)
