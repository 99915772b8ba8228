"""Post-training static quantisation of the float ONNX model (`rwood-export --quantize int8`).

Use `get_quantizer(name)(float_path, out_path, images)` to write a quantised copy of model.onnx
beside it; the bundle then serves the copy and records the returned description in the manifest.
Registered quantisers (`list_quantizers()`):
- ``int8``: onnxruntime.quantization static quantisation, QDQ format, int8 weights per output
  channel, uint8 activations (the U8S8 pair x86 VNNI kernels run fastest), MinMax ranges from
  calibration images. Only Conv, Gemm and MatMul are quantised: the cast/normalise prologue and
  the final L2 normalisation stay float, so embeddings remain unit rows.
  The calibration images are the run's held-out calibration split (or the --calibration set):
  real in-distribution images at model input, never in the index. (The bank's training images
  are not stored in the run, only their indices.)
Test: tests/exporter/test_export.py.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from detector_server.errors import InputError

__all__ = ["register_quantizer", "list_quantizers", "get_quantizer", "quantize_int8",
           "QUANTIZED_FILES"]

log = logging.getLogger(__name__)

Quantizer = Callable[..., dict[str, Any]]
_QUANTIZERS: dict[str, Quantizer] = {}
QUANTIZED_FILES: dict[str, str] = {}    # quantiser name -> file name inside the bundle


def register_quantizer(name: str, file_name: str) -> Callable[[Quantizer], Quantizer]:
    """Register `fn(float_path, out_path, images, *, input_name) -> description` under `name`."""
    def deco(fn: Quantizer) -> Quantizer:
        if name in _QUANTIZERS:
            raise ValueError(f"quantizer {name!r} registered twice")
        _QUANTIZERS[name], QUANTIZED_FILES[name] = fn, file_name
        return fn
    return deco


def list_quantizers() -> list[str]:
    return sorted(_QUANTIZERS)


def get_quantizer(name: str) -> Quantizer:
    if name not in _QUANTIZERS:
        raise InputError(f"expected one of {list_quantizers()}, got {name!r}", field="quantize")
    return _QUANTIZERS[name]


class _ArrayReader(CalibrationDataReader):
    """Feeds uint8 [N, S, S, 3] images to the calibrator in batches."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = 32):
        self._it: Iterator[dict[str, np.ndarray]] = (
            {input_name: np.ascontiguousarray(images[i:i + batch])}
            for i in range(0, len(images), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


@register_quantizer("int8", "model.int8.onnx")
def quantize_int8(float_path: str | Path, out_path: str | Path, images: np.ndarray, *,
                  input_name: str = "image", max_images: int = 512) -> dict[str, Any]:
    """Write a static int8 (QDQ) copy of `float_path` to `out_path`; see the module docstring.

    images: uint8 [N, S, S, 3] in-distribution calibration images (the first `max_images`,
    evenly spread, are used). Returns the manifest's `quantization` description.
    """
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
            or not len(images)):
        raise InputError("expected non-empty uint8 [N, S, S, 3] calibration images", field="images")
    pick = np.linspace(0, len(images) - 1, min(max_images, len(images))).round().astype(int)
    sample = images[np.unique(pick)]
    ops = ["Conv", "Gemm", "MatMul"]
    with tempfile.TemporaryDirectory(prefix="rwood-quant-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        # ONNX shape inference + ORT graph optimisation; the symbolic pass cannot follow the
        # Expand of the L2 normalisation, and ONNX's own shape inference is enough here.
        quant_pre_process(str(float_path), str(prepped), skip_symbolic_shape=True)
        quantize_static(str(prepped), str(out_path), _ArrayReader(sample, input_name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=ops,
                        calibration_providers=["CPUExecutionProvider"])
    log.info("quantised to int8 (QDQ, %s) on %d calibration images -> %s", "/".join(ops),
             len(sample), out_path)
    return {"method": "onnxruntime static", "type": "int8", "format": "QDQ",
            "weights": "int8 symmetric, per channel", "activations": "uint8 asymmetric",
            "ops": ops, "calibrate_method": "MinMax", "calibration_images": int(len(sample))}
