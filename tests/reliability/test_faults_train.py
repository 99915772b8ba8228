"""rwood-train killed by SIGKILL mid-epoch, then --resume: the same weights as an uninterrupted run.

Deterministic CPU mode, one thread per process. The reference run and the run to be killed start
together (two cores); the second is killed as soon as its epoch-1 checkpoint appears, i.e. inside
epoch 2, with no chance to save anything (SIGKILL, unlike SIGTERM, cannot be caught).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_corpus import PYTHON, subprocess_env

pytestmark = pytest.mark.timeout(600)


def _train_cmd(data: Path, out: Path) -> list[str]:
    return [PYTHON, "-m", "trainer.cli", "--dataset", "npz", "--data", str(data),
            "--arch", "small_cnn", "--epochs", "2", "--batch-size", "64", "--deterministic",
            "--checkpoint-every", "1", "--device", "cpu", "--k", "5", "--out", str(out)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["model"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    t_end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited early ({proc.returncode})"
        assert time.monotonic() < t_end, f"{path} did not appear in {timeout} s"
        time.sleep(0.005)


def test_sigkill_mid_epoch_then_resume_matches(tmp_path, digits_small):
    d = digits_small
    data = tmp_path / "digits_300.npz"
    np.savez(data, images=d["images"][:300], labels=d["labels"][:300], classes=d["classes"])
    env = subprocess_env()
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    log = open(tmp_path / "train.log", "wb")
    reference = subprocess.Popen(_train_cmd(data, ref_dir), env=env, cwd=tmp_path,
                                 stdout=log, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(_train_cmd(data, run_dir), env=env, cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        ckpt = run_dir / "checkpoints" / "last.pt"
        _wait_for(ckpt, victim, timeout=400)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    # killed inside epoch 2: the only checkpoint is epoch 1's and there is no final model
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert not (run_dir / "model.pt").exists()
    assert not list((run_dir / "checkpoints").glob(".*")), "a torn temporary checkpoint remains"

    resumed = subprocess.run([PYTHON, "-m", "trainer.cli", "--resume", "--out", str(run_dir),
                              "--device", "cpu"], env=env, cwd=tmp_path, capture_output=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert reference.wait(400) == 0, (tmp_path / "train.log").read_text()[-3000:]
    log.close()

    ref, got = _weights(ref_dir), _weights(run_dir)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), f"{name} differs after kill + resume"
    ref_bank, got_bank = np.load(ref_dir / "bank.npz"), np.load(run_dir / "bank.npz")
    np.testing.assert_array_equal(ref_bank["penultimate"], got_bank["penultimate"])
