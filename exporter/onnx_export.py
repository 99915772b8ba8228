"""Trace a `DeployModel` to ONNX: uint8 NHWC `image` in, unit `feature` and `projection` out.

Use `export_onnx(model, path, size)` when a trained model must become the runtime's model.onnx.
Path chosen: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), the exporter torch
maintains since 2.9. It writes opset 18 and later (asked for 17 it silently keeps 18, so
`MIN_OPSET` is 18); the legacy TorchScript exporter is deprecated and declares symbolic output
widths. The batch dimension is dynamic (`Dim("batch")`, traced at batch 2 so it is not
specialised to 1); casting, /255 and mean/std live inside the graph (DeployModel.forward).
Test: tests/exporter/test_onnx_export.py.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from detector_server.errors import InputError
from detector_server.validate import is_int

from .config import DEFAULT_OPSET, MIN_OPSET

__all__ = ["export_onnx", "INPUT_NAME", "OUTPUT_NAMES"]

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("feature", "projection")


@contextlib.contextmanager
def _quiet_loggers(names: tuple[str, ...] = ("onnxscript", "onnx_ir", "torch.onnx"),
                   ) -> Iterator[None]:
    """Raise the exporter's chatty INFO loggers to WARNING for the duration (restored after)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@torch.no_grad()
def export_onnx(model: torch.nn.Module, path: str | Path, size: int, *,
                opset: int = DEFAULT_OPSET) -> dict[str, int]:
    """Export `model` (a DeployModel: uint8 [N, size, size, 3] -> (feature, projection)) to `path`.

    Returns the output widths {"feature": Dp, "projection": Dh}. The written file passes
    `onnx.checker.check_model(full_check=True)` and declares input uint8 [batch, size, size, 3]
    and outputs float32 [batch, D]. Weights are stored inside the one file (no external data).
    """
    if not is_int(opset) or opset < MIN_OPSET:
        raise InputError(f"expected an integer >= {MIN_OPSET}, got {opset!r}", field="opset")
    model = model.cpu().eval()
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    outs = model(example)
    widths = {name: int(o.shape[1]) for name, o in zip(OUTPUT_NAMES, outs)}
    batch = torch.export.Dim("batch")
    with contextlib.redirect_stdout(io.StringIO()), _quiet_loggers():  # exporter chatter
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=True,
                          dynamic_shapes={"image": {0: batch}}, external_data=False,
                          optimize=True, verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    got = {o.domain or "": o.version for o in proto.opset_import}.get("", None)
    if got != opset:
        raise InputError(f"torch wrote opset {got}, not the requested {opset}", field="opset")
    log.info("exported ONNX opset %d to %s (%s)", opset, path,
             ", ".join(f"{k} {v}-d" for k, v in widths.items()))
    return widths
