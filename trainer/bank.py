"""Embedding extraction and the in-distribution embedding bank.

Use `embed_arrays` to run a `DeployModel` over uint8 images in batches (evaluation, export,
benchmarks) and `write_bank` after training. The bank holds the L2-normalised penultimate and
projection embeddings of the training images under the evaluation transform (no augmentation),
which KNN scoring searches; the calibration split is never in it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from detector_server.atomic import atomic_write
from detector_server.errors import InputError

__all__ = ["embed_arrays", "write_bank", "read_bank"]


@torch.no_grad()
def embed_arrays(model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 512,
                 device: str | torch.device = "cpu", progress: bool = False,
                 desc: str = "embedding") -> dict[str, np.ndarray]:
    """Embed uint8 images [N, S, S, 3] with a DeployModel.

    Returns {"feature": float32 [N, Dp], "projection": float32 [N, Dh]}, rows L2-normalised.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise InputError(f"expected uint8 [N, S, S, 3], got {getattr(images, 'dtype', type(images))} "
                         f"{getattr(images, 'shape', '')}", field="images")
    model = model.to(device).eval()
    feats, projs = [], []
    steps = range(0, len(images), batch_size)
    for i in tqdm(steps, desc=desc, unit="batch", disable=None if progress else True, leave=False):
        x = torch.from_numpy(images[i:i + batch_size]).to(device, non_blocking=True)
        f, p = model(x)
        feats.append(f.float().cpu().numpy())
        projs.append(p.float().cpu().numpy())
    if not feats:
        raise InputError("no images to embed", field="images")
    return {"feature": np.concatenate(feats), "projection": np.concatenate(projs)}


def write_bank(path: str | Path, embeddings: dict[str, np.ndarray], labels: np.ndarray,
               indices: np.ndarray, class_names: list[str]) -> None:
    """Write bank.npz atomically (keys: penultimate, projection, labels, indices, class_names)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, penultimate=embeddings["feature"].astype(np.float32),
                     projection=embeddings["projection"].astype(np.float32),
                     labels=labels.astype(np.int64), indices=indices.astype(np.int64),
                     class_names=np.asarray(class_names, dtype=str))
    atomic_write(path, write)


def read_bank(path: str | Path) -> dict[str, np.ndarray]:
    """Read bank.npz (no pickles); DataError-style checks are the caller's (it knows the run)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
