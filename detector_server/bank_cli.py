"""`rwood-bank`: edit and inspect a bundle's bank on the serving host (runtime install, no torch).

Examples:

    rwood-bank info bundles/digits
    rwood-bank add bundles/digits new_sixes/ --label 6 --out bundles/digits --force
    rwood-bank add bundles/digits more.npz --calibration heldout/ --out bundles/digits-v2
    rwood-bank remove bundles/digits --source 'new_sixes/*' --out bundles/digits --force

With `--out` the served bundle (and `--force`), a running `rwood-serve --watch` (or one sent
SIGHUP) serves the new bank with no failed request. The work is `detector_server.bank_edit` and
`detector_server.bank_info`; this module parses flags and prints. Exit status 2 with a one-line
message for a bad bundle, data set or option.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .bank_edit import add_images, remove_rows
from .bank_info import bank_info, describe_info
from .cli_common import Group, run_cli, setup_logging

__all__ = ["bank_main"]

_OUT = click.option("--out", required=True, type=click.Path(path_type=Path),
                    help="Bundle directory to write; may be BUNDLE itself (with --force).")
_FORCE = click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
_CALIBRATION = click.option(
    "--calibration", type=click.Path(path_type=Path), default=None,
    help="Recalibrate the threshold on these held-out ID images (folder or .npz; every class, "
         "none of them in the bank). Default: keep the threshold and report the calibration "
         "TPR at it.")
_TPR = click.option("--tpr", type=float, default=None,
                    help="Target TPR with --calibration [default: the bundle's].")
_THREADS = click.option("--threads", type=int, default=None, help="CPU threads [default: all].")
_VERBOSE = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")


@click.group(cls=Group)
def bank_main() -> None:
    """Add images to a deployed bundle's bank, remove rows, or show what it holds. Images go
    through the bundle's own preprocessing and ONNX model; the result is a new bundle (new
    model_version, lineage in the manifest) written atomically."""


@bank_main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@_OUT
@click.option("--label", default=None,
              help="Class of every image in DATA (a flat folder, or an npz without labels). "
                   "Default: DATA is ROOT/<class>/<images> or an npz with labels and classes. "
                   "An unknown class is added to the bundle's classes.")
@_CALIBRATION
@_TPR
@_FORCE
@_THREADS
@_VERBOSE
def add(bundle: Path, data: Path, out: Path, label: str | None, calibration: Path | None,
        tpr: float | None, force: bool, threads: int | None, verbose: bool) -> None:
    """Add the images of DATA (image folder or .npz) to the bank of BUNDLE."""
    setup_logging(verbose)
    report = run_cli(add_images, bundle, data, out, label=label, calibration=calibration,
                     tpr=tpr, overwrite=force, threads=threads)
    click.echo(report.describe())


@bank_main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_OUT
@click.option("--label", default=None, help="Remove every row of this class.")
@click.option("--source", default=None, metavar="GLOB",
              help="Remove every row whose source matches GLOB (shell pattern, `*` crosses '/'): "
                   "'new_sixes/*', 'train#12*'. `rwood-bank info` lists the sources.")
@_CALIBRATION
@_TPR
@_FORCE
@_THREADS
@_VERBOSE
def remove(bundle: Path, out: Path, label: str | None, source: str | None,
           calibration: Path | None, tpr: float | None, force: bool, threads: int | None,
           verbose: bool) -> None:
    """Remove rows from the bank of BUNDLE by class (--label) or by source (--source)."""
    setup_logging(verbose)
    report = run_cli(remove_rows, bundle, out, label=label, source=source,
                     calibration=calibration, tpr=tpr, overwrite=force, threads=threads)
    click.echo(report.describe())


@bank_main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(bundle: Path, as_json: bool) -> None:
    """Rows per class and per source, the edit lineage and warnings of BUNDLE's bank."""
    setup_logging(False)
    summary = run_cli(bank_info, bundle)
    click.echo(json.dumps(summary, indent=2) if as_json else describe_info(summary))


if __name__ == "__main__":
    bank_main()
