"""Real embeddings for `bank_scale.py`: a small network, its bank of augmented views, the query sets.

    .venv/bin/python bench/bank_data.py [--run RUN_DIR] [--views 100] [--cache bench_out/bank_scale]

Use it (or let `bank_scale.py` call it) to build the banks once: 10,000 CIFAR-10 training images
of the data pack x `--views` augmented views through the run's network give `10,000 x views`
real embeddings (100 views: one million rows, about half an hour of one CPU core), cached as one
file per view under `--cache`, so an interrupted run resumes and later runs read them back.
Without `--run`, a small_cnn is trained first on the same images (`--epochs`, cached too).
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
import torch.nn.functional as F

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


def _model_key(run: Path) -> str:
    h = hashlib.sha256()
    with open(run / "model.pt", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


@torch.inference_mode()
def _embed_view(model, augment, images: np.ndarray, batch: int) -> np.ndarray:
    """One augmented view of every image -> unit penultimate rows float32 [N, D]."""
    out = []
    for i in range(0, len(images), batch):
        x = augment(torch.from_numpy(images[i:i + batch]))
        out.append(F.normalize(model.net(x)["feature"].float(), dim=1).numpy())
    return np.concatenate(out)


def bank_views(run: Path, data: Path, cache: Path, views: int, seed: int = 0,
               batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """`views` augmented views of the pack's CIFAR-10 training images, embedded by the run's model.

    Returns (float32 [views * N, D] unit rows, view-major; int64 [views * N] labels). Every view is
    cached as cache/views-<model sha>-s<seed>/vNNN.npy; missing ones are computed (resumable).
    """
    from trainer.augment import Augment
    from trainer.checkpoint import load_model

    d = np.load(data / "cifar10_train.npz")
    images, labels = d["images"], d["labels"].astype(np.int64)
    folder = cache / f"views-{_model_key(run)}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    model = augment = None
    parts = []
    for v in range(views):
        path = folder / f"v{v:03d}.npy"
        if not path.is_file():
            if model is None:
                model, info = load_model(run)
                spec = info["preprocess"]
                augment = Augment(spec.size, spec.mean, spec.std,
                                  scale=(info["config"]["config"]["crop_scale_min"], 1.0))
                log.info("embedding augmented views into %s", folder)
            torch.manual_seed(seed * 100_003 + v)
            emb = _embed_view(model, augment, images, batch)
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


@torch.inference_mode()
def query_sets(run: Path, data: Path) -> dict[str, np.ndarray]:
    """Unit penultimate embeddings float32 [N, D] of "calibration" (CIFAR-10 test, first half),
    "id_test" (second half) and every OOD set of OOD_SETS, at the run's model input."""
    from detector_server.preprocess import prepare_arrays
    from trainer.bank import embed_arrays
    from trainer.checkpoint import load_model

    model, info = load_model(run)
    spec = info["preprocess"]

    def emb(name: str) -> np.ndarray:
        images = prepare_arrays(np.load(data / name)["images"], spec)
        return embed_arrays(model, images)["feature"]

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
    emb, _ = bank_views(run, args.data, args.cache, args.views)
    print(f"{len(emb)} x {emb.shape[1]} bank rows from {run}")


if __name__ == "__main__":
    main()
