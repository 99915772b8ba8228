"""Shared fixtures: real images that ship inside scikit-learn (see real_images.py), and the
optional CIFAR/MNIST/DTD data pack in ../shared/data (never committed, never downloaded).

Everything runs on a bare clone except the few tests about the pack itself, marked
`@pytest.mark.cifar_pack`: they skip, saying how to enable them, when the pack is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import real_images

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RWOOD_SHARED_DATA", REPO.parent / "shared" / "data"))
PACK_MISSING = (f"CIFAR data pack not found at {SHARED_DATA}: to run this test, put the pack at "
                "../shared/data beside the clone or set RWOOD_SHARED_DATA to its folder")


def _have_pack() -> bool:
    return (SHARED_DATA / "cifar10_train.npz").exists()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads the pack must say so with the marker (so it skips with the hint)."""
    unmarked = [i.nodeid for i in items if {"shared_data", "cifar10_small"} & set(
        getattr(i, "fixturenames", ())) and i.get_closest_marker("cifar_pack") is None]
    if unmarked:
        raise pytest.UsageError("tests that read the data pack need @pytest.mark.cifar_pack: "
                                + ", ".join(unmarked))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cifar_pack") is not None and not _have_pack():
        pytest.skip(PACK_MISSING)


# ---------------------------------------------------------------------------- the CIFAR pack
@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the data pack (only for tests marked cifar_pack)."""
    if not _have_pack():
        pytest.skip(PACK_MISSING)
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar10_small(shared_data: Path) -> dict[str, np.ndarray]:
    """First 2,000 CIFAR-10 training images (200 per class, round-robin rows) and the class names."""
    d = np.load(shared_data / "cifar10_train.npz")
    return {"images": d["images"][:2000], "labels": d["labels"][:2000], "classes": d["classes"]}


# ---------------------------------------------------------------------------- shipped images
@pytest.fixture(scope="session")
def digits_small() -> dict[str, np.ndarray]:
    """1,400 training digits (140 per class, round-robin rows: any prefix is balanced):
    images uint8 [1400, 32, 32, 3], labels int64, classes "0".."9" (read-only)."""
    return real_images.digits_round_robin()


@pytest.fixture(scope="session")
def id_images() -> np.ndarray:
    """755 in-distribution images the tiny run never saw (not trained, banked or calibrated on):
    uint8 [755, 32, 32, 3] (read-only)."""
    return real_images.digits_unseen()


@pytest.fixture(scope="session")
def ood_images() -> np.ndarray:
    """300 far-OOD colour images, crops of two photographs: uint8 [300, 32, 32, 3] (read-only)."""
    return real_images.photo_patches()


@pytest.fixture(scope="session")
def photo_jpeg_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """100 real JPEG files of various sizes (real_images.photo_jpegs), photo000.jpg ... (read-only)."""
    root = tmp_path_factory.mktemp("photo_jpegs")
    paths = []
    for i, data in enumerate(real_images.photo_jpegs()):
        paths.append(root / f"photo{i:03d}.jpg")
        paths[-1].write_bytes(data)
    return paths


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, digits_small: dict) -> Path:
    """A real run directory: small_cnn trained 1 epoch on 1,000 training digits (CPU, seeded).

    Shared by evaluation, export, server and scoring tests; treat it as read-only.
    """
    import torch

    from trainer.config import resolve_config
    from trainer.train import train

    root = tmp_path_factory.mktemp("tiny_run")
    n = real_images.TINY_RUN_ROWS
    npz = root / "digits_1k.npz"
    np.savez(npz, images=digits_small["images"][:n], labels=digits_small["labels"][:n],
             classes=digits_small["classes"])
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
