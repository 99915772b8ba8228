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
