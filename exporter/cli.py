"""`rwood-export RUN_DIR --out BUNDLE`: the command-line face of `export_bundle` (parsing only).

Examples:
    rwood-export runs/cifar10 --out bundles/cifar10 --k 100 --tpr 0.95 --quantize int8
    rwood-export runs/imagenet --out bundles/inet --index auto --check-ood textures=dtd.npz
    rwood-export runs/imagenet --out bundles/inet --index IVF1024,Flat --search nprobe=32
    rwood-export runs/cifar10 --out bundles/c10-mds --scorer mahalanobis
"""
from __future__ import annotations

from pathlib import Path

import click

from detector_server.ann import parse_search_params
from detector_server.bundle import FEATURE_OUTPUTS, SCORERS
from detector_server.cli_common import Command, run_cli, setup_logging
from detector_server.index_choice import AUTO, DEFAULT_MIN_RECALL, FLAT_MAX_VALUES
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
@click.option("--scorer", type=click.Choice(SCORERS), default="knn", show_default=True,
              help="knn: distance to the K-th nearest bank row (a FAISS index of the bank); "
                   "mahalanobis: class means and one shared precision matrix, whose cost does "
                   "not grow with the bank.")
@click.option("--index", "index", default=AUTO, show_default=True,
              help=f"'auto': exact search (Flat) up to {FLAT_MAX_VALUES:,} bank values (rows x "
                   "dims), else an IVF index sized from the bank; or a faiss index_factory string "
                   "('Flat', 'IVF1024,Flat', 'IVF1024,SQ8', 'HNSW32'). An approximate index is "
                   "checked against exact search on the calibration images.")
@click.option("--search", "search", multiple=True, metavar="NAME=VALUE",
              help="Fix a search parameter of the index (repeatable): nprobe=N for IVF, "
                   "efSearch=N for HNSW [default: the smallest reaching half the misses "
                   "--min-recall allows, on the calibration images].")
@click.option("--min-recall", type=float, default=DEFAULT_MIN_RECALL, show_default=True,
              help="Least recall of the K-th neighbour an approximate index may have on the "
                   "calibration images (queries short of K neighbours are always refused).")
@click.option("--index-memory", "index_memory", type=float, default=None, metavar="MIB",
              help="Memory limit of an 'auto' index in MiB: above, vectors are stored as SQ8, "
                   "then PQ codes [default: no limit, float32].")
@click.option("--check-ood", multiple=True, metavar="NAME=PATH",
              help="OOD images (.npz or folder; repeatable) on which the index check also "
                   "reports the FPR change against exact search.")
@click.option("--quantize", type=click.Choice(list_quantizers()), default=None,
              help="Also write a statically quantised model and serve it.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset (>= 18).")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all cores].")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def export_main(run_dir: Path, out: Path, feature: str, k: int | None, tpr: float,
                calibration: Path | None, scorer: str, index: str,
                search: tuple[str, ...], min_recall: float, index_memory: float | None,
                check_ood: tuple[str, ...], quantize: str | None, opset: int,
                threads: int | None, force: bool, verbose: bool) -> None:
    """Export a finished training run (RUN_DIR with model.pt and bank.npz) as a deployable bundle:
    ONNX model, the scorer (FAISS index and labels, or Mahalanobis parameters) and a manifest
    with the calibrated threshold and the index check."""
    setup_logging(verbose)
    params = run_cli(parse_search_params, search)
    path = run_cli(export_bundle, run_dir, out, feature=feature, k=k, tpr=tpr,
                   calibration=calibration, scorer=scorer, index_factory=index,
                   search_params=params, min_recall=min_recall,
                   index_memory_mib=index_memory, check_ood=check_ood, quantize=quantize,
                   opset=opset, overwrite=force, threads=threads)
    click.echo(str(path))


if __name__ == "__main__":
    export_main()
