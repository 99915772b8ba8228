"""The `official` and `paper` presets against the authors' released recipe (docs/presets.md):

- the resolved `official` config for CIFAR-10 and CIFAR-100 (c_b -4 for both, fp32, SyncBatchNorm
  under DDP, the released schedule, every training image), `paper`'s per-dataset c_b, and the
  CLI flags that override them;
- the learning rate the training loop's scheduler gives at steps of epochs 0..99 of a 100-epoch
  `official` CIFAR run, against the released formulas written out here;
- when SyncBatchNorm is applied.
No training here: the schedule is stepped on a one-parameter optimizer.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from detector_server.errors import InputError
from trainer import train as train_module
from trainer.cli import train_main
from trainer.config import PRESETS, TrainConfig, default_c_b, resolve_config
from trainer.schedule import learning_rate, list_schedules
from trainer.train import make_scheduler, sync_batchnorm

# What the released recipe resolves to on CIFAR (docs/presets.md gives each value's source).
OFFICIAL = dict(arch="resnet18_cifar", head_dim=128, loss="reweightood", temperature=0.1, m_b=5.0,
                c_b=-4.0, m_w=2.0, c_w=-1.0, lr=0.1, batch_size=512, epochs=100, momentum=0.9,
                weight_decay=1e-4, lr_schedule="released", warmup_epochs=10, warmup_from=1e-3,
                min_lr_ratio=1e-3, crop_scale_min=0.2, amp=False, sync_bn=True,
                calibration_fraction=0.0, image_size=None, pretrained=None, freeze_early=False)


# ------------------------------------------------------------------------------ resolved configs
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_official_resolves_to_the_released_recipe_for_both_cifars(dataset):
    cfg = resolve_config("official", overrides={"dataset": dataset})
    assert {k: getattr(cfg, k) for k in OFFICIAL} == OFFICIAL
    assert cfg.c_b == -4.0            # the released config has one offset; no CIFAR-100 override


@pytest.mark.parametrize("preset,dataset,c_b", [
    ("paper", "cifar10", -4.0), ("paper", "cifar100", -2.0),      # the paper's per-dataset values
    (None, "cifar10", -4.0), (None, "cifar100", -2.0),
    ("official", "cifar10", -4.0), ("official", "cifar100", -4.0),
])
def test_c_b_per_preset_and_dataset(preset, dataset, c_b):
    assert resolve_config(preset, overrides={"dataset": dataset}).c_b == c_b


def test_default_c_b_is_the_one_per_dataset_rule():
    assert (default_c_b("cifar100"), default_c_b("cifar10"), default_c_b("digits")) == (-2.0, -4.0,
                                                                                      -4.0)
    assert "c_b" in PRESETS["official"] and "c_b" not in PRESETS["paper"]


def test_paper_preset_follows_the_text_and_the_released_schedule():
    cfg = resolve_config("paper", overrides={"dataset": "cifar10"})
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.weight_decay, cfg.temperature) == (
        0.5, 512, 500, 1e-4, 0.1)
    assert (cfg.lr_schedule, cfg.warmup_epochs, cfg.min_lr_ratio) == ("released", 10, 1e-3)
    assert cfg.amp is True and cfg.sync_bn is True and cfg.calibration_fraction == 0.0


def test_no_preset_keeps_the_project_defaults():
    cfg = resolve_config(overrides={"dataset": "cifar10"})
    assert (cfg.lr_schedule, cfg.amp, cfg.sync_bn, cfg.calibration_fraction) == (
        "cosine", True, True, 0.05)


def test_flags_override_the_preset(tmp_path):
    cfg = resolve_config("official", overrides={"dataset": "cifar100", "c_b": -2.0, "amp": True,
                                                "sync_bn": False, "calibration_fraction": 0.05})
    assert (cfg.c_b, cfg.amp, cfg.sync_bn, cfg.calibration_fraction) == (-2.0, True, False, 0.05)


def _cli_config(monkeypatch, args: list[str]) -> TrainConfig:
    """Run rwood-train's option parsing and return the TrainConfig it would train with."""
    seen = {}

    def fake_train(cfg, **kw):
        seen["cfg"] = cfg
        return "run"
    monkeypatch.setattr(train_module, "train", fake_train)
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    return seen["cfg"]


@pytest.mark.parametrize("args,expected", [
    (["--preset", "official", "--dataset", "cifar100"],
     dict(c_b=-4.0, amp=False, sync_bn=True, lr_schedule="released", calibration_fraction=0.0)),
    (["--preset", "paper", "--dataset", "cifar100"], dict(c_b=-2.0, amp=True, sync_bn=True)),
    (["--preset", "official", "--amp", "--no-sync-bn", "--lr-schedule", "cosine"],
     dict(amp=True, sync_bn=False, lr_schedule="cosine")),
    (["--no-amp"], dict(amp=False, sync_bn=True, lr_schedule="cosine")),
    (["--dataset", "cifar100", "--sync-bn"], dict(sync_bn=True, c_b=-2.0)),
])
def test_cli_flags_resolve(monkeypatch, args, expected):
    cfg = _cli_config(monkeypatch, args)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_unknown_schedule_is_refused():
    with pytest.raises(InputError) as e:
        resolve_config(overrides={"lr_schedule": "step"})
    assert e.value.field == "lr_schedule" and "released" in str(e.value)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        learning_rate(0, schedule="step", steps_per_epoch=1, epochs=1, warmup_epochs=0, lr=0.1,
                      warmup_from=1e-3, min_lr_ratio=1e-3)
    assert list_schedules() == ["cosine", "released"]


# ------------------------------------------------------------------------------ the schedule
def _released_formula(e: int, b: int, T: int, E: int, lr: float) -> float:
    """The released trainer (reweightood_trainer.py, adjust_learning_rate + warmup_learning_rate)
    for 0-based epoch e and 1-based step b, written out; epoch 0 held at 1e-3 (see schedule.py)."""
    eta_min = lr * 0.1 ** 3

    def cos_lr(epoch):
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / E)) / 2
    if e == 0:
        return 1e-3
    if e <= 10:
        p = (b + (e - 1) * T) / (10 * T)
        return 1e-3 + p * (cos_lr(10) - 1e-3)
    return cos_lr(e)


def _scheduler_rates(cfg: TrainConfig, steps_per_epoch: int, epochs: set[int]) -> dict:
    """{(epoch, b): lr} as the training loop's optimizer sees it, stepping the real scheduler."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=True)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    rates = {}
    for step in range(cfg.epochs * steps_per_epoch):
        e, b = divmod(step, steps_per_epoch)
        if e in epochs:
            rates[(e, b + 1)] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_official_learning_rate_equals_the_released_formulas(dataset):
    cfg = resolve_config("official", overrides={"dataset": dataset})
    T = 50_000 // cfg.batch_size                      # 97 steps: all 50,000 CIFAR training images
    epochs = {0, 1, 5, 10, 11, 25, 50, 75, 99}
    rates = _scheduler_rates(cfg, T, epochs)
    for e in epochs:
        for b in (1, 2, T // 2, T):
            want = _released_formula(e, b, T, cfg.epochs, cfg.lr)
            assert abs(rates[(e, b)] - want) <= 1e-9, (e, b, rates[(e, b)], want)
    # within an epoch after warm-up the rate is held; the warm-up ends at lr(10), not the peak
    assert len({rates[(50, b)] for b in range(1, T + 1)}) == 1
    assert rates[(10, T)] == pytest.approx(0.097555, abs=1e-6)
    assert rates[(50, 1)] == pytest.approx(0.050050, abs=1e-6)
    assert rates[(0, 1)] == rates[(0, T)] == 1e-3 and min(rates.values()) > 0


def test_paper_learning_rate_uses_the_released_schedule_at_lr_0_5():
    cfg = resolve_config("paper", overrides={"dataset": "cifar10"})
    T = 97
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    rate = make_scheduler(opt, cfg, T).lr_lambdas[0]      # the multiplier LambdaLR applies
    for e in (0, 3, 10, 11, 250, 499):
        for b in (1, T):
            got = cfg.lr * rate(e * T + b - 1)
            assert abs(got - _released_formula(e, b, T, 500, 0.5)) <= 1e-9, (e, b)


def test_released_code_would_have_gone_negative_in_epoch_0():
    """Why epoch 0 is held: the released warm-up at e = 0, b = 1 is below zero."""
    T, lr = 97, 0.1
    eta_min = lr * 1e-3
    lr10 = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * 10 / 100)) / 2
    released_at_0 = 1e-3 + ((1 + (0 - 1) * T) / (10 * T)) * (lr10 - 1e-3)
    assert released_at_0 < 0
    assert learning_rate(0, schedule="released", steps_per_epoch=T, epochs=100, warmup_epochs=10,
                         lr=lr, warmup_from=1e-3, min_lr_ratio=1e-3) == 1e-3


def test_cosine_schedule_differs_from_released_in_mid_training():
    kw = dict(steps_per_epoch=97, epochs=100, warmup_epochs=10, lr=0.1, warmup_from=1e-3,
              min_lr_ratio=1e-3)
    step = 50 * 97
    assert learning_rate(step, schedule="cosine", **kw) == pytest.approx(0.0587, abs=1e-4)
    assert learning_rate(step, schedule="released", **kw) == pytest.approx(0.0500, abs=1e-4)


# ------------------------------------------------------------------------------ SyncBatchNorm
def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))


def _kinds(net: nn.Module) -> set[type]:
    return {type(m) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_sync_batchnorm_converts_under_ddp_on_gpus_only(caplog):
    cuda = torch.device("cuda", 0)       # conversion only: nothing runs on the device
    assert _kinds(sync_batchnorm(_bn_net(), True, 4, cuda)) == {nn.SyncBatchNorm}
    assert _kinds(sync_batchnorm(_bn_net(), False, 4, cuda)) == {nn.BatchNorm2d}   # --no-sync-bn
    assert _kinds(sync_batchnorm(_bn_net(), True, 1, cuda)) == {nn.BatchNorm2d}    # one process
    with caplog.at_level(logging.WARNING, logger="reweightood.train"):
        assert _kinds(sync_batchnorm(_bn_net(), True, 2, torch.device("cpu"))) == {nn.BatchNorm2d}
    assert "SyncBatchNorm needs GPUs" in caplog.text
