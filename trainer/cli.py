"""`rwood-train`: the command-line front of trainer.train (parse options, call train, report errors).

Multi-GPU: `torchrun --standalone --nproc_per_node=N -m trainer.cli [options]`.
"""
from __future__ import annotations

import click

from detector_server.cli_common import Command, run_cli, setup_logging

from .config import NORMALIZATIONS, PRESETS, resolve_config
from .data import MAX_CLASSES, PHOTO_SIZE, list_datasets
from .ood_sets import OOD_HELP
from .run_dir import K_HELP
from .schedule import list_schedules


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
              help="Train on these classes only: names (folder names, an npz's 'classes') or "
                   "indices and ranges, comma-separated, e.g. 'cat,dog' or '0-5'. Index = position "
                   "in sorted folder-name order (torchvision's ImageFolder rule) or the npz label. "
                   "The classes kept and left out are logged; the rest can serve as near-OOD.")
@click.option("--image-size", type=int, default=None,
              help="Model input side in pixels. Default: the native size (digits, CIFAR: 32; an "
                   f"npz: its images' shorter side); for a folder the shorter side of its "
                   f"smallest image, at most {PHOTO_SIZE}; at least 32. The choice is logged.")
@click.option("--max-classes", type=int, default=None,
              help=f"Largest number of classes an npz without a 'classes' array may have "
                   f"(default {MAX_CLASSES}; its labels must be 0..C-1, every class present).")
@click.option("--arch", type=click.Choice(_model_names()), default=None,
              help="Network (default small_cnn; the official preset uses resnet18_cifar).")
@click.option("--loss", type=click.Choice(_loss_names()), default=None,
              help="Objective: reweightood (default), unweighted (the paper's baseline), supcon, ce.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Named recipe; flags and --config override it (docs/presets.md lists every "
                   "value and its source). official: the authors' released recipe (ResNet-18, lr "
                   "0.1, batch 512, 100 epochs, their schedule, fp32, c_b -4 for every dataset, all "
                   "training images). paper: the paper's text (lr 0.5, 500 epochs, c_b -4 CIFAR-10 / "
                   "-2 CIFAR-100), the released schedule where the text is silent. "
                   "imagenet100-finetune: pretrained ResNet-50, last stage only. demo: small CPU "
                   "network.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="JSON or TOML file of settings (TrainConfig field names); flags override it.")
@click.option("--epochs", type=int, default=None, help="Training epochs.")
@click.option("--batch-size", type=int, default=None, help="Global batch size (images, not views).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (SGD nesterov).")
@click.option("--weight-decay", type=float, default=None)
@click.option("--lr-schedule", type=click.Choice(list_schedules()), default=None,
              help="cosine (default): per-step warm-up to --lr, then cosine over the rest. "
                   "released (official, paper): the authors' trainer, a per-epoch cosine over all "
                   "epochs with a per-step warm-up to its epoch-10 value.")
@click.option("--warmup-epochs", type=int, default=None,
              help="Warm-up epochs (default: 10 when batch > 256, else 0).")
@click.option("--temperature", type=float, default=None, help="Loss temperature tau (0.1).")
@click.option("--m-b", type=float, default=None, help="Negative-weight slope (5).")
@click.option("--c-b", type=float, default=None,
              help="Negative-weight offset. Default -4, and -2 for CIFAR-100 (the paper; also "
                   "--preset paper); --preset official uses -4 for every dataset.")
@click.option("--m-w", type=float, default=None, help="Positive-weight slope (2).")
@click.option("--c-w", type=float, default=None, help="Positive-weight offset (-1, authors' code).")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local encoder weights file, never downloaded: a PyTorch state dict as "
                   "torch.save(model.state_dict(), PATH) writes it (e.g. torchvision's "
                   "resnet50-11ad3fa6.pth for resnet50); {'state_dict': ...} or {'model': ...} "
                   "wrappers and 'module.' prefixes are accepted. How many tensors were loaded "
                   "and which were left out is logged.")
@click.option("--freeze-early/--no-freeze-early", default=None,
              help="Train only the last stage + head (needs --pretrained; on in "
                   "imagenet100-finetune).")
@click.option("--normalize", type=click.Choice(NORMALIZATIONS), default=None,
              help="Mean/std the model normalises with: imagenet (what torchvision's pretrained "
                   "weights expect; the default with --pretrained) or data (the training set's; "
                   "the default without).")
@click.option("--sync-bn/--no-sync-bn", default=None,
              help="SyncBatchNorm under torchrun on GPUs (on by default): N ranks with global "
                   "batch B normalise like one GPU with batch B.")
@click.option("--calibration-fraction", type=float, default=None,
              help="Held-out share of the training set for the threshold (0.05; 0 under official "
                   "and paper), per class; raised to give the 20 images rwood-export needs where "
                   "the data allows (logged). 0 trains on and banks every image; rwood-export "
                   "then needs --calibration.")
@click.option("--k", type=int, default=None, help=K_HELP)
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
@click.option("--amp/--no-amp", default=None,
              help="bf16 autocast and TF32 matmuls on CUDA (on by default; --preset official runs "
                   "fp32, as the released trainer).")
@click.option("--checkpoint-every", type=int, default=None, help="Epochs between checkpoints (1).")
@click.option("--tensorboard", is_flag=True, default=None, help="Also write TensorBoard events.")
@click.option("--ood", multiple=True, metavar="NAME=PATH", help=OOD_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def train_main(config_file, resume, force, ood, verbose, compile_, **flags) -> None:
    """Train a network with the ReweightOOD loss (or a baseline), then build the embedding bank.

    The run directory receives checkpoints/last.pt (resumable), model.pt, bank.npz,
    bank_hashes.npy, calibration.npz (none with --calibration-fraction 0), config.json and
    metrics.jsonl; with --ood also eval/ (the report, whose detection table is printed). Example:

    \b
        rwood-train --dataset cifar10 --data ~/data/cifar --preset official --out runs/c10
    """
    setup_logging(verbose)
    preset = flags.pop("preset")
    flags["compile"] = compile_
    def go():
        from .ood_sets import parse_set_arg
        from .train import train
        ood_sets = dict(parse_set_arg(v) for v in ood)
        cfg = resolve_config(preset, config_file, flags)
        return train(cfg, resume=resume, force=force, ood=ood_sets or None)

    run_dir = run_cli(go)
    if ood:
        import json

        from .report import detection_summary
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        click.echo(detection_summary(report))
        click.echo(f"\nreport written to {run_dir / 'eval'}")
    click.echo(f"run directory: {run_dir}")


if __name__ == "__main__":
    train_main()
