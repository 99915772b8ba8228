"""Training throughput (views/s) of our training step, in several variants, against a reference loop.

    .venv/bin/python bench/train_throughput.py                       # CPU: small_cnn, batch 64
    python3 bench/train_throughput.py --device cuda --arch resnet18_cifar --batch-size 512

- ours: `trainer.train.train_step`, the step rwood-train runs, timed as is. The uint8 training
  images stay on the device. Two views come from the batched, per-sample `trainer.augment.Augment`
  on that device, with no CPU round trip. Then channels_last, forward, the loss, backward and SGD
  nesterov (fused on CUDA, `trainer.train.build_optimizer`). Each variant `MODE-PRECISION` in
  `--variants` is timed on a fresh network: MODE is eager, compile (`torch.compile`) or cudagraphs
  (`torch.compile(mode="reduce-overhead")`, CUDA graphs); PRECISION is bf16 (autocast on CUDA, what
  rwood-train does by default) or fp32 (no autocast; TF32 matmul/conv on CUDA as rwood-train allows:
  the `official` preset's precision). Default on CUDA: eager-bf16, compile-bf16, cudagraphs-bf16,
  eager-fp32; on CPU: eager-fp32. A variant that fails (no compiler for torch.compile, say) is
  reported and the others still run.
- reference: the usual SupContrast-style loop. A torch DataLoader runs `--workers` processes, and
  each image goes through PIL and torchvision.transforms.v2 (RandomResizedCrop, flip, ColorJitter
  p=0.8, grayscale p=0.2, ToImage, ToDtype, Normalize) twice. The batch is pinned and copied to the
  device, and the step is fp32 eager in NCHW.

Every loop runs `--warmup` untimed steps (at least 3 for compiled variants, whose first steps
compile and record), then `--steps` timed ones, with a CUDA synchronize at the edges. views/s is
steps * views per step / seconds. The network's FLOPs per view (forward + backward, counted once
with torch.utils.flop_counter.FlopCounterMode; the loss and the augmentation are left out, they are
far below 1%) turn views/s into achieved TFLOP/s, printed against `--peak-tflops` (default on CUDA:
790, the bf16 dense peak issue 12 gives for the H200; pass the datasheet figure of your part). The
reference cycles its DataLoader, so a long run includes the epoch-boundary stalls a real run has.
Last line: `RESULT {json}`, for scripts. The load average is printed too: on a shared machine, other
processes skew every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.augment import Augment  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import dataset_stats  # noqa: E402
from trainer.losses import create_loss  # noqa: E402
from trainer.networks import create_model  # noqa: E402
from trainer.train import build_optimizer, train_step  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("RWOOD_DATA", REPO.parent / "shared" / "data")) / "cifar10_train.npz"
MODES = ("eager", "compile", "cudagraphs")
PRECISIONS = ("bf16", "fp32")
CUDA_PEAK_TFLOPS = 790.0          # issue 12's bf16 dense figure for the H200


class TwoViews(torch.utils.data.Dataset):
    """Reference dataset: uint8 HWC array -> PIL -> two independent v2-transformed views."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, scale_min: float):
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        size = images.shape[1]
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return self.transform(img), self.transform(img), int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_opt(arch: str, num_classes: int, device: torch.device, ours: bool):
    """Seeded network and SGD nesterov: ours is channels_last with rwood-train's optimizer (fused
    on CUDA), the reference NCHW with torch's default SGD."""
    torch.manual_seed(0)
    net = create_model(arch, num_classes=num_classes).to(device)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
    if not ours:
        return net.train(), torch.optim.SGD(net.parameters(), nesterov=True, **kw)
    net = net.to(memory_format=torch.channels_last)
    return net.train(), build_optimizer(list(net.parameters()), device=device, **kw)


def _criterion(name: str):
    return create_loss(name, temperature=0.1, m_b=5.0, c_b=-4.0, m_w=2.0, c_w=-1.0)


def flops_per_view(arch: str, num_classes: int, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of the network for one 3 x size x size view (fp32, counted by
    FlopCounterMode on a batch of 8: convolutions and matmuls, which is where the time goes)."""
    from torch.utils.flop_counter import FlopCounterMode

    net, _ = _model_and_opt(arch, num_classes, device, ours=False)
    x = torch.randn(8, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        (out["projection"].float().sum() + out["feature"].float().sum()).backward()
    return counter.get_total_flops() / 8


def bench_ours(images: np.ndarray, labels: np.ndarray, args, device: torch.device,
               variant: str) -> tuple[float, float, int]:
    """(views/s, warm-up seconds, views per step) of `trainer.train.train_step`, one variant."""
    mode, precision = variant.split("-")
    cuda = device.type == "cuda"
    mean, std = dataset_stats(images)
    x_all = torch.from_numpy(images).to(device)
    y_all = torch.from_numpy(labels).to(device)
    augment = Augment(images.shape[1], mean, std, scale=(args.crop_scale_min, 1.0)).to(device)
    criterion = _criterion(args.loss)
    net, opt = _model_and_opt(args.arch, int(labels.max()) + 1, device, ours=True)
    model = net
    if mode != "eager":
        torch._dynamo.reset()
        model = torch.compile(net, mode="reduce-overhead" if mode == "cudagraphs" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and precision == "bf16" else None
    b, views = args.batch_size, criterion.n_views
    n_batches = len(images) // b

    def step(i: int) -> None:
        if i % n_batches == 0:
            step.order = torch.randperm(len(images), device=device)
        rows = step.order[(i % n_batches) * b:(i % n_batches + 1) * b]
        if mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        train_step(model, augment, criterion, opt, x_all[rows], y_all[rows], autocast=autocast)

    warmup = args.warmup if mode == "eager" else max(args.warmup, 3)
    t = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    warm_s = time.perf_counter() - t
    return _timed(step, warmup, args.steps, b * views, device), warm_s, b * views


def bench_reference(images: np.ndarray, labels: np.ndarray, args, device: torch.device) -> float:
    """views/s of a DataLoader + PIL/v2 transforms loop, fp32 eager, NCHW."""
    mean, std = dataset_stats(images)
    ds = TwoViews(images, labels, mean, std, args.crop_scale_min)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    criterion = _criterion(args.loss)
    net, opt = _model_and_opt(args.arch, int(labels.max()) + 1, device, ours=False)
    views = criterion.n_views

    def batches():
        while True:
            yield from loader
    it = batches()

    def step(i: int) -> None:
        v1, v2, y = next(it)
        x = torch.cat([v1, v2][:views]).to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        out = net(x)[criterion.input]
        feats = out.view(views, len(y), -1).transpose(0, 1)
        loss = criterion(feats, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    return _timed(step, args.warmup, args.steps, args.batch_size * views, device)


def _variants(text: str | None, cuda: bool) -> list[str]:
    """The MODE-PRECISION names to time; exits with a message on a malformed or CPU-impossible one."""
    if text is None:
        return ["eager-bf16", "compile-bf16", "cudagraphs-bf16", "eager-fp32"] if cuda else ["eager-fp32"]
    out = [v.strip() for v in text.split(",") if v.strip()]
    for v in out:
        mode, _, precision = v.partition("-")
        if mode not in MODES or precision not in PRECISIONS:
            sys.exit(f"error: --variants: {v!r} is not MODE-PRECISION with MODE in {MODES} and "
                     f"PRECISION in {PRECISIONS}")
        if not cuda and (mode == "cudagraphs" or precision == "bf16"):
            sys.exit(f"error: --variants: {v!r} needs CUDA (CPU runs are fp32, without CUDA graphs)")
    return out


def _timed(step, start: int, steps: int, views_per_step: int, device: torch.device) -> float:
    """views/s over `steps` calls of step(i), i from `start` (warm-up done by the caller)."""
    _sync(device)
    t = time.perf_counter()
    for i in range(start, start + steps):
        step(i)
    _sync(device)
    return steps * views_per_step / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--arch", default=None,
                   help="network (default: resnet18_cifar on CUDA, small_cnn on CPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (views = 2x); default 512 on CUDA, 64 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 CUDA, 1 CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="reference DataLoader workers (default: CPU count, at most 16)")
    p.add_argument("--loss", default="reweightood")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"npz with images uint8 (N,H,W,3) and labels (default {DEFAULT_DATA})")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    p.add_argument("--variants", default=None,
                   help="comma-separated MODE-PRECISION list, MODE eager|compile|cudagraphs, "
                        "PRECISION bf16|fp32 (default CUDA: eager-bf16,compile-bf16,"
                        "cudagraphs-bf16,eager-fp32; CPU: eager-fp32)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"chip peak for the %% column (default {CUDA_PEAK_TFLOPS:g} on CUDA, none on CPU)")
    p.add_argument("--skip-reference", action="store_true")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    cuda = device.type == "cuda"
    args.arch = args.arch or ("resnet18_cifar" if cuda else "small_cnn")
    args.batch_size = args.batch_size or (512 if cuda else 64)
    args.steps = args.steps or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    args.crop_scale_min = TrainConfig.crop_scale_min
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with np.load(args.data) as f:
        images, labels = f["images"][:args.limit], f["labels"][:args.limit].astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        sys.exit(f"error: {args.data}: expected images uint8 (N,H,W,3), got {images.dtype} "
                 f"{images.shape}")
    if args.batch_size > len(images):
        sys.exit(f"error: --batch-size {args.batch_size} is larger than the {len(images)} images")

    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"arch {args.arch}, batch {args.batch_size} ({2 * args.batch_size} views/step), "
          f"loss {args.loss}, {len(images)} images {images.shape[1]}x{images.shape[2]} "
          f"from {args.data}")
    print(f"steps: {args.warmup} warm-up + {args.steps} timed; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    variants = _variants(args.variants, cuda)
    peak = args.peak_tflops or (CUDA_PEAK_TFLOPS if cuda else None)
    flops = flops_per_view(args.arch, int(labels.max()) + 1, images.shape[1], device)
    print(f"network FLOPs per view (forward + backward, FlopCounterMode): {flops / 1e9:.3f} GFLOP")
    result = {"device": str(device), "device_name": name, "arch": args.arch,
              "batch_size": args.batch_size, "loss": args.loss, "gflop_per_view": flops / 1e9,
              "peak_tflops": peak, "variants": {}}
    for variant in variants:
        try:
            rate, warm_s, per_step = bench_ours(images, labels, args, device, variant)
        except Exception as e:  # a variant that cannot run here (compiler, CUDA graphs) is reported
            print(f"ours {variant:16s}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            result["variants"][variant] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        tflops = rate * flops / 1e12
        of_peak = f", {100 * tflops / peak:.1f}% of {peak:g}" if peak else ""
        print(f"ours {variant:16s}: {rate:10,.0f} views/s  {tflops:8.3f} TFLOP/s{of_peak}  "
              f"({1e3 * per_step / rate:.1f} ms per step of {per_step} views; warm-up {warm_s:.1f} s)")
        result["variants"][variant] = {"views_per_s": round(rate, 1), "tflops": round(tflops, 3),
                                       "warmup_s": round(warm_s, 2)}
    rates = {v: r["views_per_s"] for v, r in result["variants"].items() if "views_per_s" in r}
    if not rates:
        print("RESULT " + json.dumps(result))
        sys.exit("error: no variant ran")
    best = max(rates, key=rates.get)
    ours = rates[best]
    result.update(best_variant=best, ours_views_per_s=ours)
    print(f"best: {best} at {ours:,.0f} views/s")
    if not args.skip_reference:
        ref = bench_reference(images, labels, args, device)
        print(f"reference : {ref:10,.0f} views/s  (PIL + transforms.v2 in {args.workers} "
              f"DataLoader workers, fp32 eager, NCHW)")
        print(f"ratio ours ({best})/reference: {ours / ref:.2f}x")
        result.update(reference_views_per_s=round(ref, 1), ratio=round(ours / ref, 3),
                      workers=args.workers)
    minutes = 500 * 50_000 * 2 / ours / 60
    print(f"at this rate the paper's recipe (500 epochs x 50,000 CIFAR images x 2 views) takes "
          f"{minutes:,.0f} min")
    result["load_average"] = round(os.getloadavg()[0], 2)
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
