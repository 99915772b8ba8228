"""The paper's comparison (Tables 2-4 and section 4.1), reproducible at a chosen budget.

Trains the four objectives (ce, supcon, unweighted, reweightood) with the same network, data,
budget and seed, evaluates each with KNN (the deployed scorer) and Mahalanobis on the OOD sets, and
writes one comparison table plus the embedding-quality table:

    python bench/paper_table.py --budget cpu --out bench_out/cpu      # small_cnn, < 40 min, 2 cores
    python bench/paper_table.py --budget gpu --out bench_out/gpu      # resnet18_cifar, official preset
    python bench/paper_table.py --quick --out bench_out/quick         # ~2-minute smoke run

Defaults use ../shared/data (CIFAR-10 train as ID training set, CIFAR-10 test as ID test, CIFAR-100
test / MNIST / DTD textures as OOD); --train-data/--id-test/--ood point elsewhere (a CIFAR-10
torchvision root works with --train-dataset cifar10). Finished runs in OUT/<objective> are reused
unless --retrain. Outputs: OUT/paper_table.md and OUT/paper_table.json, and every run's reports
in OUT/<objective>/eval_<postprocessor>/.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from detector_server.atomic import atomic_write, write_json_atomic, write_text_atomic
from detector_server.cli_common import run_cli, setup_logging
from detector_server.errors import CheckpointError
from trainer.config import resolve_config
from trainer.evaluate import evaluate_many
from trainer.report import detection_table, quality_table, write_report
from trainer.run_dir import RunDir

log = logging.getLogger("reweightood.bench")

OBJECTIVES = ("ce", "supcon", "unweighted", "reweightood")
POSTPROCESSORS = ("knn", "mahalanobis")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# budget -> (preset, TrainConfig overrides, images kept from the training set / ID test / each OOD
# set: None = all). The CPU budget is sized for all four objectives in < 40 min on 2 idle cores
# (measured ~1.7 CPU-s per 128-image step of small_cnn: ~80 s per epoch of 9,500 images).
BUDGETS: dict[str, tuple[str | None, dict[str, Any], int | None, int | None, int | None]] = {
    "cpu": (None, dict(arch="small_cnn", epochs=5, batch_size=128, lr=0.1, warmup_epochs=1,
                       device="cpu", amp=False), None, None, None),
    "gpu": ("official", dict(arch="resnet18_cifar", device="cuda"), None, None, None),
    "quick": (None, dict(arch="small_cnn", epochs=1, batch_size=64, lr=0.05, warmup_epochs=0,
                         device="cpu", amp=False), 600, 300, 150),
}
DEFAULT_OOD = ("cifar100=" + str(SHARED / "cifar100_test.npz"), "mnist=" + str(SHARED / "ood_mnist.npz"),
               "textures=" + str(SHARED / "ood_textures.npz"))


def _subset_npz(src: str, dst: Path, n: int) -> str:
    """The first n rows of an .npz (round-robin by class in the shared pack) as a new file."""
    if dst.is_file():
        return str(dst)
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: (f[k][:n] if f[k].ndim and len(f[k]) == len(f["images"]) else f[k])
                  for k in f.files}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    atomic_write(dst, write)
    return str(dst)


def _finished(run_dir: Path) -> bool:
    try:
        return RunDir(run_dir).info.finished
    except CheckpointError:  # no run yet, or an unusable one: train it (again)
        return False


def _train_one(objective: str, budget: str, train_dataset: str, train_data: str, out: Path,
               seed: int, epochs: int | None, retrain: bool) -> tuple[Path, float]:
    """Train one objective (or reuse a finished run); returns (run_dir, seconds spent)."""
    from trainer.train import train

    run_dir = out / objective
    if not retrain and _finished(run_dir):
        log.info("%s: reusing the finished run in %s", objective, run_dir)
        return run_dir, 0.0
    preset, overrides, *_ = BUDGETS[budget]
    overrides = {**overrides, "dataset": train_dataset, "data": train_data, "loss": objective,
                 "out": str(run_dir), "seed": seed, "epochs": epochs or overrides.get("epochs")}
    cfg = resolve_config(preset, overrides=overrides)
    log.info("%s: training %s for %d epochs", objective, cfg.arch, cfg.epochs)
    t0 = time.perf_counter()
    train(cfg)
    return run_dir, time.perf_counter() - t0


def run_paper_table(budget: str, out: str | Path, train_dataset: str = "npz",
                    train_data: str | None = None, id_test: str | None = None,
                    ood: tuple[str, ...] = DEFAULT_OOD, objectives: tuple[str, ...] = OBJECTIVES,
                    seed: int = 0, epochs: int | None = None, retrain: bool = False,
                    device: str = "auto") -> dict[str, Any]:
    """Train and evaluate every objective; write OUT/paper_table.{md,json}. Returns the JSON."""
    from trainer.ood_sets import parse_set_arg

    out = Path(out)
    _, _, n_train, n_test, n_ood = BUDGETS[budget]
    train_data = train_data or str(SHARED / "cifar10_train.npz")
    id_test = id_test or str(SHARED / "cifar10_test.npz")
    ood_sets = dict(parse_set_arg(v) for v in ood)
    if n_train:  # the quick budget: the first rows of each file
        train_data = _subset_npz(train_data, out / "data" / "train.npz", n_train)
        id_test = _subset_npz(id_test, out / "data" / "id_test.npz", n_test)
        ood_sets = {n: _subset_npz(p, out / "data" / f"ood_{n}.npz", n_ood) for n, p in ood_sets.items()}
    reports: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for objective in objectives:
        run_dir, seconds[objective] = _train_one(objective, budget, train_dataset, train_data, out,
                                                 seed, epochs, retrain)
        evs = evaluate_many(run_dir, id_test=id_test, ood=ood_sets, postprocessors=POSTPROCESSORS,
                            device=device)
        for post, ev in evs.items():
            write_report(ev, run_dir / f"eval_{post}")
            reports[f"{objective} ({post})"] = ev.report
    result = {"budget": budget, "seed": seed, "train_data": train_data, "id_test": id_test,
              "ood": ood_sets, "train_seconds": seconds, "reports": reports,
              "claims": _claims(reports)}
    write_json_atomic(out / "paper_table.json", result)
    md = _markdown(result)
    write_text_atomic(out / "paper_table.md", md)
    return result


def _claims(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ReweightOOD minus the unweighted baseline: FPR@95 and AUROC (average over OOD sets, per
    postprocessor), MES radius and dispersion (penultimate bank). Negative FPR/radius/dispersion
    deltas are what the paper claims."""
    out: dict[str, Any] = {}
    for post in POSTPROCESSORS:
        a, b = reports.get(f"reweightood ({post})"), reports.get(f"unweighted ({post})")
        if a and b and a["average"]:
            out[post] = {m: a["average"][m] - b["average"][m] for m in ("fpr@95", "auroc")}
    a, b = reports.get("reweightood (knn)"), reports.get("unweighted (knn)")
    if a and b:
        qa, qb = a["embedding_quality"]["penultimate"], b["embedding_quality"]["penultimate"]
        out["quality"] = {m: qa[m] - qb[m] for m in ("mean_radius", "dispersion")}
    return out


def _markdown(result: dict[str, Any]) -> str:
    reports = result["reports"]
    first = next(iter(reports.values()))
    s = first["settings"]
    lines = [f"# Paper comparison, budget `{result['budget']}` (seed {result['seed']})", "",
             f"Network `{first['model'].get('arch')}`, trained on `{result['train_data']}`; ID test "
             f"`{s['id_test']['source']}` ({s['id_test']['n']} images); bank of {s['bank_size']}; "
             f"KNN K={s['k']} on the penultimate feature. Numbers in %; FPR@95 lower is better.",
             "", "## OOD detection (FPR@95 / AUROC per set, then the average)", "",
             detection_table(reports), "",
             "## Embedding quality of the bank (paper section 4.1) and ID accuracy", "",
             quality_table({k.split(" ")[0]: r for k, r in reports.items() if k.endswith("(knn)")}),
             "", first["embedding_quality"]["note"], "",
             "## ReweightOOD minus the unweighted baseline", ""]
    c = result["claims"]
    for post in POSTPROCESSORS:
        if post in c:
            lines.append(f"- {post}: average FPR@95 {100 * c[post]['fpr@95']:+.2f} points, "
                         f"AUROC {100 * c[post]['auroc']:+.2f} points")
    if "quality" in c:
        lines.append(f"- MES radius {c['quality']['mean_radius']:+.4f}, dispersion (mean centroid "
                     f"cosine) {c['quality']['dispersion']:+.4f}")
    lines += ["", "Training time (s): " + ", ".join(f"{k} {v:.0f}"
                                                    for k, v in result["train_seconds"].items())]
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--budget", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--quick", is_flag=True, help="Smoke run: 600 training images, 1 epoch, small sets.")
@click.option("--out", type=click.Path(file_okay=False), default="bench_out/paper_table",
              show_default=True)
@click.option("--train-dataset", default="npz", show_default=True,
              help="Training dataset kind (trainer registry): npz, cifar10, cifar100, folder.")
@click.option("--train-data", default=None, help="Training data path (default: shared CIFAR-10).")
@click.option("--id-test", default=None, help="ID test set (default: shared CIFAR-10 test).")
@click.option("--ood", multiple=True, metavar="NAME=PATH", help="OOD sets (default: shared ones).")
@click.option("--objective", "objectives", multiple=True, type=click.Choice(OBJECTIVES),
              help="Subset of objectives (default: all four).")
@click.option("--epochs", type=int, default=None, help="Override the budget's epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--retrain", is_flag=True, help="Train again even if OUT/<objective> is finished.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="Device for evaluation (training uses the budget's).")
@click.option("-v", "--verbose", is_flag=True)
def main(budget, quick, out, train_dataset, train_data, id_test, ood, objectives, epochs, seed,
         retrain, device, verbose) -> None:
    """Train the four objectives and write the comparison tables."""
    setup_logging(verbose)
    if BUDGETS["quick" if quick else budget][1].get("device") == "cpu":
        import torch
        torch.set_num_threads(2)
    result = run_cli(run_paper_table, "quick" if quick else budget, out, train_dataset, train_data,
                     id_test, tuple(ood) or DEFAULT_OOD, tuple(objectives) or OBJECTIVES, seed,
                     epochs, retrain, device)
    click.echo(_markdown(result))


if __name__ == "__main__":
    main()
