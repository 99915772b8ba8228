"""reweightood exporter: a training run -> a deployable bundle (torch, onnx, faiss).

Use `export_bundle(run_dir, out, ...)` (or `rwood-export`). Modules and their tests:
- config.py       `ExportConfig` (validated options)           tests/exporter/test_export.py
- onnx_export.py  `export_onnx` (DeployModel -> model.onnx)     tests/exporter/test_onnx_export.py
- calibrate.py    calibration images (threshold: runtime)       tests/exporter/test_export.py
- quantize.py     quantiser registry, `quantize_int8`           tests/exporter/test_export.py
- export.py       `export_bundle` (the whole pipeline)          tests/exporter/test_export.py
- cli.py          `rwood-export` (click, parsing only)          tests/exporter/test_cli.py
The bundle format itself is defined in detector_server/bundle.py.
"""
from __future__ import annotations

__all__ = ["export_bundle"]


def __getattr__(name: str):
    if name == "export_bundle":
        from .export import export_bundle
        return export_bundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
