"""`rwood-eval`: the command-line front of trainer.evaluate (parse options, evaluate, write report)."""
from __future__ import annotations

from pathlib import Path

import click

from detector_server.bundle import FEATURE_OUTPUTS
from detector_server.cli_common import Command, run_cli, setup_logging
from detector_server.errors import InputError

from .evaluate import list_postprocessors
from .ood_sets import OOD_HELP, parse_set_arg
from .report import detection_summary, evaluate_run
from .run_dir import K_HELP


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    """("name=path", ...) -> {name: path}; InputError on a malformed or repeated name."""
    out: dict[str, str] = {}
    for v in values:
        name, path = parse_set_arg(v)
        if name in out:
            raise InputError(f"OOD set {name!r} is given twice", field="ood")
        out[name] = path
    return out


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write over an earlier report (another run's, or other OOD sets') unless `force`."""
    if (out / "report.json").exists() and not force:
        raise InputError("already holds a report: pass --force to replace it, or another --out",
                         path=out)


@click.command(cls=Command)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--id-test", default=None, metavar="PATH|NAME=PATH",
              help="In-distribution test images: .npz, image folder (ROOT/<class>/... gives labels), "
                   "or cifar10=ROOT / cifar100=ROOT. Default: the run's test split, else its "
                   "held-out calibration split. Classes the model was not trained on are named "
                   "in a warning (they still count as in-distribution).")
@click.option("--ood", multiple=True, metavar="NAME=PATH", help=OOD_HELP)
@click.option("--postprocessor", type=click.Choice(list_postprocessors()), default="knn",
              show_default=True,
              help="knn: the deployed runtime's scorer (the paper's protocol); mahalanobis: class "
                   "means and one shared covariance, the authors' released postprocessor.")
@click.option("--k", type=int, default=None, help=K_HELP)
@click.option("--feature", type=click.Choice(list(FEATURE_OUTPUTS)), default="penultimate",
              show_default=True, help="Which bank embedding is scored.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Report folder (default RUN_DIR/eval). One that already holds a report is "
                   "refused unless --force.")
@click.option("--force", is_flag=True, help="Replace the report already in --out.")
@click.option("--batch-size", type=int, default=512, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def eval_main(run_dir, id_test, ood, postprocessor, k, feature, out, force, batch_size, device,
              verbose) -> None:
    """Evaluate OOD detection of a trained run and write report.json, report.md and PNG plots.

    \b
        rwood-eval runs/c10 --ood mnist=../shared/data/ood_mnist.npz \\
            --ood textures=../shared/data/ood_textures.npz --out reports/c10
    """
    setup_logging(verbose)
    out = out or str(Path(run_dir) / "eval")

    def go():
        _check_out(Path(out), force)
        return evaluate_run(run_dir, id_test=id_test, ood=_parse_sets(ood),
                            postprocessor=postprocessor, k=k, feature=feature,
                            batch_size=batch_size, device=device, out=out, progress=True)

    report = run_cli(go)
    click.echo(detection_summary(report))
    click.echo(f"\nreport written to {out}")


if __name__ == "__main__":
    eval_main()
