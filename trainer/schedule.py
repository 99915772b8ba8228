"""Learning-rate schedules: the rate at each optimizer step, by name.

Use `lr_lambda(step, schedule=name, ...)` as the multiplier of torch's `LambdaLR` (trainer/train.py)
and `list_schedules()` for the valid names. Two schedules (`TrainConfig.lr_schedule`):

- ``cosine`` (the default): per step, a linear warm-up from `warmup_from` to the peak `lr` over
  `warmup_epochs`, then a cosine from `lr` down to `lr * min_lr_ratio` over the remaining steps.
- ``released``: the authors' released trainer (``reweightood_trainer.py``, inherited from CIDER),
  which the `official` and `paper` presets use. With 0-based epoch e of E, step b = 1..T within the
  epoch, eta_min = lr * min_lr_ratio and W = warmup_epochs:

      lr(e) = eta_min + (lr - eta_min) * (1 + cos(pi * e / E)) / 2        held for the whole epoch
      e <= W: lr = warmup_from + p * (lr(W) - warmup_from),  p = (b + (e - 1) * T) / (W * T)

  so the warm-up reaches lr(W) (not the peak lr) at the last step of epoch W, and the cosine runs
  over all E epochs. At e = 0 the formula gives p <= 0 (the released code passes a 0-based epoch
  to a warm-up written for a 1-based one): a rate below `warmup_from`, negative for most of the
  epoch. We hold `warmup_from` for epoch 0 instead.

Pure Python (no torch), so the configuration can check names without importing torch.
Tests: tests/trainer/test_presets.py.
"""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["lr_lambda", "learning_rate", "list_schedules"]

Schedule = Callable[..., float]
_SCHEDULES: dict[str, Schedule] = {}


def _register(fn: Schedule) -> Schedule:
    _SCHEDULES[fn.__name__] = fn
    return fn


def list_schedules() -> list[str]:
    return sorted(_SCHEDULES)


@_register
def cosine(step: int, *, steps_per_epoch: int, epochs: int, warmup_epochs: int, lr: float,
           warmup_from: float, min_lr_ratio: float) -> float:
    """Per-step linear warm-up to `lr`, then a per-step cosine to `lr * min_lr_ratio`."""
    warm = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if step < warm:
        return warmup_from + (lr - warmup_from) * step / warm
    t = (step - warm) / max(1, total - warm)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@_register
def released(step: int, *, steps_per_epoch: int, epochs: int, warmup_epochs: int, lr: float,
             warmup_from: float, min_lr_ratio: float) -> float:
    """The authors' released schedule (see the module docstring for the formulas)."""
    epoch, b = divmod(step, steps_per_epoch)
    b += 1                                                   # the released code counts from 1
    eta_min = lr * min_lr_ratio

    def at(e: int) -> float:
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * e / epochs)) / 2

    if warmup_epochs and epoch <= warmup_epochs:
        if epoch == 0:  # released: p = (b - T) / (W T) <= 0, a rate below warmup_from; hold it
            return warmup_from
        p = (b + (epoch - 1) * steps_per_epoch) / (warmup_epochs * steps_per_epoch)
        return warmup_from + p * (at(warmup_epochs) - warmup_from)
    return at(epoch)


def learning_rate(step: int, *, schedule: str = "cosine", steps_per_epoch: int, epochs: int,
                  warmup_epochs: int, lr: float, warmup_from: float, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based, counted over the whole run).

    Raises ValueError for an unknown schedule name, a negative step or fewer than one step per
    epoch.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(list_schedules())}")
    if step < 0 or steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"need step >= 0, steps_per_epoch >= 1 and epochs >= 1, got {step}, "
                         f"{steps_per_epoch}, {epochs}")
    return _SCHEDULES[schedule](step, steps_per_epoch=steps_per_epoch, epochs=epochs,
                                warmup_epochs=warmup_epochs, lr=lr, warmup_from=warmup_from,
                                min_lr_ratio=min_lr_ratio)


def lr_lambda(step: int, *, lr: float, **kwargs) -> float:
    """`learning_rate(...) / lr`: the multiplier torch's LambdaLR applies to the peak rate `lr`."""
    return learning_rate(step, lr=lr, **kwargs) / lr
