"""trainer/train.py end to end on real digit scans (small_cnn, CPU, deterministic mode):

- the run directory holds every file of docs/CONTRACTS.md with the right keys, dtypes and shapes;
- resuming gives the same weights as an uninterrupted run, after a stop at an epoch boundary
  (in process, a real SIGINT raised from inside the loop) and after a Ctrl-C mid-epoch (SIGINT sent
  to a `python -m trainer.cli` subprocess);
- every registered loss trains; a 2-process gloo DDP run writes one run directory.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from detector_server.calibration import MIN_CALIBRATION
from detector_server.errors import CheckpointError, InputError
from detector_server.preprocess import PreprocessSpec
from trainer import train as train_module
from trainer.bank import embed_arrays
from trainer.checkpoint import load_model
from trainer.config import resolve_config
from trainer.data import calibration_split, dataset_stats
from trainer.losses import list_losses
from trainer.train import lr_lambda, train

REPO = Path(__file__).resolve().parents[2]
THREADS = 2
torch.set_num_threads(THREADS)

pytestmark = pytest.mark.timeout(300)        # a hung DDP rendezvous or child fails, not blocks

N_IMAGES, BATCH, EPOCHS = 256, 64, 2          # 236 training images after the 20 held out: 3 steps/epoch
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory, digits_small) -> dict:
    """256 real training digits (round-robin by class) as an npz file, plus the arrays themselves."""
    root = tmp_path_factory.mktemp("train_data")
    arrays = {"images": digits_small["images"][:N_IMAGES],
              "labels": digits_small["labels"][:N_IMAGES], "classes": digits_small["classes"]}
    np.savez(root / "digits_256.npz", **arrays)
    return {"path": root / "digits_256.npz", **arrays}


def _overrides(data: dict, out: Path, **kw) -> dict:
    values = dict(dataset="npz", data=str(data["path"]), arch="small_cnn", batch_size=BATCH,
                  epochs=EPOCHS, lr=0.05, out=str(out), device="cpu", seed=0, deterministic=True,
                  log_every=1)
    values.update(kw)
    return values


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """The uninterrupted 2-epoch run every resume test compares against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return train(resolve_config(overrides=_overrides(data, out)))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def _assert_same_weights(run: Path, reference: Path) -> None:
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


# ------------------------------------------------------------------------------ run dir contract
def test_run_directory_follows_the_contract(reference, data):
    run = reference
    for name in ("config.json", "checkpoints/last.pt", "model.pt", "bank.npz", "calibration.npz",
                 "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert not [p for p in run.rglob(".*") if p.is_file()], "temporary files left behind"

    train_idx, cal_idx = calibration_split(data["labels"], 0.05, seed=0, minimum=MIN_CALIBRATION)
    class_names = [str(c) for c in data["classes"]]

    # config.json
    rec = json.loads((run / "config.json").read_text())
    assert rec["format"] == "reweightood-run" and rec["format_version"] == 1 and rec["finished"]
    cfg = resolve_config(overrides=_overrides(data, run))
    assert rec["config"] == cfg.to_dict()
    assert rec["model_args"] == {"arch": "small_cnn", "num_classes": 10, "head_dim": 128,
                                 "with_classifier": False}
    spec = PreprocessSpec.from_dict(rec["preprocess"])
    mean, std = dataset_stats(data["images"][train_idx])
    assert spec.size == 32 and np.allclose(spec.mean, mean) and np.allclose(spec.std, std)
    assert rec["class_names"] == class_names
    d = rec["data"]
    assert {"dataset", "path", "fingerprint", "n_train", "n_calibration"} <= set(d)
    assert (d["dataset"], d["path"], d["n_train"], d["n_calibration"]) == (
        "npz", str(data["path"]), len(train_idx), len(cal_idx))
    assert len(d["fingerprint"]) == 64
    assert rec["versions"]["torch"] == torch.__version__ and "numpy" in rec["versions"]
    assert rec["git_rev"] is None or len(rec["git_rev"]) == 40
    datetime.fromisoformat(rec["created"])

    # model.pt: plain dict, loads with weights_only
    m = torch.load(run / "model.pt", weights_only=True)
    assert set(m) >= {"format_version", "model", "model_args", "preprocess", "class_names"}
    assert m["model_args"] == rec["model_args"] and m["preprocess"] == rec["preprocess"]
    assert list(m["class_names"]) == class_names
    assert all(v.dtype in (torch.float32, torch.int64) for v in m["model"].values())

    # bank.npz: the training rows under the evaluation transform, unit rows
    with np.load(run / "bank.npz", allow_pickle=False) as f:
        bank = {k: f[k] for k in f.files}
    assert set(bank) == {"penultimate", "projection", "labels", "indices", "class_names"}
    n = len(train_idx)
    assert bank["penultimate"].dtype == np.float32 and bank["penultimate"].shape == (n, 128)
    assert bank["projection"].dtype == np.float32 and bank["projection"].shape == (n, 128)
    for key in ("penultimate", "projection"):
        np.testing.assert_allclose(np.linalg.norm(bank[key], axis=1), 1.0, atol=1e-5)
    assert bank["labels"].dtype == np.int64 and bank["indices"].dtype == np.int64
    np.testing.assert_array_equal(bank["indices"], train_idx)
    np.testing.assert_array_equal(bank["labels"], data["labels"][train_idx])
    assert bank["class_names"].tolist() == class_names
    model, _ = load_model(run)
    emb = embed_arrays(model, data["images"][train_idx[:50]], batch_size=32)
    np.testing.assert_allclose(emb["feature"], bank["penultimate"][:50], atol=1e-5)
    np.testing.assert_allclose(emb["projection"], bank["projection"][:50], atol=1e-5)

    # calibration.npz: the held-out split, in neither training nor the bank
    with np.load(run / "calibration.npz", allow_pickle=False) as f:
        cal = {k: f[k] for k in f.files}
    assert cal["images"].dtype == np.uint8 and cal["images"].shape == (len(cal_idx), 32, 32, 3)
    assert cal["labels"].dtype == np.int64 and cal["indices"].dtype == np.int64
    np.testing.assert_array_equal(cal["indices"], cal_idx)
    np.testing.assert_array_equal(cal["images"], data["images"][cal_idx])
    np.testing.assert_array_equal(cal["labels"], data["labels"][cal_idx])
    assert np.intersect1d(cal["indices"], bank["indices"]).size == 0
    assert len(cal["indices"]) + len(bank["indices"]) == N_IMAGES
    assert set(cal["labels"].tolist()) == set(range(10))          # stratified: every class

    # metrics.jsonl: one line per step (log_every=1), lr on the documented schedule
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in lines] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for r in lines:
        assert {"epoch", "step", "loss", "lr", "views_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["views_per_s"] > 0
        want = 0.05 * lr_lambda(r["global_step"], steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS,
                                warmup_epochs=0, lr=0.05, warmup_from=1e-3, min_lr_ratio=1e-3)
        assert r["lr"] == pytest.approx(want)

    # checkpoints/last.pt: resumable state at the end
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "global_step", "rng", "config",
            "model_args"} <= set(ck)
    assert (ck["epoch"], ck["step"], ck["global_step"]) == (EPOCHS, 0, EPOCHS * STEPS_PER_EPOCH)


def test_lr_schedule_warms_up_then_follows_the_cosine():
    kw = dict(steps_per_epoch=10, epochs=5, warmup_epochs=1, lr=0.5, warmup_from=1e-3,
              min_lr_ratio=1e-3)
    assert lr_lambda(0, **kw) == pytest.approx(1e-3 / 0.5)
    assert lr_lambda(5, **kw) == pytest.approx((1e-3 / 0.5 + 1) / 2)
    assert lr_lambda(10, **kw) == pytest.approx(1.0)
    assert lr_lambda(30, **kw) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert lr_lambda(50, **kw) == pytest.approx(1e-3)
    values = [lr_lambda(s, **kw) for s in range(10, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------------------ resume (in process)
def _stop_at_call(monkeypatch, n: int) -> None:
    """Send this process a real SIGINT during the n-th loss evaluation (step n of the run)."""
    real = train_module.create_loss
    calls = {"n": 0}

    def create_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        forward = loss.forward

        def counted(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)   # the loop's handler only sets its stop flag
            return forward(*a, **k)
        loss.forward = counted
        return loss
    monkeypatch.setattr(train_module, "create_loss", create_loss)


def test_stop_at_an_epoch_boundary_then_resume_equals_uninterrupted(tmp_path, data, reference,
                                                                    monkeypatch):
    out = tmp_path / "run"
    cfg = resolve_config(overrides=_overrides(data, out))
    _stop_at_call(monkeypatch, STEPS_PER_EPOCH)        # the last step of epoch 1
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"], ck["global_step"]) == (1, 0, STEPS_PER_EPOCH)
    assert not (out / "model.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored

    # resume takes the saved configuration; only device and out come from the caller
    train(resolve_config(overrides=dict(out=str(out), device="cpu", epochs=99, lr=9.0)), resume=True)
    _assert_same_weights(out, reference)
    with np.load(out / "bank.npz") as a, np.load(reference / "bank.npz") as b:
        np.testing.assert_allclose(a["penultimate"], b["penultimate"], atol=1e-6)
    steps = [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))    # no step lost or repeated


def test_resume_warns_only_about_settings_the_user_changed(tmp_path, reference, caplog):
    """A run whose c_b is not the offline default's (here -2, as a CIFAR-100 run records it)
    resumed with `--out` and one changed flag: the warning names that flag, not the c_b the
    command line's defaults would have given."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    state = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["c_b"] = -2.0
    torch.save(state, out / "checkpoints" / "last.pt")
    with caplog.at_level("WARNING", logger="reweightood.train"):
        train(resolve_config(overrides=dict(out=str(out), device="cpu", lr=9.0)), resume=True)
    warnings = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert warnings == ["resuming with the checkpoint's settings; ignoring lr=9.0"]
    assert json.loads((out / "config.json").read_text())["config"]["c_b"] == -2.0


def test_a_train_config_built_directly_trains(tmp_path, data):
    """TrainConfig(...) built directly, not through resolve_config, with no c_b: the dataset's
    default c_b is filled in, so the loss gets a number."""
    from trainer.config import TrainConfig

    cfg = TrainConfig(**_overrides(data, tmp_path / "run", epochs=1, deterministic=False))
    run = train(cfg)
    rec = json.loads((run / "config.json").read_text())
    assert rec["finished"] and rec["config"]["c_b"] == -4.0 and (run / "bank.npz").is_file()


def test_resume_without_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError) as e:
        train(resolve_config(overrides=dict(out=str(tmp_path / "none"), device="cpu")), resume=True)
    assert e.value.path == str(tmp_path / "none" / "checkpoints" / "last.pt")


# ------------------------------------------------------------------------------ Ctrl-C, subprocess
def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_ctrl_c_mid_epoch_then_resume_equals_uninterrupted(tmp_path, data, reference):
    out = tmp_path / "run"
    cfg_file = tmp_path / "extra.json"
    cfg_file.write_text(json.dumps({"log_every": 1}))
    args = ["--dataset", "npz", "--data", str(data["path"]), "--arch", "small_cnn",
            "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--lr", "0.05", "--seed", "0",
            "--device", "cpu", "--deterministic", "--config", str(cfg_file), "--out", str(out)]
    proc = _cli(args, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):   # first step done
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no training step within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)                                    # Ctrl-C during step 2
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopped: checkpoint saved" in err
    assert err.rstrip().splitlines()[-1] == "interrupted"
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < ck["step"] < STEPS_PER_EPOCH and ck["epoch"] == 0, (ck["epoch"], ck["step"])
    assert not (out / "model.pt").exists()

    done = _cli(["--resume", "--out", str(out), "--device", "cpu"])
    stdout, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'last.pt'} at epoch 0 step {ck['step']}" in err
    assert f"run directory: {out}" in stdout
    _assert_same_weights(out, reference)


# ------------------------------------------------------------------------------ every loss trains
@pytest.mark.parametrize("loss", list_losses())
def test_every_registered_loss_trains(tmp_path, data, loss):
    # classes 0-3 of the 256 images: ~100 images, one step of 64
    run = train(resolve_config(overrides=_overrides(data, tmp_path / "run", loss=loss, epochs=1,
                                                    classes="0-3", deterministic=False)))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(math.isfinite(r["loss"]) for r in lines)
    m = torch.load(run / "model.pt", weights_only=True)
    assert m["model_args"]["num_classes"] == 4 and len(m["class_names"]) == 4
    has_classifier = any(k.startswith("classifier.") for k in m["model"])
    assert m["model_args"]["with_classifier"] is has_classifier
    assert has_classifier is (loss == "ce")
    with np.load(run / "bank.npz") as f:
        assert set(f["labels"].tolist()) == {0, 1, 2, 3}
        assert np.isfinite(f["penultimate"]).all()


def test_bad_names_and_batch_size_are_input_errors(tmp_path, data):
    for key, value in (("arch", "resnet9000"), ("loss", "triplet"), ("batch_size", 512)):
        with pytest.raises(InputError) as e:
            train(resolve_config(overrides=_overrides(data, tmp_path / key, **{key: value})))
        assert e.value.field == key and str(value) in str(e.value)


# ------------------------------------------------------------------------------ DDP (gloo, 2 ranks)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, overrides: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(resolve_config(overrides=overrides))


def test_two_process_gloo_ddp_writes_one_run(tmp_path, data):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    overrides = _overrides(data, out, epochs=1, classes="0-3", deterministic=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), overrides), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    for name in ("config.json", "model.pt", "bank.npz", "calibration.npz", "metrics.jsonl"):
        assert (out / name).is_file(), name
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["global_step"]) == (1, 1)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and math.isfinite(json.loads(lines[0])["loss"])   # rank 0 logs only
    # SyncBatchNorm is on by default; torch runs it on GPUs only, so these CPU ranks keep their own
    # statistics, and the run record says so (trainer.train.sync_batchnorm)
    rec = json.loads((out / "config.json").read_text())
    assert rec["config"]["sync_bn"] is True
    assert rec["runtime"] == {"device": "cpu", "world_size": 2, "steps_per_epoch": 1,
                              "sync_bn": False}


# ------------------------------------------------------------------------------ the criterion
@pytest.mark.slow
@pytest.mark.cifar_pack
def test_one_epoch_of_2000_cifar_images_on_cpu_under_a_minute(tmp_path, cifar10_small):
    """Done-when of the trainer issue: small_cnn, 1 epoch, 2,000 CIFAR-10 images, CPU, < 60 s
    (defaults otherwise: batch 256, bank and calibration split included). Load-sensitive."""
    f = tmp_path / "c10_2k.npz"
    np.savez(f, images=cifar10_small["images"], labels=cifar10_small["labels"],
             classes=cifar10_small["classes"])
    t = time.perf_counter()
    run = train(resolve_config(overrides=dict(dataset="npz", data=str(f), epochs=1, device="cpu",
                                              out=str(tmp_path / "run"))))
    seconds = time.perf_counter() - t
    assert (run / "bank.npz").is_file()
    assert seconds < 60, f"1 epoch took {seconds:.1f} s (load average {os.getloadavg()[0]:.1f})"
