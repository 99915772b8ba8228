"""Real embeddings and hand-made bundles for the approximate-index tests (imported by test_ann.py,
test_index_choice.py, test_mahalanobis.py, test_bundle_scorers.py, test_server_scorer.py).

The bank is the tiny run's bank.npz (penultimate rows of 950 training digits under the run's
small_cnn); queries are the same network's embeddings (through the exported bundle) of 500 digits
the run never saw (in-distribution, never in the bank) and 300 photo patches (OOD), all images
that ship with scikit-learn (tests/real_images.py). Larger banks repeat the real rows with small
Gaussian noise, renormalised.
"""
from __future__ import annotations

import dataclasses
import shutil
from functools import lru_cache
from pathlib import Path

import faiss
import numpy as np

from detector_server import ann
from detector_server.bundle import Manifest, load_bundle, staging_dir, write_bundle
from detector_server.knn import build_index

K = 100


@lru_cache(maxsize=1)
def real_embeddings(tiny_run: Path, tiny_bundle: Path) -> dict[str, np.ndarray]:
    """{"bank": float32 [950, 128], "labels": int64 [950], "id": float32 [500, 128] (unseen
    digits), "ood": float32 [300, 128] (photo patches)}; every row unit-norm."""
    import real_images

    from detector_server.detector import Detector

    with np.load(tiny_run / "bank.npz") as f:
        bank, labels = f["penultimate"], f["labels"]
    det = Detector(tiny_bundle, device="cpu", threads=1)
    return {"bank": bank, "labels": labels, "id": det.embed(real_images.digits_unseen()[:500]),
            "ood": det.embed(real_images.photo_patches()[:300])}


def noisy_copies(x: np.ndarray, copies: int, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """x [N, D] then copies - 1 noisy copies of it, rows renormalised: float32 [copies * N, D]."""
    rng = np.random.default_rng(seed)
    parts = [x] + [x + rng.normal(0, noise, x.shape).astype(np.float32) for _ in range(copies - 1)]
    out = np.concatenate(parts)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def publish(src: Path, out: Path, manifest: Manifest, replace: dict | None = None) -> Path:
    """A bundle at `out`: `manifest`'s payload files from `src` (models, calibration scores,
    bank sources) but those of `replace` {name: writer(path)}, which are written instead."""
    with staging_dir(out) as stage:
        for name in manifest.payload_files:
            if name not in (replace or {}) and (src / name).is_file():
                shutil.copy(src / name, stage / name)
        for name, write in (replace or {}).items():
            write(stage / name)
        return write_bundle(stage, manifest, out)


def ivf_bundle(tiny_bundle: Path, out: Path, factory: str, params: dict[str, int],
                file_params: dict[str, int] | None = None, k: int | None = None) -> Path:
    """tiny_bundle's bank in a `factory` index; the manifest records `params`, the index file
    itself carries `file_params` (faiss writes nprobe too)."""
    b = load_bundle(tiny_bundle, verify_model=False)
    bank = faiss.read_index(str(tiny_bundle / "index.faiss")).reconstruct_n(0, b.manifest.index.ntotal)
    index = build_index(bank, factory)
    ann.apply_search_params(index, file_params or {})
    m = b.manifest
    m = dataclasses.replace(m, k=k or m.k, index=dataclasses.replace(m.index, factory=factory,
                                                                     search_params=params))
    return publish(tiny_bundle, out, m, {
        "index.faiss": lambda p: faiss.write_index(index, str(p)),
        "labels.npy": lambda p: np.save(p, b.labels)})
