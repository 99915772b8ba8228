"""Training configuration: one frozen dataclass, named presets, and a JSON/TOML config-file loader.

Precedence (lowest to highest): `TrainConfig` defaults < the preset < the config file < CLI flags.
A preset or config file is a plain mapping of `TrainConfig` field names to values; unknown names
and values of the wrong type are refused with the key named (no `eval`, no multi-file merging).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from detector_server.errors import InputError
from detector_server.validate import check_number

from .schedule import list_schedules

__all__ = ["TrainConfig", "PRESETS", "resolve_config", "load_config_file", "loss_kwargs",
           "default_c_b", "changed_settings", "NORMALIZATIONS"]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run. Recorded verbatim in RUN_DIR/config.json."""

    # --- data
    dataset: str = "digits"            # digits (offline default) | cifar10 | cifar100 | folder | npz
    data: str | None = None            # npz file, image folder, or torchvision root (CIFAR)
    download: bool = False             # let torchvision download CIFAR into `data` (never implicit)
    classes: str | None = None         # keep only these classes: indices ("0-5", "0,2,4") or names
    image_size: int | None = None      # model input side; None = data.choose_image_size's rule
    max_classes: int = 1000            # labels of an npz without a `classes` array must be below this
    calibration_fraction: float = 0.05  # held-out split for the threshold: not trained on, not banked
                                       # (0: train on and bank every image; export needs --calibration)
    # --- network
    arch: str = "small_cnn"            # see trainer.networks.list_models()
    head_dim: int = 128                # projection dimension
    pretrained: str | None = None      # local weights file for the encoder (never downloaded)
    freeze_early: bool = False         # freeze all but the last stage (ImageNet-100 fine-tuning)
    normalize: str | None = None       # imagenet | data: mean/std the model normalises with;
                                       # None = imagenet with pretrained weights, else data
    sync_bn: bool = True               # SyncBatchNorm under DDP on GPUs: batch statistics over the
                                       # global batch, as one GPU would compute them
    # --- objective
    loss: str = "reweightood"          # see trainer.losses.list_losses()
    temperature: float = 0.1
    m_b: float = 5.0                   # negative weights: sigmoid(m_b * s + c_b)
    c_b: float | None = None           # None = default_c_b(dataset), filled in on construction
    m_w: float = 2.0                   # positive weights: sigmoid(-(m_w * s + c_w))
    c_w: float = -1.0                  # authors' code; the paper prints +1 (see losses.py)
    # --- optimisation (SGD nesterov; schedules in trainer/schedule.py)
    epochs: int = 10
    batch_size: int = 256              # global batch (split across DDP ranks)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"        # cosine (per step) | released (the authors' trainer)
    warmup_epochs: int | None = None   # None = 10 when batch > 256 else 0 (authors' rule)
    warmup_from: float = 1e-3          # learning rate at the first warm-up step
    min_lr_ratio: float = 1e-3         # cosine ends at lr * min_lr_ratio
    crop_scale_min: float = 0.2        # RandomResizedCrop lower scale (0.4 for ImageNet-size inputs)
    # --- runtime
    out: str = "runs/default"          # run directory
    device: str = "auto"               # auto | cpu | cuda
    seed: int = 0
    deterministic: bool = False        # deterministic kernels (slower; exact resume on CPU)
    compile: bool = False              # torch.compile the network
    amp: bool = True                   # bf16 autocast and TF32 matmuls on CUDA (ignored on CPU);
                                       # False = fp32 as the released trainer
    channels_last: bool = True         # channels_last memory format (faster on CUDA and on CPU)
    checkpoint_every: int = 1          # epochs between resumable checkpoints
    log_every: int = 10                # steps between metrics.jsonl lines
    tensorboard: bool = False          # also write TensorBoard events (needs tensorboard installed)
    eval_batch_size: int = 512         # batch for the embedding bank and evaluation
    k: int | None = None               # KNN neighbours; None = 300 if > 10 classes else 100

    def __post_init__(self) -> None:
        if self.c_b is None:  # every TrainConfig is complete: the loss never sees None
            object.__setattr__(self, "c_b", default_c_b(self.dataset))
        positive = ("epochs", "batch_size", "head_dim", "checkpoint_every", "log_every",
                    "eval_batch_size", "max_classes")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)!r}", field=name)
        # every number must be finite: lr 1e999 (inf) would train on NaN losses
        for name in ("lr", "temperature", "warmup_from"):
            check_number(getattr(self, name), name, above=0)
        for name in ("m_b", "c_b", "m_w", "c_w"):
            check_number(getattr(self, name), name)
        check_number(self.momentum, "momentum", minimum=0, maximum=1)
        check_number(self.weight_decay, "weight_decay", minimum=0)
        check_number(self.min_lr_ratio, "min_lr_ratio", minimum=0, maximum=1)
        check_number(self.crop_scale_min, "crop_scale_min", above=0, maximum=1)
        if check_number(self.calibration_fraction, "calibration_fraction", minimum=0) >= 0.5:
            raise InputError(f"must be in [0, 0.5), got {self.calibration_fraction}",
                             field="calibration_fraction")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"expected auto, cpu or cuda, got {self.device!r}", field="device")
        if self.lr_schedule not in list_schedules():
            raise InputError(f"expected one of {', '.join(list_schedules())}, got "
                             f"{self.lr_schedule!r}", field="lr_schedule")
        if self.normalize not in (None, *NORMALIZATIONS):
            raise InputError(f"expected one of {', '.join(NORMALIZATIONS)}, got "
                             f"{self.normalize!r}", field="normalize")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


NORMALIZATIONS = ("imagenet", "data")   # see TrainConfig.normalize


# Presets. Values not named keep the TrainConfig defaults. Every value of `official` and `paper`,
# and where it comes from, is in docs/presets.md; change that table with them.
PRESETS: dict[str, dict[str, Any]] = {
    # The authors' released recipe, the one that produced the published numbers: their config
    # (train_reweightood.yml), their CIFAR scripts (batch 512, 100 epochs) and their trainer.
    # One negative-weight offset for every dataset: the CIFAR-100 script does not override it.
    "official": dict(arch="resnet18_cifar", head_dim=128, loss="reweightood", temperature=0.1,
                     m_b=5.0, c_b=-4.0, m_w=2.0, c_w=-1.0, lr=0.1, batch_size=512, epochs=100,
                     momentum=0.9, weight_decay=1e-4, lr_schedule="released", warmup_epochs=10,
                     warmup_from=1e-3, min_lr_ratio=1e-3, crop_scale_min=0.2, amp=False,
                     sync_bn=True, calibration_fraction=0.0),
    # The paper's text; where it is silent, the released recipe (schedule, warm-up). c_b is left
    # to the per-dataset rule (default_c_b): -4 for CIFAR-10, -2 for CIFAR-100.
    "paper": dict(arch="resnet18_cifar", head_dim=128, loss="reweightood", temperature=0.1,
                  m_b=5.0, m_w=2.0, c_w=-1.0, lr=0.5, batch_size=512, epochs=500, momentum=0.9,
                  weight_decay=1e-4, lr_schedule="released", warmup_epochs=10, warmup_from=1e-3,
                  min_lr_ratio=1e-3, crop_scale_min=0.2, sync_bn=True, calibration_fraction=0.0),
    # ImageNet-100 fine-tuning: pretrained ResNet-50, only the last stage and the head train.
    "imagenet100-finetune": dict(arch="resnet50", freeze_early=True, lr=0.01, epochs=10,
                                 batch_size=256, warmup_epochs=0, crop_scale_min=0.4, image_size=224),
    # Minutes on a laptop CPU: the small network on the offline default.
    "demo": dict(arch="small_cnn", lr=0.1, batch_size=128, epochs=15, warmup_epochs=1),
}


def default_c_b(dataset: str) -> float:
    """c_b when none is set: the paper's -2 for CIFAR-100, -4 for CIFAR-10, ImageNet-100 and
    anything else. The one place this rule lives (TrainConfig applies it on construction; a preset,
    config file or flag that names c_b overrides it: `official` sets -4 for every dataset)."""
    return -2.0 if dataset == "cifar100" else -4.0


def changed_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings of `cfg` that differ from their defaults: what a user (preset, config file or
    flag) changed. Defaults that follow other settings (c_b follows the dataset) are compared with
    the value they take for `cfg`'s own dataset, so a derived default never counts as a change."""
    default = {**TrainConfig(dataset=cfg.dataset).to_dict(), "dataset": TrainConfig.dataset}
    return {k: v for k, v in cfg.to_dict().items() if v != default[k]}


_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _field_types(f: dataclasses.Field) -> tuple[type, ...]:
    """The accepted types of a TrainConfig field, from its annotation ("int | None" -> int, None)."""
    return tuple(_TYPE_NAMES[t.strip()] for t in str(f.type).split("|"))


def _check_keys(values: Mapping[str, Any], origin: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in known:
            raise InputError(f"unknown setting; valid ones: {', '.join(sorted(known))}",
                             path=origin, field=key)
        types = _field_types(known[key])
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise InputError(f"expected {expected}, got {value!r}", path=origin, field=key)
        out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML file of TrainConfig settings; returns the checked mapping.

    A run's RUN_DIR/config.json is accepted too: its recorded settings (all but `out`) are used,
    so `rwood-train --config runs/a/config.json --out runs/b` repeats run a.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", path=str(path))
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(path.read_text())
        else:
            values = json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"cannot parse: {e}", path=str(path)) from None
    if not isinstance(values, dict):
        raise InputError("expected a mapping of setting names to values", path=str(path))
    if values.get("format") == "reweightood-run":  # a run's config.json: reproduce that run
        values = dict(values.get("config") or {})
        values.pop("out", None)
    return _check_keys(values, str(path))


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Build the TrainConfig: defaults < preset < config file < overrides (None values ignored)."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}            # setting -> where its value came from, for errors
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}", field="preset")
        values.update(PRESETS[preset])
        origin.update(dict.fromkeys(PRESETS[preset], f"preset {preset}"))
    if config_file is not None:
        from_file = load_config_file(config_file)
        values.update(from_file)
        origin.update(dict.fromkeys(from_file, str(config_file)))
    given = _check_keys({k: v for k, v in (overrides or {}).items() if v is not None},
                        "command line")
    values.update(given)
    for key in given:
        origin.pop(key, None)
    try:
        cfg = TrainConfig(**values)
        _check_names(cfg)
        return cfg
    except InputError as e:  # a bad value from a file or preset: name where it came from
        if e.path is None and e.field in origin:
            raise InputError(e.message, path=origin[e.field], field=e.field) from None
        raise


def _check_names(cfg: TrainConfig) -> None:
    """InputError naming `arch` / `loss` when they are not registered (the registries import
    torch, so TrainConfig itself does not check them)."""
    from .losses import list_losses
    from .networks import list_models

    for field, value, valid in (("arch", cfg.arch, list_models()), ("loss", cfg.loss, list_losses())):
        if value not in valid:
            raise InputError(f"unknown {field} {value!r}; valid names: {', '.join(valid)}",
                             field=field)


def loss_kwargs(cfg: TrainConfig) -> dict[str, float]:
    """The hyperparameters a loss factory may take (create_loss keeps the ones it accepts)."""
    return dict(temperature=cfg.temperature, m_b=cfg.m_b, c_b=cfg.c_b, m_w=cfg.m_w, c_w=cfg.c_w)
