"""`rwood-train`: the command-line front of trainer.train (parse options, call train, report errors).

Multi-GPU: `torchrun --standalone --nproc_per_node=N -m trainer.cli [options]`.
"""
from __future__ import annotations

import click

from detector_server.cli_common import Command, run_cli, setup_logging

from .config import PRESETS, resolve_config
from .data import list_datasets


def _model_names() -> list[str]:
    from .networks import list_models
    return list_models()


def _loss_names() -> list[str]:
    from .losses import list_losses
    return list_losses()


@click.command(cls=Command)
@click.option("--dataset", type=click.Choice(list_datasets()), default=None,
              help="Training set. 'digits' (default) is scikit-learn's bundled handwritten digits, "
                   "works offline; cifar10/cifar100 read a torchvision root; npz/folder read --data.")
@click.option("--data", "data", type=str, default=None,
              help="Path: CIFAR root folder, .npz file (images uint8 N,H,W[,C] + labels) or an "
                   "ImageFolder root (ROOT/<class>/<images>).")
@click.option("--download", is_flag=True, default=None,
              help="Allow torchvision to download CIFAR into --data (needs internet).")
@click.option("--classes", default=None,
              help="Train on these class indices only, e.g. '0-5' (the rest can serve as near-OOD).")
@click.option("--image-size", type=int, default=None, help="Model input side (default: native).")
@click.option("--arch", type=click.Choice(_model_names()), default=None,
              help="Network (default small_cnn; the official preset uses resnet18_cifar).")
@click.option("--loss", type=click.Choice(_loss_names()), default=None,
              help="Objective: reweightood (default), unweighted (the paper's baseline), supcon, ce.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Named recipe: official (authors' code), paper (paper text), "
                   "imagenet100-finetune, demo. Flags override it.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="JSON or TOML file of settings (TrainConfig field names); flags override it.")
@click.option("--epochs", type=int, default=None, help="Training epochs.")
@click.option("--batch-size", type=int, default=None, help="Global batch size (images, not views).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (SGD nesterov).")
@click.option("--weight-decay", type=float, default=None)
@click.option("--warmup-epochs", type=int, default=None,
              help="Linear warm-up epochs (default: 10 when batch > 256, else 0).")
@click.option("--temperature", type=float, default=None, help="Loss temperature tau (0.1).")
@click.option("--m-b", type=float, default=None, help="Negative-weight slope (5).")
@click.option("--c-b", type=float, default=None, help="Negative-weight offset (-4; -2 for CIFAR-100).")
@click.option("--m-w", type=float, default=None, help="Positive-weight slope (2).")
@click.option("--c-w", type=float, default=None, help="Positive-weight offset (-1, authors' code).")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local encoder weights file (never downloaded).")
@click.option("--freeze-early", is_flag=True, default=None, help="Train only the last stage + head.")
@click.option("--sync-bn", is_flag=True, default=None, help="SyncBatchNorm under torchrun.")
@click.option("--calibration-fraction", type=float, default=None,
              help="Held-out share of the training set for the threshold (0.05).")
@click.option("--k", type=int, default=None, help="KNN neighbours for evaluation (100 / 300).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default runs/default). One that already holds a run is "
                   "refused unless --resume or --force.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="auto uses CUDA when present, else CPU.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--force", is_flag=True,
              help="Replace the run in --out: delete its checkpoints, model, bank, metrics and "
                   "eval report, then train from scratch.")
@click.option("--seed", type=int, default=None)
@click.option("--deterministic", is_flag=True, default=None,
              help="Deterministic kernels: exact resume on CPU, slower on GPU.")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the network.")
@click.option("--no-amp", is_flag=True, help="Disable bf16 autocast on CUDA.")
@click.option("--checkpoint-every", type=int, default=None, help="Epochs between checkpoints (1).")
@click.option("--tensorboard", is_flag=True, default=None, help="Also write TensorBoard events.")
@click.option("--ood", multiple=True, metavar="NAME=PATH",
              help="OOD set to evaluate on at the end (repeatable): .npz, image folder, or a "
                   "torchvision root for svhn/mnist/dtd/places365.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def train_main(config_file, resume, force, ood, verbose, no_amp, compile_, **flags) -> None:
    """Train a network with the ReweightOOD loss (or a baseline), then build the embedding bank.

    The run directory receives checkpoints/last.pt (resumable), model.pt, bank.npz,
    calibration.npz, config.json and metrics.jsonl. Example:

    \b
        rwood-train --dataset cifar10 --data ~/data/cifar --preset official --out runs/c10
    """
    setup_logging(verbose)
    preset = flags.pop("preset")
    flags["compile"] = compile_
    flags["amp"] = False if no_amp else None
    def go():
        from .ood_sets import parse_set_arg
        from .train import train
        ood_sets = dict(parse_set_arg(v) for v in ood)
        cfg = resolve_config(preset, config_file, flags)
        return train(cfg, resume=resume, force=force, ood=ood_sets or None)

    run_dir = run_cli(go)
    click.echo(f"run directory: {run_dir}")


if __name__ == "__main__":
    train_main()
