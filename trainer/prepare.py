"""What `train` decides before its first step, each decision checked against the data and logged.

Use `check_settings(cfg)` before anything is loaded (settings that can never give a useful model),
then `prepare_data(cfg, world_size)` for the training images: input size (data.load_dataset's
rule), class selection (`--classes`, by name or index), the calibration split (sized for
rwood-export's MIN_CALIBRATION where the data allows), the batch size against the data, and the
normalisation statistics (`--normalize`). Every refusal is an InputError naming the setting and a
value that would work. Numpy only (no torch). Test: tests/trainer/test_first_hour.py.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from detector_server.calibration import MIN_CALIBRATION
from detector_server.errors import InputError
from detector_server.preprocess import PreprocessSpec

from .config import TrainConfig
from .data import (
    IMAGENET_STATS,
    ImageArrays,
    calibration_split,
    dataset_stats,
    describe_classes,
    load_dataset,
    parse_classes,
    select_classes,
)

__all__ = ["TrainingData", "check_settings", "prepare_data", "normalization"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """The training set as `train` uses it."""

    full: ImageArrays          # every image kept (training + calibration), at model input
    train_idx: np.ndarray      # int64 rows of `full` trained on and banked
    cal_idx: np.ndarray        # int64 rows held out for the threshold (calibration.npz)
    spec: PreprocessSpec       # input size and the mean/std the model normalises with


def check_settings(cfg: TrainConfig) -> None:
    """Refuse settings that cannot give a useful model, before any data is read."""
    if cfg.freeze_early and cfg.pretrained is None:
        raise InputError("freeze_early (set by --preset imagenet100-finetune) trains only the "
                         "last stage, so without weights the frozen stages would stay random: "
                         "pass --pretrained FILE (a state dict saved beforehand, e.g. torchvision's "
                         "resnet50-11ad3fa6.pth), or --no-freeze-early to train every stage",
                         field="pretrained")


def prepare_data(cfg: TrainConfig, world_size: int = 1) -> TrainingData:
    """Load the training set and make the decisions listed in the module doc (each logged).

    Raises InputError (bad --classes, a batch that does not fit the data or the processes) and
    DataError (unreadable data, implausible labels), each naming the flag or file.
    """
    full = load_dataset(cfg.dataset, cfg.data, "train", cfg.image_size, cfg.download,
                        cfg.max_classes)
    if cfg.classes:
        keep = parse_classes(cfg.classes, full.class_names)
        left = [n for i, n in enumerate(full.class_names) if i not in set(keep)]
        full = select_classes(full, keep)
        log.info("--classes %s: training on %d of %d classes, relabelled: %s; left out (usable as "
                 "near-OOD): %s", cfg.classes, len(keep), len(keep) + len(left),
                 describe_classes(full.class_names), ", ".join(left) or "none")
    else:
        log.info("classes (%d, index = sorted order): %s", len(full.class_names),
                 describe_classes(full.class_names))
    empty = [n for i, n in enumerate(full.class_names) if not np.any(full.labels == i)]
    if empty:
        log.warning("classes without images: %s", ", ".join(empty))
    train_idx, cal_idx = calibration_split(full.labels, cfg.calibration_fraction, cfg.seed,
                                           minimum=MIN_CALIBRATION)
    _report_calibration(len(full.labels), len(cal_idx), cfg.calibration_fraction, full.labels)
    _check_batch_size(cfg.batch_size, len(train_idx), len(cal_idx), world_size)
    mean, std = normalization(cfg.normalize, cfg.pretrained, full.images[train_idx])
    spec = PreprocessSpec(size=int(full.images.shape[1]), mean=mean, std=std)
    return TrainingData(full, train_idx, cal_idx, spec)


def _report_calibration(n: int, n_cal: int, fraction: float, labels: np.ndarray) -> None:
    """Log the calibration split; warn when rwood-export will refuse it and say what helps."""
    if fraction == 0:
        log.info("no calibration split (calibration fraction 0): every image is trained on and "
                 "banked; rwood-export will need --calibration PATH (held-out ID images)")
        return
    plain = sum(max(int(round(fraction * c)), 1) if c >= 2 else 0
                for c in np.unique(labels, return_counts=True)[1])
    if n_cal < MIN_CALIBRATION:
        log.warning("the calibration split holds %d images, fewer than the %d rwood-export needs "
                    "to place a threshold, and this data cannot give more (half of every class "
                    "stays for training): export with rwood-export --calibration PATH (at least "
                    "%d held-out in-distribution images not used for training)", n_cal,
                    MIN_CALIBRATION, MIN_CALIBRATION)
    elif n_cal > plain:
        log.info("calibration split: %d held-out images (a fraction of %g gives %d, fewer than the "
                 "%d rwood-export needs, so it was raised to about --calibration-fraction %.2f)",
                 n_cal, fraction, plain, MIN_CALIBRATION, math.ceil(100 * n_cal / n) / 100)
    else:
        log.info("calibration split: %d held-out images (%.1f%%), neither trained on nor banked",
                 n_cal, 100.0 * n_cal / n)


def _check_batch_size(batch_size: int, n_train: int, n_cal: int, world_size: int) -> None:
    """InputError naming --batch-size, with a value that works, when the batch cannot be formed."""
    if batch_size > n_train:
        fits = max(world_size, n_train - n_train % world_size)
        raise InputError(f"batch size {batch_size} is larger than the {n_train} training images "
                         f"(after holding out {n_cal} for calibration): use {fits} or less "
                         f"(a few steps per epoch train better, e.g. {max(1, fits // 4)})",
                         field="batch_size")
    if batch_size % world_size:
        fits = batch_size - batch_size % world_size or world_size
        raise InputError(f"batch size {batch_size} must divide by the {world_size} processes: "
                         f"use {fits}", field="batch_size")


def normalization(normalize: str | None, pretrained: str | None,
                  images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) in [0, 1] units, RGB, that the model normalises its input with (logged).

    normalize: "imagenet" (the statistics torchvision's pretrained weights were trained with),
    "data" (those of `images`, uint8 [N, S, S, 3]), or None: imagenet with `pretrained` weights,
    else data.
    """
    mode = normalize or ("imagenet" if pretrained else "data")
    if mode == "imagenet":
        why = "--normalize imagenet" if normalize else "the pretrained weights expect them"
        log.info("normalising with ImageNet's mean/std (%s; --normalize data uses the training "
                 "set's)", why)
        return IMAGENET_STATS
    mean, std = dataset_stats(images)
    log.info("normalising with the training set's mean %s and std %s%s",
             [round(v, 3) for v in mean], [round(v, 3) for v in std],
             " (--normalize data)" if normalize else "")
    return mean, std
