"""Shared fixtures: the real-image data pack in ../shared/data (never committed, never downloaded)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RWOOD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared data pack; tests that need it skip when it is absent."""
    if not (SHARED_DATA / "cifar10_train.npz").exists():
        pytest.skip(f"shared data pack not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar10_small(shared_data: Path) -> dict[str, np.ndarray]:
    """First 2,000 CIFAR-10 training images (200 per class, round-robin rows) and the class names."""
    d = np.load(shared_data / "cifar10_train.npz")
    return {"images": d["images"][:2000], "labels": d["labels"][:2000], "classes": d["classes"]}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A real run directory: small_cnn trained 1 epoch on 1,000 CIFAR-10 images (CPU, seeded).

    Shared by evaluation, export, server and scoring tests; treat it as read-only.
    """
    import torch

    from trainer.config import resolve_config
    from trainer.train import train

    root = tmp_path_factory.mktemp("tiny_run")
    d = np.load(shared_data / "cifar10_train.npz")
    npz = root / "cifar10_1k.npz"
    np.savez(npz, images=d["images"][:1000], labels=d["labels"][:1000], classes=d["classes"])
    torch.set_num_threads(2)
    cfg = resolve_config(overrides=dict(dataset="npz", data=str(npz), arch="small_cnn", epochs=1,
                                        batch_size=128, lr=0.05, out=str(root / "run"),
                                        device="cpu", seed=0, k=10))
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle exported from `tiny_run` with default options (read-only)."""
    from exporter.export import export_bundle

    return export_bundle(tiny_run, tmp_path_factory.mktemp("tiny_bundle") / "bundle", k=10)
