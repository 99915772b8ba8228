"""`rwood-score BUNDLE INPUT... --out TABLE`: score image folders and files (parses flags, calls
`score_folder`).

Examples:

    rwood-score bundles/cifar10 photos/ --out scores.csv --recursive --plot scores.png
    rwood-score bundles/cifar10 photos/ --out scores.parquet --resume       # after a crash
    rwood-score bundles/cifar10 cat.jpg dog.png --out two.csv
    find /data -name '*.jpg' -mtime -1 | rwood-score bundles/cifar10 --files-from - --out new.csv
    RAY_ADDRESS=ray://head:10001 rwood-score bundles/cifar10 /shared/photos \\
        --out scores.jsonl --recursive --engine ray --workers 16

One row per image file (which files: detector_server/score_decode.py; the table:
detector_server/score_table.py); bad files get an error row and never stop the run. The run
ends with a drift test of the table's scores against the bundle's calibration scores
(detector_server/drift.py). Exit status 2 with a one-line message for a bad bundle, input or
option, an existing --out without --resume or --force, or inputs without a single image; 3 with
--fail-on-drift ALPHA when the drift test's p-value is below ALPHA.
"""
from __future__ import annotations

import sys

import click

from .ann import parse_search_params
from .cli_common import Command, run_cli, setup_logging
from .preprocess import DEFAULT_MAX_PIXELS
from .score_folder import DEFAULT_BATCH_SIZE, ENGINES, score_folder

__all__ = ["score_main"]


@click.command(cls=Command, context_settings={"show_default": True})
@click.argument("bundle", type=click.Path(file_okay=False, dir_okay=True))
@click.argument("inputs", metavar="INPUT...", nargs=-1, type=click.Path())
@click.option("--files-from", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Also score the files (or folders) listed in this file, one path a line, "
                   "relative to the current folder; '-' reads the list from stdin.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The table to write: .csv, .jsonl or .parquet (Parquet needs pyarrow). Row "
                   "paths are relative to INPUT when it is one folder, else as named.")
@click.option("--recursive", is_flag=True, help="Also score the images in subfolders.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="Images per model call.")
@click.option("--workers", type=int, default=None,
              help="Decoding processes (local engine; default: cores - 1; 0: decode in the main "
                   "process) or Detector actors (ray engine; default: cluster CPUs - 1).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="Where ONNX Runtime and FAISS run.")
@click.option("--resume", is_flag=True,
              help="Keep the rows already in --out (or its .partial.jsonl after a crash) and "
                   "score only the other files.")
@click.option("--force", is_flag=True, help="Replace an existing --out (else it is refused).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also save a histogram of the scores with the threshold (needs matplotlib).")
@click.option("--engine", type=click.Choice(sorted(ENGINES)), default="local",
              help="local: worker processes on this machine; ray: Ray Data (RAY_ADDRESS picks "
                   "the cluster; needs the [ray] extra).")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
              help="Images with more pixels get an error row (decompression-bomb guard).")
@click.option("--neighbors", type=int, default=0,
              help="Also write each image's N nearest bank rows (row, class, similarity, "
                   "source), at most the bundle's K: a nested list in JSONL and Parquet, one JSON "
                   "column in CSV.")
@click.option("--fail-on-drift", "drift_alpha", type=float, default=None, metavar="ALPHA",
              help="Exit with status 3 when the drift test (two-sample Kolmogorov-Smirnov of the "
                   "scores against the bundle's calibration scores) has a p-value below ALPHA "
                   "(in (0, 0.5], e.g. 0.01), for pipelines. Without it the test is reported only.")
@click.option("--search", multiple=True, metavar="NAME=VALUE",
              help="Override a search parameter of the bundle's index (repeatable; e.g. "
                   "nprobe=64): logged, since the threshold was calibrated with the bundle's.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def score_main(bundle: str, inputs: tuple[str, ...], out: str, verbose: bool,
               search: tuple[str, ...], **options: object) -> None:
    """Score every image file of INPUT (folders and files) with the detector in BUNDLE into one
    table.

    The summary gives the counts of this call and of the whole table (after --resume, the rows
    kept are in it), and the time as listing + start-up (model, workers) + scoring + writing,
    with the scoring rate in files per second.
    """
    setup_logging(verbose)
    params = run_cli(parse_search_params, search)
    summary = run_cli(score_folder, bundle, list(inputs), out, search_params=params, **options)
    click.echo(summary.describe())
    if summary.drift is not None and summary.drift.drifted:
        sys.exit(3)


if __name__ == "__main__":
    score_main()
