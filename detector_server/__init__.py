"""reweightood runtime: load a bundle and score images, torch-free.

Public API (three names, imported lazily so that `detector_server.preprocess` and friends stay
cheap to import for the trainer):

    from detector_server import load_bundle, Detector, DetectorClient

- `load_bundle(dir) -> Bundle`    open and verify a bundle (detector_server/bundle.py)
- `Detector(bundle)`              ONNX Runtime + FAISS KNN + threshold (detector_server/detector.py)
- `DetectorClient(target, ...)`   gRPC client of `rwood-serve` (detector_server/client.py)
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_bundle", "Detector", "DetectorClient"]

_LAZY = {"load_bundle": ".bundle", "Detector": ".detector", "DetectorClient": ".client"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
