"""The training step's hot path (trainer/train.py `train_step`, trainer/augment.py) never waits for
the device, checked on the CPU by the ops a step dispatches.

On a GPU the host stays ahead of the device only while nothing in a step needs a value back. Those
points show up as ATen ops even on the CPU: `_local_scalar_dense` (`.item()`, `bool(t)`,
`float(t)`), `lift_fresh` (a tensor made from Python numbers, a host-to-device copy on CUDA),
`_linalg_check_errors` (linalg's check of its result on the host), and ops whose output size
depends on values (`nonzero`, boolean masks, `unique`). The test counts them over whole training
runs that differ only in their number of steps: the counts must not grow with the steps, except by
one `.item()` per logged step.
"""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.config import resolve_config
from trainer.train import build_optimizer, train

SYNC_OPS = ("aten._local_scalar_dense", "aten.lift_fresh", "aten._linalg_check_errors",
            "aten.linalg_inv_ex", "aten.nonzero", "aten.masked_select", "aten._unique2",
            "aten.unique_consecutive", "aten.unique_dim")


class _OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active (forward, backward and optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def data_256(tmp_path_factory, digits_small) -> str:
    """256 real training digits, round-robin by class (243 train after the calibration split)."""
    path = tmp_path_factory.mktemp("speed_data") / "digits_256.npz"
    np.savez(path, images=digits_small["images"][:256], labels=digits_small["labels"][:256],
             classes=digits_small["classes"])
    return str(path)


def _syncs(data: str, out, batch_size: int, log_every: int, loss: str) -> tuple[dict, int]:
    """Sync-op counts over one 1-epoch CPU run, and the number of metrics lines it wrote."""
    counter = _OpCounter()
    with counter:
        run = train(resolve_config(overrides=dict(
            dataset="npz", data=data, arch="small_cnn", epochs=1, batch_size=batch_size, lr=0.05,
            out=str(out), device="cpu", seed=0, loss=loss, log_every=log_every)))
    logged = len((run / "metrics.jsonl").read_text().splitlines())
    return {op: counter.counts[op] for op in SYNC_OPS}, logged


@pytest.mark.parametrize("loss", ["reweightood", "supcon"])
def test_a_training_step_has_no_host_sync(tmp_path, data_256, loss, one_thread):
    few, logged_few = _syncs(data_256, tmp_path / "few", 64, 1000, loss)      # 3 steps
    many, logged_many = _syncs(data_256, tmp_path / "many", 32, 1000, loss)   # 7 steps
    assert logged_few == logged_many == 1        # only the epoch's last step is logged
    assert many == few, f"sync ops grow with the steps: {few} -> {many}"
    # control: the counter sees the one .item() of every logged step
    logged, n_logged = _syncs(data_256, tmp_path / "logged", 32, 1, loss)       # 7 logged steps
    assert n_logged == 7
    extra = {op: logged[op] - many[op] for op in SYNC_OPS if logged[op] != many[op]}
    assert extra == {"aten._local_scalar_dense": 6}, extra


def test_the_optimizer_is_fused_on_cuda_only():
    params = [torch.nn.Parameter(torch.zeros(3))]
    cpu = build_optimizer(params, lr=0.1, momentum=0.9, weight_decay=1e-4,
                          device=torch.device("cpu"))
    cuda = build_optimizer(params, lr=0.1, momentum=0.9, weight_decay=1e-4,
                           device=torch.device("cuda"))
    for opt in (cpu, cuda):
        g = opt.param_groups[0]
        assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.1, 0.9, 1e-4, True)
    assert not cpu.param_groups[0]["fused"]
    assert cuda.param_groups[0]["fused"] is True


@pytest.mark.slow
def test_compiled_training_follows_eager(tmp_path, data_256, monkeypatch):
    """--compile trains the same network: the per-step losses of a compiled run (inductor on the
    CPU; a minute or two of compiling) match eager ones. Needs a C++ compiler."""
    # inductor imports setuptools, whose distutils override asserts (and fails the compile) when
    # the stdlib distutils is found instead, as after the whole slow suite on Python 3.11; the
    # compile needs no distutils of setuptools' own
    monkeypatch.setenv("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    losses = {}
    for compile_ in (False, True):
        run = train(resolve_config(overrides=dict(
            dataset="npz", data=data_256, arch="small_cnn", epochs=1, batch_size=64, lr=0.05,
            out=str(tmp_path / f"compile_{compile_}"), device="cpu", seed=0, log_every=1,
            compile=compile_)))
        losses[compile_] = [json.loads(x)["loss"]
                            for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
