"""`ExportConfig`: every option of one export, validated in one place.

Use it to check the options of `export_bundle` before any work starts; `rwood-export`'s flags map
one to one onto its fields. Functions downstream take explicit arguments, never the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from detector_server.ann import check_search_params
from detector_server.bundle import FEATURE_OUTPUTS, SCORERS
from detector_server.errors import InputError
from detector_server.index_choice import AUTO, DEFAULT_MIN_RECALL
from detector_server.validate import check_int, check_number, is_int

__all__ = ["ExportConfig", "DEFAULT_OPSET", "MIN_OPSET"]

MIN_OPSET = 18       # torch.onnx's exporter (dynamo=True) implements opset 18 and later only
DEFAULT_OPSET = 18   # runs on onnxruntime >= 1.14 (the runtime needs >= 1.17)


@dataclass(frozen=True)
class ExportConfig:
    """Options of `export_bundle` (defaults are rwood-export's)."""

    feature: str = "penultimate"       # indexed embedding: penultimate (authors') | projection
    k: int | None = None               # KNN neighbours; None = the run's k, else
                                       # detector_server.knn.default_k (300 if > 10 classes, else 100)
    tpr: float = 0.95                  # the threshold keeps this fraction of calibration ID images
    calibration: str | None = None     # .npz (key images) or image folder of held-out ID images;
                                       # None = the run's calibration.npz
    scorer: str = "knn"                # knn (index of the bank) | mahalanobis (class Gaussians)
    index_factory: str = AUTO          # "auto" (detector_server.index_choice) or a faiss
                                       # index_factory string; "Flat" = exact search
    search_params: dict[str, int] = field(default_factory=dict)  # fixed nprobe / efSearch; empty
                                       # = tuned at export (approximate indexes)
    min_recall: float = DEFAULT_MIN_RECALL  # least K-th-neighbour recall an approximate index
                                       # may have on the calibration images
    index_memory_mib: float | None = None  # memory limit of an "auto" index (None: none)
    check_ood: tuple[str, ...] = ()    # NAME=PATH OOD sets for the index check's FPR figures
    quantize: str | None = None        # None | a name of exporter.quantize.list_quantizers()
    opset: int = DEFAULT_OPSET         # ONNX opset of model.onnx (>= MIN_OPSET)
    overwrite: bool = False            # replace an existing bundle at the output path
    threads: int | None = None         # CPU threads for calibration scoring (None = all cores)

    def __post_init__(self) -> None:
        from .quantize import list_quantizers  # the registry owns the valid names
        if self.feature not in FEATURE_OUTPUTS:
            raise InputError(f"expected one of {sorted(FEATURE_OUTPUTS)}, got {self.feature!r}",
                             field="feature")
        if self.k is not None:
            check_int(self.k, "k", minimum=1)
        if (not isinstance(self.tpr, (int, float)) or not math.isfinite(self.tpr)
                or not 0 < self.tpr < 1):
            raise InputError(f"expected a number in (0, 1), got {self.tpr!r}", field="tpr")
        if self.scorer not in SCORERS:
            raise InputError(f"expected one of {SCORERS}, got {self.scorer!r}", field="scorer")
        if not isinstance(self.index_factory, str) or not self.index_factory.strip():
            raise InputError(f"expected 'auto' or a faiss index_factory string, got "
                             f"{self.index_factory!r}", field="index")
        object.__setattr__(self, "search_params", check_search_params(self.search_params,
                                                                      "search"))
        check_number(self.min_recall, "min_recall", above=0, maximum=1)
        if self.index_memory_mib is not None:
            check_number(self.index_memory_mib, "index_memory", above=0)
            if self.index_factory != AUTO:
                raise InputError("applies to --index auto only (a given factory string fixes "
                                 "the storage)", field="index_memory")
        if self.scorer == "mahalanobis" and (self.index_factory != AUTO or self.search_params
                                             or self.check_ood):
            raise InputError("--index, --search and --check-ood apply to the knn scorer only",
                             field="scorer")
        if self.quantize is not None and self.quantize not in list_quantizers():
            raise InputError(f"expected one of {list_quantizers()}, got {self.quantize!r}",
                             field="quantize")
        if self.threads is not None:
            check_int(self.threads, "threads", minimum=1)
        if not is_int(self.opset) or self.opset < MIN_OPSET:
            raise InputError(f"expected an integer >= {MIN_OPSET} (torch's ONNX exporter writes "
                             f"opset {MIN_OPSET} and later), got {self.opset!r}", field="opset")
