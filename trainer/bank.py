"""Embedding extraction: what fills the in-distribution embedding bank.

Use `embed_arrays` to run a `DeployModel` over uint8 images in batches (the bank after training,
evaluation, export, benchmarks). The bank (`trainer.run_dir.write_bank`) holds the L2-normalised
penultimate and projection embeddings of the training images under the evaluation transform (no
augmentation), which KNN scoring searches; the calibration split is never in it.
"""
from __future__ import annotations

import numpy as np
import torch

from detector_server.errors import InputError

from .progress import Progress

__all__ = ["embed_arrays"]


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
    for i in Progress(steps, desc=f"{desc} ({len(images):,} images)", unit="batches",
                      enabled=progress):
        x = torch.from_numpy(images[i:i + batch_size]).to(device, non_blocking=True)
        f, p = model(x)
        feats.append(f.float().cpu().numpy())
        projs.append(p.float().cpu().numpy())
    if not feats:
        raise InputError("no images to embed", field="images")
    return {"feature": np.concatenate(feats), "projection": np.concatenate(projs)}
