"""Batch scoring of an image folder into one table: the driver behind `rwood-score`.

Use `score_folder(bundle, inputs, out)` to score every image of folders and files offline
(thousands to millions of files) into CSV, JSONL or Parquet; `rwood-serve` is for live requests. Scores equal
the server's for the same file and bundle: files are decoded as `Detector.prepare` decodes bytes
and scored by `Detector.score_arrays`.

This module checks the options and the output, collects the inputs, picks the engine
(`ENGINES`), drives it, counts and times (`ScoreSummary`). The rest lives in one module per
concern:
- `score_decode`: which files get a row (folders walked by `listing`), reading (with its
  regular-file, size and header guards), decoding and the decode process pool (numpy and
  Pillow only);
- `score_table`: `Row`, the CSV/JSONL/Parquet formats, `read_rows`, the crash journal and the
  rows kept by --resume;
- `score_plot`: the --plot histogram;
- `score_ray`: engine "ray" (Ray Data), the same rows as engine "local".

Pipeline (engine "local", `iter_local`): the main process lists the files; `workers` spawned
processes read and decode chunks of them; the main process scores batches of `batch_size` while
the workers decode the next ones.

Test: tests/runtime/test_score_folder.py, tests/runtime/test_score_inputs.py. Benchmark:
bench/score_folder.py.
"""
from __future__ import annotations

import importlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import score_plot
from .ann import check_search_params, served_version
from .drift import MIN_SCORES, DriftReport, drift_test
from .errors import InputError
from .preprocess import DEFAULT_MAX_PIXELS
from .score_decode import DecodeAhead, collect_inputs
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
    """What one `score_folder` call did, and what the output table holds after it.

    The four times add up to the call's wall time (`seconds`); the rate is that of the scoring
    phase alone, so it does not depend on how large the folder is next to the start-up."""

    out: Path
    files: int                  # files found in INPUT (each folder walked, each listed file)
    resumed: int                # of them already in the output (kept, not read again)
    scored: int                 # rows with a score written by this call
    ood: int                    # of those, flagged out-of-distribution
    errors: int                 # error rows written by this call
    skipped: int                # files read by this call that are not images (no row)
    total_scored: int = 0       # rows with a score in the whole output table
    total_ood: int = 0          # of those, flagged out-of-distribution
    total_errors: int = 0       # error rows in the whole output table
    list_s: float = 0.0         # finding the files and reading the rows kept by --resume
    startup_s: float = 0.0      # checks, opening the bundle, loading the model, starting workers
    scoring_s: float = 0.0      # reading, decoding and scoring, to the last row
    write_s: float = 0.0        # writing the finished table (and the plot), the drift test
    plot: Path | None = None
    drift: DriftReport | None = None    # every score in `out` against the calibration scores
    drift_note: str = ""        # why there is no drift report (old bundle, too few scores)

    @property
    def read(self) -> int:
        """Files read by this call (scored, errors and not images)."""
        return self.scored + self.errors + self.skipped

    @property
    def seconds(self) -> float:
        """Wall time of the call: listing + start-up + scoring + writing."""
        return self.list_s + self.startup_s + self.scoring_s + self.write_s

    @property
    def files_per_s(self) -> float:
        """Files read per second of the scoring phase (start-up excluded): the rate to expect on
        a large folder. 0 when nothing was read."""
        return self.read / self.scoring_s if self.read and self.scoring_s > 0 else 0.0

    def describe(self) -> str:
        """The human summary the CLI prints (counts of this call, then of the whole table)."""
        rows = self.total_scored + self.total_errors
        share = f", {self.total_ood / self.total_scored:.1%}" if self.total_scored else ""
        parts = _rounded_parts([self.list_s, self.startup_s, self.scoring_s, self.write_s])
        lines = [f"input       {self.files} files: {self.read} read now ({self.skipped} not "
                 f"images), {self.resumed} already in the output",
                 f"this call   {self.scored} scored ({self.ood} OOD), {self.errors} errors",
                 f"output      {self.out}: {rows} rows, {self.total_scored} scored "
                 f"({self.total_ood} OOD{share}), {self.total_errors} errors",
                 f"time        {sum(parts):.1f} s = {parts[0]:.1f} s listing + {parts[1]:.1f} s "
                 f"start-up + {parts[2]:.1f} s scoring ({self.files_per_s:.1f} files/s) + "
                 f"{parts[3]:.1f} s writing"]
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


def _rounded_parts(parts: list[float]) -> list[float]:
    """Round to 0.1 so that the rounded parts add up to the rounded total (cumulative rounding)."""
    cum = [round(sum(parts[:i + 1]), 1) for i in range(len(parts))]
    return [round(c - p, 1) for c, p in zip(cum, [0.0] + cum[:-1])]


# ---------------------------------------------------------------- the local engine

def iter_local(bundle: "Bundle", root: Path, paths: Sequence[str], *, batch_size: int,
               workers: int | None, device: str, max_pixels: int,
               search_params: dict[str, int] | None = None,
               neighbors: int = 0) -> Iterator[tuple[int, list[Row]]]:
    """The local engine: yields (files consumed, their rows) per scored batch, in file order,
    after a first (0, []) once the model is loaded and the first chunk is decoded (the end of the
    start-up: the decode processes are running). With `neighbors` > 0 each row lists that many
    nearest bank rows.

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
        detector = Detector(bundle, device=device, max_pixels=max_pixels,
                            search_params=search_params)
        ahead = iter(decoded)
        first = next(ahead, None)
        yield 0, []
        buf_paths: list[str] = []
        buf_status: list[str | None] = []
        buf_arrays: list[np.ndarray] = []
        for chunk, (arrays, status) in itertools.chain([first] if first else [], ahead):
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
# ray stays an optional dependency). An engine may first yield (0, []) when it is ready to score:
# the time until then is reported as start-up. A module may define `check_available()`, called
# first, which raises InputError when what the engine needs is not installed.
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

def score_folder(bundle: "str | os.PathLike | Bundle",
                 inputs: "str | os.PathLike | Sequence[str | os.PathLike]",
                 out: str | os.PathLike, *, files_from: str | os.PathLike | None = None,
                 recursive: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                 workers: int | None = None, device: str = "auto", resume: bool = False,
                 force: bool = False, plot: str | os.PathLike | None = None,
                 engine: str = "local", progress: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, neighbors: int = 0,
                 drift_alpha: float | None = None,
                 search_params: dict[str, int] | None = None) -> ScoreSummary:
    """Score every image file of `inputs` with `bundle` into the table `out`.

    bundle: a bundle directory (or a loaded `Bundle`); inputs: a folder, a file, or a list of
    them (row paths: relative to the folder when it is the only input, else as named; see
    `score_decode.collect_inputs`); out: *.csv, *.jsonl or *.parquet; files_from: a file listing
    more paths, one a line ("-": stdin); batch_size: images per model call; workers: decoding
    processes (local engine; default cores-1, 0 = in this process) or Detector actors (ray
    engine); device: auto|cpu|cuda; resume: keep the rows already in `out` / its partial file
    and score only the other files; force: replace an existing `out` (without resume or force,
    an existing `out` or partial file is refused); plot: also save a histogram of all scores in
    `out` with the threshold line (needs matplotlib); engine: a key of `ENGINES`; progress: show
    a tqdm bar (files/s, running OOD rate); neighbors: add to each row its N nearest bank rows
    (0 <= N <= the bundle's K; `score_table` says how each format holds them);
    drift_alpha: significance level (0, 0.5] of the drift
    test that ends every run (`ScoreSummary.drift.drifted` says if it found drift; without it the
    test is reported, never decided). The test compares every score in `out` (resumed rows too)
    with the bundle's calibration scores (`detector_server.drift`); it is skipped, with
    `drift_note` saying why, for a bundle exported without them. search_params: override of the
    bundle's index search parameters, e.g. {"nprobe": 64} (logged; see `Detector`).
    Raises InputError (bad option, missing input, no files or no image at all, existing output,
    missing pyarrow/matplotlib/ray, resume over another model's rows) or BundleError, naming the
    path or field; bad image files never raise (they get error rows).
    """
    t0 = time.perf_counter()
    out = Path(out)
    fmt = output_format(out)
    if not out.parent.is_dir():
        raise InputError("the folder of the output file does not exist", path=out.parent)
    _check_output(out, resume, force)
    _check_options(batch_size, workers, plot, max_pixels)
    search_params = check_search_params(search_params, "search")
    if drift_alpha is not None:
        check_number(drift_alpha, "fail_on_drift", above=0.0, maximum=0.5)
    run = _engine(engine)
    b = _load_bundle(bundle)
    check_int(neighbors, "neighbors", minimum=0,   # no bank rows behind a mahalanobis score
              maximum=b.manifest.k if b.manifest.scorer == "knn" else 0)
    version = served_version(b.manifest, search_params)    # what the rows will carry
    exclude = [out, partial_path(out)] + ([Path(plot)] if plot is not None else [])
    named = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    t_listing = time.perf_counter()
    found = collect_inputs(named, files_from, recursive, exclude)
    prior = prior_rows(out, resume, version, neighbors > 0)
    done = {r.path for r in prior}
    todo = [p for p in found.paths if p not in done]
    journal = Journal(out, prior)
    t_listed = time.perf_counter()
    try:
        batches = run(b, Path(found.root), todo, batch_size=batch_size, workers=workers,
                      device=device, max_pixels=max_pixels,
                      search_params=search_params, neighbors=neighbors) if todo else iter(())
        counts, (startup_s, scoring_s) = _consume(batches, journal, len(todo), progress)
        if journal.rows == 0:
            raise InputError(f"no image files among the {len(found.paths)} files of INPUT",
                             path=named[0] if len(named) == 1 else None, field="input")
        t_scored = time.perf_counter()
        journal.publish(out, fmt)
    except BaseException:
        journal.abandon()
        raise
    scores = np.array([r.score for r in read_rows(out)], dtype=np.float64)   # NaN: error rows
    plot_path = None
    if plot is not None:
        plot_path = score_plot.plot_scores(scores, b.manifest.threshold.value, plot, title=version)
    drift, note = _drift(b, scores, drift_alpha)
    kept = _count(prior)
    return ScoreSummary(out, len(found.paths), len(found.paths) - len(todo), counts["scored"],
                        counts["ood"], counts["errors"], counts["skipped"],
                        total_scored=kept["scored"] + counts["scored"],
                        total_ood=kept["ood"] + counts["ood"],
                        total_errors=kept["errors"] + counts["errors"],
                        list_s=t_listed - t_listing,
                        startup_s=t_listing - t0 + startup_s, scoring_s=scoring_s,
                        write_s=time.perf_counter() - t_scored, plot=plot_path, drift=drift,
                        drift_note=note)


def _check_output(out: Path, resume: bool, force: bool) -> None:
    """Refuse to replace a table (or the rows of an unfinished run) without resume or force."""
    if resume or force:
        return
    for path in (out, partial_path(out)):
        if path.exists():
            what = "the output exists" if path == out else "an unfinished run left rows here"
            raise InputError(f"{what}: pass --resume to keep its rows and score only the files "
                             "without one, or --force to replace it", path=path)


def _count(rows: Sequence[Row]) -> dict[str, int]:
    errors = sum(1 for r in rows if r.error)
    return dict(scored=len(rows) - errors, errors=errors, ood=sum(1 for r in rows if r.is_ood))


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
             progress: bool) -> tuple[dict[str, int], tuple[float, float]]:
    """Append each batch's rows to the journal; count; drive the progress bar.
    Returns the counts and (start-up seconds: to the engine's (0, []), scoring seconds: after)."""
    from tqdm import tqdm

    counts = dict(scored=0, ood=0, errors=0, skipped=0)
    t0 = time.perf_counter()
    ready: float | None = None
    with tqdm(total=total, unit="file", disable=not progress, dynamic_ncols=True,
              desc="scoring") as bar:
        for consumed, rows in batches:
            if ready is None:
                ready = time.perf_counter() if consumed == 0 and not rows else t0
            journal.append(rows)
            for key, n in _count(rows).items():
                counts[key] += n
            counts["skipped"] += consumed - len(rows)
            bar.update(consumed)
            if counts["scored"]:
                bar.set_postfix(ood=f"{counts['ood'] / counts['scored']:.1%}",
                                errors=counts["errors"], refresh=False)
    t1 = time.perf_counter()
    ready = t1 if ready is None else ready
    return counts, (ready - t0, t1 - ready)


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

