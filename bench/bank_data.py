"""Real embeddings for `bank_scale.py`: a small network, its bank of augmented views, the query sets.

    .venv/bin/python bench/bank_data.py [--run RUN_DIR] [--views 100] [--cache bench_out/bank_scale]

Use it (or let `bank_scale.py` call it) to build the banks once: 10,000 CIFAR-10 training images
of the data pack x `--views` augmented views (the training augmentation, `trainer.augment`, back
to uint8) through the run's exported model under ONNX Runtime (`Detector.embed`, the runtime's
own path) give `10,000 x views` real embeddings (100 views: one million rows, about 25 minutes
of one CPU core), cached as one file per view under `--cache`, so an interrupted run resumes and
later runs read them back. Without `--run`, a small_cnn is trained first on the same images
(`--epochs`, cached too); the run is exported once (Flat index) into the cache.
`--copies R` repeats every view R times with Gaussian noise of `--noise` per coordinate (rows
renormalised): a cheap way to reach a bank size with few network passes (the slow test uses it).
Queries: the CIFAR-10 test split (first half: calibration, second half: ID test), and the OOD sets
CIFAR-100 test (near), MNIST and DTD textures (far), embedded without augmentation.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RWOOD_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_CACHE = REPO / "bench_out" / "bank_scale"
OOD_SETS = {"cifar100": "cifar100_test.npz", "mnist": "ood_mnist.npz",
            "textures": "ood_textures.npz"}

log = logging.getLogger("bank_data")


def train_run(data: Path, cache: Path, epochs: int) -> Path:
    """A small_cnn ReweightOOD run on the pack's CIFAR-10 training images (reused when present)."""
    from trainer.config import resolve_config
    from trainer.train import train

    out = cache / f"run_small_cnn_e{epochs}"
    if (out / "model.pt").is_file() and (out / "bank.npz").is_file():
        return out
    log.info("training small_cnn for %d epochs on %s (once; cached in %s)", epochs, data, out)
    cfg = resolve_config(preset="demo", overrides=dict(
        dataset="npz", data=str(data / "cifar10_train.npz"), epochs=epochs, out=str(out),
        device="cpu", seed=0, k=100))
    return train(cfg)


def export_run(run: Path, cache: Path) -> Path:
    """The run exported as a bundle (Flat index) in the cache, keyed by its model's SHA-256."""
    from exporter.export import export_bundle

    h = hashlib.sha256()
    with open(run / "model.pt", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    out = cache / f"bundle-{h.hexdigest()[:12]}"
    if not (out / "manifest.json").is_file():
        export_bundle(run, out, index_factory="Flat", threads=1, overwrite=True)
    return out


def _detector(bundle: Path):
    from detector_server.detector import Detector

    return Detector(bundle, device="cpu", threads=1)


@torch.inference_mode()
def _embed_view(det, augment, images: np.ndarray, batch: int) -> np.ndarray:
    """One augmented view of every image -> unit rows float32 [N, D] of the bundle's feature."""
    mean = torch.tensor(det.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(det.spec.std).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch):
        x = augment(torch.from_numpy(images[i:i + batch]))            # normalised [B, 3, S, S]
        u8 = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        out.append(det.embed(np.ascontiguousarray(u8.permute(0, 2, 3, 1).numpy())))
    return np.concatenate(out)


def bank_views(bundle: Path, data: Path, cache: Path, views: int, seed: int = 0,
               batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """`views` augmented views of the pack's CIFAR-10 training images, embedded by the bundle.

    Returns (float32 [views * N, D] unit rows, view-major; int64 [views * N] labels). Every view is
    cached as cache/views-<bundle>-s<seed>/vNNN.npy; missing ones are computed (resumable).
    """
    from trainer.augment import Augment

    d = np.load(data / "cifar10_train.npz")
    images, labels = d["images"], d["labels"].astype(np.int64)
    folder = cache / f"views-{bundle.name}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    det = augment = None
    parts = []
    for v in range(views):
        path = folder / f"v{v:03d}.npy"
        if not path.is_file():
            if det is None:
                det = _detector(bundle)
                scale = (det.manifest.training.get("config") or {}).get("crop_scale_min", 0.2)
                augment = Augment(det.spec.size, det.spec.mean, det.spec.std, scale=(scale, 1.0))
                log.info("embedding augmented views into %s", folder)
            torch.manual_seed(seed * 100_003 + v)
            emb = _embed_view(det, augment, images, batch)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, emb)
            os.replace(tmp, path)
            if v % 10 == 9:
                log.info("view %d/%d done", v + 1, views)
        parts.append(np.load(path))
    return np.concatenate(parts), np.tile(labels, views)


def with_noise_copies(emb: np.ndarray, labels: np.ndarray, copies: int, noise: float,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each row `copies` times (the first copy unchanged), plus N(0, noise^2) per coordinate on the
    others, rows renormalised. Returns float32 [copies * N, D], int64 [copies * N] (copy-major)."""
    if copies <= 1:
        return emb, labels
    rng = np.random.default_rng(seed)
    out = [emb]
    for _ in range(copies - 1):
        x = emb + rng.normal(0.0, noise, emb.shape).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return np.concatenate(out), np.tile(labels, copies)


def query_sets(bundle: Path, data: Path) -> dict[str, np.ndarray]:
    """Unit embeddings float32 [N, D] of "calibration" (CIFAR-10 test, first half), "id_test"
    (second half) and every OOD set of OOD_SETS, by the bundle's model (no augmentation)."""
    from detector_server.preprocess import prepare_arrays

    det = _detector(bundle)

    def emb(name: str) -> np.ndarray:
        return det.embed(prepare_arrays(np.load(data / name)["images"], det.spec))

    test = emb("cifar10_test.npz")
    half = len(test) // 2
    out = {"calibration": test[:half], "id_test": test[half:]}
    out.update({name: emb(f) for name, f in OOD_SETS.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None, help="trained run (default: train small_cnn)")
    p.add_argument("--data", type=Path, default=SHARED)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--views", type=int, default=100)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    run = args.run or train_run(args.data, args.cache, args.epochs)
    emb, _ = bank_views(export_run(run, args.cache), args.data, args.cache, args.views)
    print(f"{len(emb)} x {emb.shape[1]} bank rows from {run}")


if __name__ == "__main__":
    main()
