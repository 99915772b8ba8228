"""`rwood-export RUN_DIR --out BUNDLE`: the command-line face of `export_bundle` (parsing only).

Example:
    rwood-export runs/cifar10 --out bundles/cifar10 --k 100 --tpr 0.95 --quantize int8
"""
from __future__ import annotations

from pathlib import Path

import click

from detector_server.bundle import FEATURE_OUTPUTS
from detector_server.cli_common import Command, run_cli, setup_logging
from trainer.run_dir import K_HELP

from .config import DEFAULT_OPSET
from .export import export_bundle
from .quantize import list_quantizers

__all__ = ["export_main"]


@click.command(cls=Command)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write (must not exist unless --force).")
@click.option("--feature", type=click.Choice(sorted(FEATURE_OUTPUTS)), default="penultimate",
              show_default=True, help="Embedding to index and score.")
@click.option("--k", type=int, default=None, help=K_HELP)
@click.option("--tpr", type=float, default=0.95, show_default=True,
              help="Fraction of held-out ID images the threshold keeps.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Held-out ID images for the threshold: .npz (key 'images') or an image folder "
                   "[default: the run's calibration.npz]. At least 20; must not overlap the bank "
                   "(images the run trained on are refused, with their count).")
@click.option("--index", "index_factory", default="Flat", show_default=True,
              help="faiss index_factory string, e.g. 'IVF1024,Flat' or 'IVF1024,PQ32' for "
                   "big banks.")
@click.option("--quantize", type=click.Choice(list_quantizers()), default=None,
              help="Also write a statically quantised model and serve it.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset (>= 18).")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all cores].")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def export_main(run_dir: Path, out: Path, feature: str, k: int | None, tpr: float,
                calibration: Path | None, index_factory: str, quantize: str | None, opset: int,
                threads: int | None, force: bool, verbose: bool) -> None:
    """Export a finished training run (RUN_DIR with model.pt and bank.npz) as a deployable bundle:
    ONNX model, FAISS index, labels and a manifest with the calibrated threshold."""
    setup_logging(verbose)
    path = run_cli(export_bundle, run_dir, out, feature=feature, k=k, tpr=tpr,
                   calibration=calibration, index_factory=index_factory, quantize=quantize,
                   opset=opset, overwrite=force, threads=threads)
    click.echo(str(path))


if __name__ == "__main__":
    export_main()
