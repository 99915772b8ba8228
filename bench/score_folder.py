"""Throughput of `rwood-score` (detector_server.score_folder) against the in-process ceiling.

    .venv/bin/python bench/score_folder.py [--bundle BUNDLE] [--n-cifar 2000] [--n-textures 1000]

Writes a folder of real PNG files (CIFAR-10 test images and DTD textures from ../shared/data),
then measures:
- ceiling: the same files decoded up front, the uint8 arrays scored straight through
  `Detector.score_arrays` in batches (model + KNN only, no file I/O, no decoding);
- rwood-score: `score_folder` on the folder (listing, reading, decoding in worker processes,
  scoring, writing the table), end to end, and its scoring phase alone (`ScoreSummary.files_per_s`:
  the rate without the one-off start-up of model load and worker processes).
Target: rwood-score >= 0.8 x the ceiling. Without --bundle a bundle is made first from a 1-epoch
small_cnn run on 1,000 CIFAR-10 images (needs the train extra; about a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def write_folder(root: Path, n_cifar: int, n_textures: int, data: Path = SHARED) -> int:
    """PNG files of real images under root (textures in a subfolder); returns how many."""
    cifar = np.load(data / "cifar10_test.npz")["images"][:n_cifar]
    textures = np.load(data / "ood_textures.npz")["images"][:n_textures]
    (root / "textures").mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(cifar):
        Image.fromarray(a).save(root / f"cifar_{i:05d}.png")
    for i, a in enumerate(textures):
        Image.fromarray(a).save(root / "textures" / f"dtd_{i:05d}.png")
    return len(cifar) + len(textures)


def make_bundle(work: Path, data: Path = SHARED, arch: str = "small_cnn") -> Path:
    """A bundle of a 1-epoch `arch` run on 1,000 CIFAR-10 training images (small_cnn: as the
    tests)."""
    import torch

    from exporter.export import export_bundle
    from trainer.config import resolve_config
    from trainer.train import train

    d = np.load(data / "cifar10_train.npz")
    npz = work / "cifar10_1k.npz"
    np.savez(npz, images=d["images"][:1000], labels=d["labels"][:1000], classes=d["classes"])
    torch.set_num_threads(2)
    cfg = resolve_config(overrides=dict(dataset="npz", data=str(npz), arch=arch, epochs=1,
                                        batch_size=128, lr=0.05, out=str(work / "run"),
                                        device="cpu", seed=0, k=10))
    return export_bundle(train(cfg), work / "bundle", k=10)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def ceiling(bundle: Path, folder: Path, batch_size: int, device: str) -> tuple[float, float]:
    """(images/s, CPU ms per image) of Detector.score_arrays on the folder's images, decoded
    before timing."""
    from detector_server.detector import Detector

    det = Detector(bundle, device=device)
    files = sorted(p for p in folder.rglob("*.png"))
    x = np.stack([det.prepare(p.read_bytes()) for p in files])
    det.score_arrays(x[:batch_size])                                    # warm-up
    t0, c0 = time.perf_counter(), cpu_seconds()
    for i in range(0, len(x), batch_size):
        det.score_arrays(x[i:i + batch_size])
    return len(x) / (time.perf_counter() - t0), (cpu_seconds() - c0) / len(x) * 1e3


def library(bundle: Path, folder: Path, out: Path, batch_size: int, workers: int | None,
            device: str) -> tuple[float, float, float]:
    """(end-to-end images/s, images/s of the scoring phase, CPU ms per image end to end,
    workers included) of score_folder on the folder."""
    from detector_server.score_folder import score_folder

    t0, c0 = time.perf_counter(), cpu_seconds()
    s = score_folder(bundle, folder, out, recursive=True, batch_size=batch_size, workers=workers,
                     device=device, force=True, progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert s.errors == 0 and s.scored == s.files, s.describe()
    return s.files / wall, s.files_per_s, cpu / s.files * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=SHARED, help="the shared data pack")
    ap.add_argument("--n-cifar", type=int, default=2000)
    ap.add_argument("--n-textures", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3,
                    help="pairs of runs (ceiling, then rwood-score right after it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_score_") as tmp:
        work = Path(tmp)
        bundle = args.bundle or make_bundle(work, args.data)
        n = write_folder(work / "images", args.n_cifar, args.n_textures, args.data)
        runs = []   # (ceiling img/s, ceiling CPU ms/img, e2e img/s, loop img/s, e2e CPU ms/img)
        for _ in range(args.repeats):
            runs.append(ceiling(bundle, work / "images", args.batch_size, args.device)
                        + library(bundle, work / "images", work / "scores.csv", args.batch_size,
                                  args.workers, args.device))
        r = np.array(runs)
        med = np.median(r, axis=0)
        # On a shared machine the load changes between runs: the ratio is taken within each
        # pair (runs back to back) and the median pair is reported.
        loop_x, e2e_x = np.median(r[:, 3] / r[:, 0]), np.median(r[:, 2] / r[:, 0])
        print(f"{n} PNG files, batch {args.batch_size}, workers {args.workers}, device "
              f"{args.device}, {len(os.sched_getaffinity(0))} cores, load average "
              f"{os.getloadavg()[0]:.1f}, median of {args.repeats} pairs")
        print(f"ceiling (decoded arrays -> Detector.score_arrays): {med[0]:8.1f} images/s  "
              f"{med[1]:.3f} CPU ms/image")
        print(f"rwood-score, scoring phase (after start-up):       {med[3]:8.1f} images/s  "
              f"({loop_x:.2f} x)")
        print(f"rwood-score, end to end (load, spawn, write):      {med[2]:8.1f} images/s  "
              f"({e2e_x:.2f} x)  {med[4]:.3f} CPU ms/image "
              f"({med[1] / med[4]:.2f} x the ceiling's CPU efficiency)")
        print("pairs (ceiling, loop) images/s: "
              + ", ".join(f"({a:.0f}, {b:.0f})" for a, b in zip(r[:, 0], r[:, 3])))


if __name__ == "__main__":
    main()
