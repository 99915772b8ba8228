"""The training loop: ReweightOOD (or a baseline) from a TrainConfig to a finished run directory.

Single process, CPU or one GPU:
    rwood-train --dataset cifar10 --data ~/data/cifar --preset official --out runs/c10
Several GPUs on one machine (DDP; the loss sees the whole global batch):
    torchrun --standalone --nproc_per_node=4 -m trainer.cli --dataset cifar10 --data ... --preset official

Reads top to bottom: set-up, data, model and objective, optimiser and schedule, resume, the loop,
then the embedding bank and the run record. Only rank 0 logs and writes.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detector_server.errors import CheckpointError, InputError
from detector_server.preprocess import PreprocessSpec

from .augment import Augment
from .bank import embed_arrays
from .checkpoint import load_state, rng_state, save_state, set_rng_state
from .config import TrainConfig, changed_settings, loss_kwargs
from .data import fingerprint
from .distributed import cleanup, gather_no_grad, gather_with_grad, init_distributed
from .losses import create_loss
from .networks import DeployModel, create_model
from .networks import model_args as get_model_args
from .prepare import check_settings, prepare_data
from .progress import Progress
from .run_dir import (
    MODEL_FILE,
    RunInfo,
    write_bank,
    write_calibration,
    write_image_hashes,
    write_run_info,
)
from .schedule import lr_lambda

__all__ = ["train", "train_step", "build_optimizer", "make_scheduler", "sync_batchnorm",
           "pick_device", "RUN_ENTRIES"]

log = logging.getLogger("reweightood.train")


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """auto -> CUDA when present, else CPU (logged); cuda without a GPU is an InputError."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no GPU is visible to torch", field="device")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step LambdaLR of `cfg.lr_schedule` (trainer/schedule.py) over the whole run.

    Optimizer step s (0-based, counted over the run) uses `cfg.lr * lr_lambda(s)`. Warm-up:
    `cfg.warmup_epochs`, or when None 10 epochs for a batch above 256 and none otherwise (the
    released trainer's rule), at most epochs - 1.
    """
    warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else (10 if cfg.batch_size > 256 else 0)
    warmup = min(warmup, cfg.epochs - 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, schedule=cfg.lr_schedule, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
        warmup_epochs=warmup, lr=cfg.lr, warmup_from=cfg.warmup_from,
        min_lr_ratio=cfg.min_lr_ratio))


def sync_batchnorm(net: nn.Module, enabled: bool, world_size: int, device: torch.device) -> nn.Module:
    """`net` with its BatchNorm layers as SyncBatchNorm when `enabled` under DDP on GPUs, so N ranks
    with global batch B normalise as one GPU with batch B; else `net` unchanged.

    torch's SyncBatchNorm runs on GPUs only: a CPU (gloo) job keeps per-rank statistics (logged).
    """
    if not enabled or world_size == 1:
        return net
    if device.type != "cuda":
        log.warning("sync_bn: SyncBatchNorm needs GPUs; on %s each of the %d ranks normalises over "
                    "its own share of the batch", device.type, world_size)
        return net
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)


def build_optimizer(params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float,
                    device: torch.device) -> torch.optim.SGD:
    """SGD with Nesterov momentum; on CUDA the fused kernel (one launch for all parameters
    instead of a loop over them), where this torch has it."""
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.SGD).parameters
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True,
                           weight_decay=weight_decay, **({"fused": True} if fused else {}))


def train_step(model: nn.Module, augment: nn.Module, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, x_u8: torch.Tensor, y: torch.Tensor, *,
               autocast: Any = None, channels_last: bool = True,
               world_size: int = 1) -> torch.Tensor:
    """One optimisation step on a batch already on the device; returns the loss as a tensor.

    x_u8: uint8 [b, S, S, 3], y: int64 [b]. `criterion.n_views` augmented views of each image go
    through `model` (under `autocast`, a context manager or None) as one batch [V*b, 3, S, S].
    Nothing here waits for the device (no .item(), no host copy, no check of a tensor's value),
    so the host can queue the next steps while the GPU works; read the loss only when logging.
    """
    x = torch.cat([augment(x_u8) for _ in range(criterion.n_views)])           # [V*b, 3, S, S]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast if autocast is not None else nullcontext():
        out = model(x)[criterion.input]                                          # [V*b, D]
    feats = out.float().view(criterion.n_views, len(y), -1).transpose(0, 1)      # [b, V, D]
    if world_size > 1:
        feats, y = gather_with_grad(feats), gather_no_grad(y)
    loss = criterion(feats, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # gather's backward sums over ranks, DDP averages: exact global gradient
    optimizer.step()
    return loss



class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step, so it stops at a clean point."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. tests): no handler, no flag
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stop_requested(local: bool, world_size: int, device: torch.device, step: int) -> bool:
    """True when any rank was asked to stop: all ranks must leave at the same step, or the ones
    still training would block forever in the next all-gather. Under DDP the ranks agree every
    16th step only: the all-reduce forces a host sync that would stall the GPU every step."""
    if world_size == 1:
        return local
    if step % 16:
        return False
    flag = torch.tensor([float(local)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _run_info(cfg: TrainConfig, spec: PreprocessSpec, class_names: list[str], data_info: dict,
              model_args: dict, runtime: dict, finished: bool) -> RunInfo:
    import torchvision
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return RunInfo(config=cfg.to_dict(), model_args=model_args, preprocess=spec,
                   class_names=tuple(class_names), data=data_info, runtime=runtime,
                   versions={"python": platform.python_version(), "torch": torch.__version__,
                             "torchvision": torchvision.__version__, "numpy": np.__version__},
                   git_rev=rev, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   finished=finished)


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False,
          ood: dict[str, str] | None = None) -> Path:
    """Train, then write model.pt, bank.npz, calibration.npz and config.json into cfg.out
    (no calibration.npz with calibration_fraction 0: rwood-export then needs --calibration).

    With `resume`, continue from RUN_DIR/checkpoints/last.pt using the configuration saved there.
    Without it, a run already in cfg.out is refused (InputError) unless `force`, which deletes
    its files (`RUN_ENTRIES`) before training. With `ood` ({name: path}), evaluate OOD detection
    at the end (report in RUN_DIR/eval). Returns the run directory.
    """
    # -- set-up: the run directory, distributed, device, seeds
    run_dir = Path(cfg.out)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    state = None
    existing = [] if resume else _run_entries(run_dir)
    if existing and not force:
        raise InputError(f"already holds a run ({', '.join(existing)}): pass --resume to continue "
                         "it, --force to replace it, or another --out", path=run_dir)
    if resume:
        if not ckpt_path.is_file():
            raise CheckpointError("--resume given but there is no checkpoint to resume from",
                                  path=str(ckpt_path))
        state = load_state(ckpt_path)
        saved = TrainConfig(**{**state["config"], "device": cfg.device, "out": cfg.out})
        kept = saved.to_dict()
        ignored = [f"{k}={v!r}" for k, v in changed_settings(cfg).items() if v != kept[k]]
        if ignored:  # a resumed run continues exactly as it started
            log.warning("resuming with the checkpoint's settings; ignoring %s", ", ".join(ignored))
        cfg = saved
    check_settings(cfg)
    dist = init_distributed()
    device = pick_device(cfg.device, dist.local_rank)
    if dist.is_main:
        log.info("device: %s%s", device, f" (rank 0 of {dist.world_size})" if dist.world_size > 1 else "")
    torch.manual_seed(cfg.seed + dist.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.amp  # fp32 (amp off): full-precision matmuls
        torch.backends.cudnn.allow_tf32 = True            # torch's default for convolutions

    # -- data (trainer/prepare.py: size, classes, split, batch, normalisation, each logged); the
    # training images live on the device as uint8 and augmentation happens there too
    if not dist.is_main:  # one rank says what was decided
        logging.getLogger("trainer").setLevel(logging.WARNING)
    data = prepare_data(cfg, dist.world_size)
    full, train_idx, cal_idx, spec = data.full, data.train_idx, data.cal_idx, data.spec
    mean, std = spec.mean, spec.std
    num_classes = len(full.class_names)
    images = torch.from_numpy(full.images[train_idx]).to(device)
    labels = torch.from_numpy(full.labels[train_idx]).to(device)
    local_bs = cfg.batch_size // dist.world_size
    steps_per_epoch = len(train_idx) // cfg.batch_size
    augment = Augment(spec.size, mean, std, scale=(cfg.crop_scale_min, 1.0)).to(device)

    # -- model and objective
    try:  # names and values from a config file reach here unchecked: user errors, not crashes
        criterion = create_loss(cfg.loss, **loss_kwargs(cfg))
    except ValueError as e:
        raise InputError(str(e), field="loss") from None
    try:
        net = create_model(cfg.arch, num_classes=num_classes, head_dim=cfg.head_dim,
                           with_classifier=criterion.input == "logits", pretrained=cfg.pretrained,
                           freeze_early=cfg.freeze_early)
    except ValueError as e:
        raise InputError(str(e), field="arch") from None
    model_args = get_model_args(net)
    net = sync_batchnorm(net, cfg.sync_bn, dist.world_size, device)
    net = net.to(device)
    cuda = device.type == "cuda"
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model: nn.Module = net
    if dist.world_size > 1:
        # The ce baseline leaves the projection head out of the loss: DDP must expect unused params.
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if cuda else None,
            find_unused_parameters=criterion.input != "projection")
    if cfg.compile:
        model = torch.compile(model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else nullcontext())

    # -- optimiser and per-step schedule
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, device=device)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)

    # -- resume: weights, optimiser, schedule, RNG and position in the epoch
    start_epoch, start_step, global_step = 0, 0, 0
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        set_rng_state(state["rng"])
        if dist.is_main:
            log.info("resumed from %s at epoch %d step %d", ckpt_path, start_epoch, start_step)
    data_info = {"dataset": cfg.dataset, "path": cfg.data, "source": full.source,
                 "fingerprint": fingerprint(full), "n_train": int(len(train_idx)),
                 "n_calibration": int(len(cal_idx)), "classes": cfg.classes}
    runtime = {"device": device.type, "world_size": dist.world_size, "steps_per_epoch": steps_per_epoch,
               "sync_bn": any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())}
    if dist.is_main:
        _remove_run(run_dir, existing)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, _run_info(cfg, spec, full.class_names, data_info, model_args,
                                          runtime, False))
    metrics_file = open(run_dir / "metrics.jsonl", "a") if dist.is_main else None
    writer = _tensorboard(run_dir) if cfg.tensorboard and dist.is_main else None

    saved_at: list[int] = []  # epochs of the checkpoints this call wrote

    def checkpoint(epoch: int, step: int) -> None:
        _check_loss(loss.item(), epoch, step, scheduler.get_last_lr()[0], ckpt_path, saved_at)
        saved_at.append(epoch)
        if dist.is_main:
            save_state(ckpt_path, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                                   "global_step": global_step, "rng": rng_state(),
                                   "config": cfg.to_dict(), "model_args": model_args})

    # -- the loop
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + epoch)).to(device)
            first = start_step if epoch == start_epoch else 0
            bar = Progress(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           unit="steps", enabled=dist.is_main, logger=log)
            t0, seen = time.perf_counter(), 0
            for step in bar:
                rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                rows = rows[dist.rank * local_bs:(dist.rank + 1) * local_bs]
                loss = train_step(model, augment, criterion, optimizer, images[rows], labels[rows],
                                  autocast=autocast, channels_last=cfg.channels_last,
                                  world_size=dist.world_size)
                scheduler.step()
                global_step += 1
                seen += cfg.batch_size * criterion.n_views
                logged = global_step % cfg.log_every == 0 or step == steps_per_epoch - 1
                if logged:  # the one host sync of a logged step; every rank checks the global loss
                    value = loss.item()
                    _check_loss(value, epoch, step, scheduler.get_last_lr()[0], ckpt_path, saved_at)
                if dist.is_main and logged:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    rec = {"epoch": epoch, "step": step, "global_step": global_step,
                           "loss": value, "lr": scheduler.get_last_lr()[0], "views_per_s": rate}
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}",
                                    img_s=f"{rate:.0f}")
                    if writer:
                        writer.add_scalar("loss", rec["loss"], global_step)
                        writer.add_scalar("lr", rec["lr"], global_step)
                if _stop_requested(stop.raised, dist.world_size, device, global_step):
                    # a stop on an epoch's last step resumes at the start of the next epoch
                    at = (epoch + 1, 0) if step + 1 == steps_per_epoch else (epoch, step + 1)
                    checkpoint(*at)
                    if dist.is_main:
                        log.warning("stopped: checkpoint saved at epoch %d step %d; continue with "
                                    "--resume --out %s", *at, run_dir)
                    raise KeyboardInterrupt
            bar.close()
            if dist.is_main:
                log.info("epoch %d/%d loss %.4f lr %.4g", epoch + 1, cfg.epochs, loss.item(),
                         scheduler.get_last_lr()[0])
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                checkpoint(epoch + 1, 0)
    if metrics_file:
        metrics_file.close()

    # -- the run record: final weights, embedding bank, calibration split
    if dist.is_main:
        _finish(run_dir, net, model_args, spec, full, train_idx, cal_idx, device,
                cfg.eval_batch_size)
        write_run_info(run_dir, _run_info(cfg, spec, full.class_names, data_info, model_args,
                                          runtime, True))
        log.info("run written to %s", run_dir)
        if ood:
            from .report import evaluate_run
            evaluate_run(run_dir, None, ood, device=str(device), out=run_dir / "eval",
                         progress=True)
    cleanup()
    return run_dir


def _finish(run_dir: Path, net: nn.Module, model_args: dict, spec: PreprocessSpec, full,
            train_idx: np.ndarray, cal_idx: np.ndarray, device: torch.device, batch: int) -> None:
    net = net.float().to(memory_format=torch.contiguous_format)
    save_state(run_dir / MODEL_FILE, {"model": net.state_dict(), "model_args": model_args,
                                      "preprocess": spec.to_dict(), "class_names": full.class_names})
    deploy = DeployModel(net, spec.mean, spec.std).to(device).eval()
    emb = embed_arrays(deploy, full.images[train_idx], batch_size=batch, device=device,
                       progress=True, desc="embedding bank")
    files = None if full.files is None else [full.files[i] for i in train_idx]
    write_bank(run_dir, emb, full.labels[train_idx], train_idx, full.class_names, files)
    write_image_hashes(run_dir, full.images[train_idx])   # rwood-export refuses them as calibration
    if len(cal_idx):  # none at calibration_fraction 0: every image is trained on and banked
        write_calibration(run_dir, full.images[cal_idx], full.labels[cal_idx], cal_idx)


def _check_loss(value: float, epoch: int, step: int, lr: float, ckpt_path: Path,
                saved_at: list[int]) -> None:
    """Stop training with an InputError when the loss is NaN or infinite: every later step would
    only spread it through the weights. The message says which checkpoint (if any) is good."""
    if math.isfinite(value):
        return
    if saved_at:
        kept = (f"the last good checkpoint, {ckpt_path} (end of epoch {saved_at[-1]}), is kept "
                "and was not overwritten")
    elif ckpt_path.is_file():
        kept = f"the checkpoint from before this call, {ckpt_path}, is kept and was not overwritten"
    else:
        kept = "no checkpoint had been written yet"
    raise InputError(f"training stopped: the loss became {value} at epoch {epoch + 1} step "
                     f"{step + 1} (learning rate {lr:.3g}); {kept}, and no final model was "
                     "written. Lower --lr (or check the settings and the data) and train again")


# What a run writes into its directory; --force deletes these (and nothing else) first.
RUN_ENTRIES = ("config.json", "checkpoints", "model.pt", "bank.npz", "bank_hashes.npy",
               "calibration.npz", "metrics.jsonl", "eval", "tb")


def _run_entries(run_dir: Path) -> list[str]:
    """The entries of RUN_ENTRIES present in `run_dir` (none when it does not exist)."""
    return [name for name in RUN_ENTRIES if os.path.lexists(run_dir / name)]


def _remove_run(run_dir: Path, names: list[str]) -> None:
    for name in names:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if names:
        log.warning("--force: removed the previous run's %s from %s", ", ".join(names), run_dir)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard",
                         field="tensorboard") from None
    return SummaryWriter(str(run_dir / "tb"))
