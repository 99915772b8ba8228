"""Batch scoring of an image folder into one table: the driver behind `rwood-score`.

Use `score_folder(bundle, input_dir, out)` to score every image under a folder offline (thousands
to millions of files) into CSV, JSONL or Parquet; `rwood-serve` is for live requests. Scores equal
the server's for the same file and bundle: files are decoded as `Detector.prepare` decodes bytes
and scored by `Detector.score_arrays`.

This module lists the folder, checks the options, picks the engine (`ENGINES`), drives it and
counts. The rest lives in one module per concern:
- `score_decode`: which files get a row, reading (with its size and header guards), decoding and
  the decode process pool (numpy and Pillow only);
- `score_table`: `Row`, the CSV/JSONL/Parquet formats, `read_rows`, the crash journal and the
  rows kept by --resume;
- `score_plot`: the --plot histogram;
- `score_ray`: engine "ray" (Ray Data), the same rows as engine "local".

Pipeline (engine "local", `iter_local`): the main process lists the files; `workers` spawned
processes read and decode chunks of them; the main process scores batches of `batch_size` while
the workers decode the next ones.

Test: tests/runtime/test_score_folder.py. Benchmark: bench/score_folder.py.
"""
from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import score_plot
from .drift import MIN_SCORES, DriftReport, drift_test
from .errors import InputError
from .preprocess import DEFAULT_MAX_PIXELS
from .score_decode import DecodeAhead, list_files
from .score_table import Journal, Row, make_rows, output_format, partial_path, prior_rows, read_rows
from .validate import check_int, check_number

# ONNX Runtime and FAISS are imported only where a bundle is loaded or scored, not at the top:
# spawned decode processes re-import the main module (rwood-score's), which imports this one.
if TYPE_CHECKING:
    from .bundle import Bundle
    from .detector import Detector

__all__ = ["ScoreSummary", "ENGINES", "DEFAULT_BATCH_SIZE", "score_folder", "iter_local"]

DEFAULT_BATCH_SIZE = 256
_CHUNK = 32                     # files per decoding task


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
    drift: DriftReport | None = None    # every score in `out` against the calibration scores
    drift_note: str = ""        # why there is no drift report (old bundle, too few scores)

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
        d = self.drift
        if d is None:
            lines.append(f"drift test  skipped: {self.drift_note}")
        else:
            verdict = "" if d.alpha is None else (
                f"; {'DRIFT' if d.drifted else 'no drift'} at alpha {d.alpha:g}")
            lines.append(f"drift test  two-sample KS of {d.n} scores vs {d.n_calibration} "
                         f"calibration scores: statistic {d.statistic:.4f}, p-value "
                         f"{d.pvalue:.3g}{verdict}")
            lines.append(f"OOD rate    {d.ood_rate:.1%} of the scores in the output (expected "
                         f"{d.expected_ood_rate:.1%}, the calibration scores' rate)")
        return "\n".join(lines)


# ---------------------------------------------------------------- the local engine

def iter_local(bundle: "Bundle", root: Path, paths: Sequence[str], *, batch_size: int,
               workers: int | None, device: str, max_pixels: int,
               neighbors: int = 0) -> Iterator[tuple[int, list[Row]]]:
    """The local engine: yields (files consumed, their rows) per scored batch, in file order;
    with `neighbors` > 0 each row lists that many nearest bank rows.

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
    decoded = DecodeAhead(str(root), chunks, bundle.spec, max_pixels,
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
                yield len(buf_paths), _score(detector, buf_paths, buf_status, buf_arrays,
                                             neighbors)
                buf_paths, buf_status, buf_arrays = [], [], []
        if buf_paths:
            yield len(buf_paths), _score(detector, buf_paths, buf_status, buf_arrays, neighbors)
    finally:
        decoded.close()


def _score(detector: "Detector", paths: list[str], status: list[str | None],
           arrays: list[np.ndarray], neighbors: int) -> list[Row]:
    images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    batch = detector.score_arrays(images, neighbors)
    return make_rows(paths, status, batch, detector.class_names, detector.model_version,
                     detector.describe_neighbors if neighbors else None)


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


# ---------------------------------------------------------------- the driver

def score_folder(bundle: "str | os.PathLike | Bundle", input_dir: str | os.PathLike,
                 out: str | os.PathLike, *, recursive: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                 device: str = "auto", resume: bool = False, plot: str | os.PathLike | None = None,
                 engine: str = "local", progress: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, neighbors: int = 0,
                 drift_alpha: float | None = None) -> ScoreSummary:
    """Score every image file under `input_dir` with `bundle` into the table `out`.

    bundle: a bundle directory (or a loaded `Bundle`); out: *.csv, *.jsonl or *.parquet;
    batch_size: images per model call; workers: decoding processes (local engine; default cores-1,
    0 = in this process) or Detector actors (ray engine); device: auto|cpu|cuda; resume: keep the
    rows already in `out` / its partial file and score only the other files; plot: also save a
    histogram of all scores in `out` with the threshold line (needs matplotlib); engine: a key of
    `ENGINES`; progress: show a tqdm bar (images/s, running OOD rate); neighbors: add to each
    row its N nearest bank rows (0 <= N <= the bundle's K; `score_table` says how each format
    holds them); drift_alpha: significance level (0, 0.5] of the drift test that ends every run
    (`ScoreSummary.drift.drifted` says if it found drift; without it the test is reported, never
    decided). The test compares every score in
    `out` (resumed rows too) with the bundle's calibration scores (`detector_server.drift`); it is
    skipped, with `drift_note` saying why, for a bundle exported without them.
    Raises InputError (bad option, missing folder, missing pyarrow/matplotlib/ray, resume over
    another model's rows) or BundleError, naming the path or field; bad image files never raise.
    """
    out = Path(out)
    fmt = output_format(out)
    if not out.parent.is_dir():
        raise InputError("the folder of the output file does not exist", path=out.parent)
    _check_options(batch_size, workers, plot, max_pixels)
    if drift_alpha is not None:
        check_number(drift_alpha, "fail_on_drift", above=0.0, maximum=0.5)
    run = _engine(engine)
    b = _load_bundle(bundle)
    check_int(neighbors, "neighbors", minimum=0, maximum=b.manifest.k)
    version = b.manifest.model_version
    exclude = [out, partial_path(out)] + ([Path(plot)] if plot is not None else [])
    files = list_files(input_dir, recursive, exclude)
    prior = prior_rows(out, resume, version, neighbors > 0)
    done = {r.path for r in prior}
    todo = [p for p in files if p not in done]
    journal = Journal(out, prior)
    try:
        batches = run(b, Path(input_dir), todo, batch_size=batch_size, workers=workers,
                      device=device, max_pixels=max_pixels, neighbors=neighbors)
        counts, times = _consume(batches, journal, len(todo), progress)
        journal.publish(out, fmt)
    except BaseException:
        journal.abandon()
        raise
    scores = np.array([r.score for r in read_rows(out)], dtype=np.float64)   # NaN: error rows
    plot_path = None
    if plot is not None:
        plot_path = score_plot.plot_scores(scores, b.manifest.threshold.value, plot, title=version)
    drift, note = _drift(b, scores, drift_alpha)
    return ScoreSummary(out, len(files), len(files) - len(todo), counts["scored"], counts["ood"],
                        counts["errors"], counts["skipped"], *times, plot=plot_path, drift=drift,
                        drift_note=note)


def _drift(bundle: "Bundle", scores: np.ndarray, alpha: float | None
           ) -> tuple[DriftReport | None, str]:
    """The drift test of `scores` against the bundle's calibration scores, or why it was skipped."""
    calibration = bundle.calibration_scores()
    if calibration is None:
        return None, ("the bundle has no calibration scores (exported before they were stored; "
                      "export it again to test for drift)")
    if np.isfinite(scores).sum() < MIN_SCORES:
        return None, f"fewer than {MIN_SCORES} scored images"
    return drift_test(scores, calibration, bundle.manifest.threshold.value, alpha), ""


def _consume(batches: Iterator[tuple[int, list[Row]]], journal: Journal, total: int,
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
        score_plot.check_available()

