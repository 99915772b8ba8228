"""The model half of a detector: a bundle's served ONNX model turning model input into the scored
feature, in batches.

Use `Embedder(path, manifest)` where embeddings are needed without a scorer yet: the `Detector`
holds one, and the exporter embeds its calibration images with one before it chooses the index
(so the index is checked on exactly the embeddings the runtime will compute). Device and thread
policy: `runtime.open_session`. Test: tests/runtime/test_detector.py.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from . import runtime
from .bundle import check_model_io
from .errors import InputError
from .manifest import Manifest
from .validate import check_int

__all__ = ["Embedder", "default_max_batch"]

log = logging.getLogger(__name__)


def default_max_batch(size: int) -> int:
    """Images per model call for S x S inputs: 256 at 32x32, fewer for larger ones (16 at least)."""
    return max(16, min(256, 256 * 32 * 32 // (size * size)))


class Embedder:
    """An ONNX Runtime session of a bundle model, checked against the manifest.

    path: the ONNX file (a bundle's served model); manifest: its Manifest (input name and size,
    outputs, the scored feature); device: "auto", "cpu", "cuda" or "cuda:N"; threads: ONNX
    Runtime threads; max_batch: images per model call (default `default_max_batch`).
    Attributes: session, device ("cuda" or "cpu", where it really runs), providers, output (the
    scored output's name), dim, max_batch. Raises BundleError for a model that does not match
    the manifest, InputError for bad options.
    """

    def __init__(self, path: str | os.PathLike, manifest: Manifest, *, device: str = "auto",
                 threads: int, max_batch: int | None = None):
        self.size, self.input_name = manifest.input_size, manifest.input_name
        self.output, self.dim = manifest.indexed_output, manifest.dim
        self.max_batch = (check_int(max_batch, "max_batch", minimum=1) if max_batch is not None
                          else default_max_batch(self.size))
        self.session, self.device = runtime.open_session(path, device, threads)
        self.providers: list[str] = list(self.session.get_providers())
        check_model_io(self.session, manifest, path)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] RGB model input -> float32 [N, D] unit rows (the scored feature).

        Raises InputError naming `images` for anything else."""
        x = self.check_images(images)
        if x.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        parts = [self.session.run([self.output], {self.input_name: x[i:i + self.max_batch]})[0]
                 for i in range(0, x.shape[0], self.max_batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def check_images(self, images: Any) -> np.ndarray:
        """`images` as C-contiguous uint8 [N, S, S, 3]; InputError naming `images` otherwise."""
        s = self.size
        if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
                or images.shape[1:] != (s, s, 3)):
            raise InputError(f"expected uint8 [N, {s}, {s}, 3] model input, got "
                             f"{getattr(images, 'dtype', type(images).__name__)} "
                             f"{getattr(images, 'shape', '')}", field="images")
        return np.ascontiguousarray(images)
