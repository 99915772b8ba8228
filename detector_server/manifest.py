"""The bundle manifest: the one definition of `manifest.json`, what a bundle holds and promises.

Use `Manifest` (with `IndexInfo` or `MahalanobisInfo`, and `ThresholdInfo`) to build the manifest
the exporter writes or to validate one a loader read (`Manifest.from_dict` raises a BundleError
naming the field), `manifest_digest` for the checksum that protects it, and `derive_model_version`
for the bundle's version (`write_bundle` sets it: it changes with anything that changes a score or
a decision, the scorer and the index's search parameters included). Reading and writing bundle
directories (checksums of the files, the ONNX model check, the atomic publish) is
`detector_server.bundle`, which re-exports every name here: import them from there. No ONNX
Runtime or FAISS.

Versions: 2 adds the scorer ("knn" with an index, or "mahalanobis" with class means and a
precision matrix instead) and, for the index, its search parameters and the export-time check
against exact search. Version 1 manifests (KNN, no search parameters: Flat needs none) still load.
Test: tests/runtime/test_bundle.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError, InputError
from .preprocess import PreprocessSpec
from .validate import is_int

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST_FILE", "FEATURE_OUTPUTS",
           "SCORERS", "IndexInfo", "MahalanobisInfo", "ThresholdInfo", "BankInfo", "Manifest",
           "manifest_digest", "check_file_name", "DESCRIPTIVE_FIELDS", "DESCRIPTIVE_BANK_FIELDS",
           "decision_digest",
           "derive_model_version", "version_name"]

FORMAT = "reweightood-bundle"
FORMAT_VERSION = 2                      # what the exporter writes; bump on incompatible changes
READABLE_VERSIONS = (1, 2)              # what this runtime loads (1: KNN without search params)
MANIFEST_FILE = "manifest.json"
# The one table of indexable features: feature name (bank.npz key, --feature, index.feature)
# -> the model output holding it (ONNX output, DeployModel output, embed_arrays key).
FEATURE_OUTPUTS: dict[str, str] = {"penultimate": "feature", "projection": "projection"}
METRICS = ("inner_product",)            # unit rows: inner product ranks like L2 (DESIGN section 2)
SCORERS = ("knn", "mahalanobis")
# The manifest fields that describe a bundle but never change a score or a decision. The model
# version leaves out these and nothing else: every other field counts, new ones included, so a
# field added later (a scorer setting, a search parameter) changes the version by construction.
DESCRIPTIVE_FIELDS = ("model_version", "manifest_sha256", "created", "training")
DESCRIPTIVE_BANK_FIELDS = ("lineage",)  # inside `bank`: the edit history (when, from where)
_VERSION_HEX = 12                       # hex digits of the decision digest in model_version
_VERSION_SUFFIX = re.compile(rf"-[0-9a-f]{{{_VERSION_HEX}}}\Z")


@dataclass(frozen=True)
class IndexInfo:
    """The FAISS index of the bundle and what it holds."""

    ntotal: int                         # rows in the index (= len(labels))
    dim: int                            # embedding width (= the indexed output's width)
    file: str = "index.faiss"
    feature: str = "penultimate"        # a key of FEATURE_OUTPUTS
    factory: str = "Flat"               # the faiss.index_factory string it was built with
    metric: str = "inner_product"
    search_params: dict[str, int] = field(default_factory=dict)  # set at load: nprobe, efSearch
    choice: dict[str, Any] | None = None  # how export chose it: requested, reason, check, trials
    check: dict[str, Any] | None = None   # ann_check.SearchCheck.to_dict() (non-Flat only)


@dataclass(frozen=True)
class MahalanobisInfo:
    """The Mahalanobis scorer's parameters: class means and the shared precision matrix."""

    dim: int                            # feature width D
    n_bank: int                         # bank rows they were fitted on
    means_file: str = "mahalanobis_means.npy"            # float64 [C, D], C = len(class_names)
    precision_file: str = "mahalanobis_precision.npy"    # float64 [D, D], symmetric
    feature: str = "penultimate"        # a key of FEATURE_OUTPUTS

    @property
    def files(self) -> tuple[str, str]:
        return self.means_file, self.precision_file


@dataclass(frozen=True)
class ThresholdInfo:
    """The decision threshold (score < value means OOD) and how it was calibrated."""

    value: float                        # score threshold (KNN or Mahalanobis, as the scorer)
    target_tpr: float                   # TPR asked for (0.95)
    achieved_tpr: float                 # fraction of calibration scores >= value
    n_samples: int                      # calibration images used
    source: str                         # where they came from, e.g. "run:calibration.npz"


@dataclass(frozen=True)
class BankInfo:
    """Where the bank rows came from and how the bank was edited since export (optional: a bundle
    without it has rows of unknown origin, no calibration embeddings and no lineage)."""

    sources_file: str = "sources.json"  # per-row origin, index, path (detector_server.bank_sources)
    calibration_embeddings_file: str | None = None  # float32 [M, D] (.npy) embeddings of the
                                        # calibration images (those of Manifest.calibration_file's
                                        # scores): rwood-bank scores them again after an edit
    lineage: tuple[dict[str, Any], ...] = ()   # one entry per rwood-bank edit, oldest first

    def __post_init__(self) -> None:
        check_file_name(self.sources_file, "bank.sources_file")
        if self.calibration_embeddings_file is not None:
            check_file_name(self.calibration_embeddings_file, "bank.calibration_embeddings_file")
        if (isinstance(self.lineage, (str, dict))
                or not all(isinstance(e, dict) for e in self.lineage)):
            raise BundleError(f"expected a list of objects, got {self.lineage!r}",
                              field="bank.lineage")
        object.__setattr__(self, "lineage", tuple(self.lineage))

    @property
    def files(self) -> tuple[str, ...]:
        emb = self.calibration_embeddings_file
        return (self.sources_file,) + ((emb,) if emb else ())


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about a bundle; `manifest.json` is `to_dict()`.

    `files` maps every file of the bundle except manifest.json to its SHA-256 (hex), and
    `manifest_sha256` protects the manifest itself (an edited threshold or K is refused: change
    them by exporting again); `model_version` is `derive_model_version` of the rest; all three
    are filled in by `write_bundle`. File names are plain names inside the bundle directory.
    """

    model_version: str                  # "<run name>-<decision digest[:12]>" (derive_model_version)
    input_size: int                     # S: input is uint8 [N, S, S, 3]
    outputs: dict[str, int]             # ONNX output -> width: {"feature": Dp, "projection": 128}
    preprocess: dict[str, Any]          # PreprocessSpec.to_dict()
    index: IndexInfo | None             # the KNN scorer's index (None for mahalanobis)
    class_names: tuple[str, ...]
    k: int | None                       # neighbours for the KNN score (None for mahalanobis)
    threshold: ThresholdInfo
    model_file: str = "model.onnx"      # the float32 model
    served_file: str = "model.onnx"     # the model the runtime runs (model_file or the int8 one)
    input_name: str = "image"
    labels_file: str = "labels.npy"
    quantization: dict[str, Any] | None = None   # how served_file was quantised, None for float
    calibration_file: str | None = None  # float32 [threshold.n_samples]: the calibration images'
                                        # scores (drift reference); None in older bundles
    training: dict[str, Any] = field(default_factory=dict)  # run name, config, data fingerprint
    created: str = ""                   # ISO time of export
    bank: BankInfo | None = None        # row sources, calibration embeddings, edit lineage
    files: dict[str, str] = field(default_factory=dict)
    manifest_sha256: str = ""           # SHA-256 of the other fields (see manifest_digest)
    scorer: str = "knn"                 # one of SCORERS
    mahalanobis: MahalanobisInfo | None = None   # the mahalanobis scorer's parameters
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise BundleError(f"expected {FORMAT!r}, got {self.format!r}", field="format")
        if self.format_version not in READABLE_VERSIONS:
            raise BundleError(f"unknown format version {self.format_version!r}; this runtime reads "
                              f"versions {READABLE_VERSIONS} (re-export with a matching "
                              "rwood-export)", field="format_version")
        for name in ("model_file", "served_file", "labels_file"):
            check_file_name(getattr(self, name), name)
        if self.calibration_file is not None:
            check_file_name(self.calibration_file, "calibration_file")
        _check_scorer(self)
        try:
            spec = PreprocessSpec.from_dict(self.preprocess)
        except InputError as e:
            raise BundleError(str(e), field="preprocess") from None
        if spec.size != self.input_size:
            raise BundleError(f"preprocess size {spec.size} != input_size {self.input_size}",
                              field="input_size")
        _check_threshold(self.threshold)
        if (isinstance(self.class_names, str) or not self.class_names
                or not all(isinstance(c, str) for c in self.class_names)):
            raise BundleError(f"expected a list of class names, got {self.class_names!r}",
                              field="class_names")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if not isinstance(self.model_version, str) or not self.model_version:
            raise BundleError(f"expected a non-empty string, got {self.model_version!r}",
                              field="model_version")
        _check_json(self)

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    @property
    def feature(self) -> str:
        """The scored feature (a key of FEATURE_OUTPUTS), whichever the scorer."""
        return self.index.feature if self.scorer == "knn" else self.mahalanobis.feature

    @property
    def dim(self) -> int:
        """Width of the scored feature."""
        return self.index.dim if self.scorer == "knn" else self.mahalanobis.dim

    @property
    def indexed_output(self) -> str:
        """Name of the ONNX output the scorer reads ("feature" or "projection")."""
        return FEATURE_OUTPUTS[self.feature]

    @property
    def payload_files(self) -> tuple[str, ...]:
        """The files the bundle must hold besides manifest.json (each once)."""
        models = (self.model_file, self.served_file)
        calibration = () if self.calibration_file is None else (self.calibration_file,)
        scorer = ((self.index.file, self.labels_file) if self.scorer == "knn"
                  else self.mahalanobis.files)
        bank = self.bank.files if self.bank else ()
        return tuple(dict.fromkeys(models + scorer + calibration + bank))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        if self.bank is None:           # bundles without sources keep their exact old manifest
            del d["bank"]
        else:
            d["bank"]["lineage"] = list(self.bank.lineage)
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str | os.PathLike | None = None) -> "Manifest":
        """Build and validate a manifest from parsed JSON; BundleError naming `path` and field."""
        if not isinstance(d, dict):
            raise BundleError(f"expected a JSON object, got {type(d).__name__}", path=path)
        try:
            if d.get("format") != FORMAT or d.get("format_version") not in READABLE_VERSIONS:
                return cls._check_version_only(d)  # raises with a clear message
            kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
            for key, sub in (("index", IndexInfo), ("mahalanobis", MahalanobisInfo)):
                if d.get(key) is not None:
                    kw[key] = sub(**_sub(d, key, sub))
            kw["threshold"] = ThresholdInfo(**_sub(d, "threshold", ThresholdInfo))
            if d.get("bank") is not None:
                kw["bank"] = BankInfo(**_sub(d, "bank", BankInfo))
            missing = [f.name for f in dataclasses.fields(cls)
                       if f.name not in kw and f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING]
            if missing:
                raise BundleError(f"missing key(s) {missing}", field=missing[0])
            return cls(**kw)
        except BundleError as e:
            raise BundleError(str(e), path=path) from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"malformed manifest: {e}", path=path) from None

    @classmethod
    def _check_version_only(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT:
            raise BundleError(f"not a reweightood bundle: expected {FORMAT!r}, got "
                              f"{d.get('format')!r}", field="format")
        raise BundleError(f"unknown format version {d.get('format_version')!r}; this runtime "
                          f"reads versions {READABLE_VERSIONS}", field="format_version")


def _sub(d: dict[str, Any], key: str, cls: type) -> dict[str, Any]:
    sub = d.get(key)
    if not isinstance(sub, dict):
        raise BundleError(f"expected an object, got {type(sub).__name__}", field=key)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(sub) - names)
    if unknown:
        raise BundleError(f"unknown key(s) {unknown}", field=key)
    return sub


def check_file_name(name: Any, fld: str) -> None:
    """Refuse (BundleError on field `fld`) anything but a plain, visible file name inside the
    bundle directory other than manifest.json."""
    if not isinstance(name, str) or not name or name != Path(name).name or name.startswith("."):
        raise BundleError(f"expected a plain file name inside the bundle, got {name!r}", field=fld)
    if name == MANIFEST_FILE:
        raise BundleError(f"{MANIFEST_FILE} cannot be a payload file", field=fld)


def _check_scorer(m: Manifest) -> None:
    """The scorer and its own section: index + k for knn, mahalanobis parameters otherwise."""
    if m.scorer not in SCORERS:
        raise BundleError(f"expected one of {SCORERS}, got {m.scorer!r}", field="scorer")
    knn = m.scorer == "knn"
    for name, present in (("index", knn), ("mahalanobis", not knn)):
        wanted = IndexInfo if name == "index" else MahalanobisInfo
        value = getattr(m, name)
        if present and not isinstance(value, wanted):
            raise BundleError(f"the {m.scorer} scorer needs this section", field=name)
        if not present and value is not None:
            raise BundleError(f"must be null for the {m.scorer} scorer", field=name)
    if not knn:
        for name in ("k", "bank"):     # no neighbours, no bank rows
            if getattr(m, name) is not None:
                raise BundleError("must be null for the mahalanobis scorer", field=name)
        mh = m.mahalanobis
        check_file_name(mh.means_file, "mahalanobis.means_file")
        check_file_name(mh.precision_file, "mahalanobis.precision_file")
        if mh.means_file == mh.precision_file:
            raise BundleError(f"means and precision need two files, got {mh.means_file!r} twice",
                              field="mahalanobis.precision_file")
        if not (is_int(mh.n_bank) and mh.n_bank >= 1):
            raise BundleError(f"expected a positive integer, got {mh.n_bank!r}",
                              field="mahalanobis.n_bank")
        _check_feature(m, mh.feature, mh.dim, "mahalanobis")
        return
    ix = m.index
    check_file_name(ix.file, "index.file")
    _check_feature(m, ix.feature, ix.dim, "index")
    if ix.metric not in METRICS:
        raise BundleError(f"expected one of {METRICS}, got {ix.metric!r}", field="index.metric")
    if not (is_int(m.k) and m.k >= 1) or not (is_int(ix.ntotal) and ix.ntotal >= 1) or m.k > ix.ntotal:
        raise BundleError(f"expected 1 <= k <= ntotal, got k={m.k!r}, ntotal={ix.ntotal!r}",
                          field="k")
    sp = ix.search_params
    if not isinstance(sp, dict) or not all(isinstance(n, str) and n.isidentifier() and is_int(v)
                                           and v >= 1 for n, v in sp.items()):
        raise BundleError(f"expected parameter name -> positive integer, got {sp!r}",
                          field="index.search_params")
    for name in ("choice", "check"):
        if not isinstance(getattr(ix, name), (dict, type(None))):
            raise BundleError("expected an object or null", field=f"index.{name}")


def _check_feature(m: Manifest, feature: Any, dim: Any, section: str) -> None:
    """`feature` names a model output of width `dim` (BundleError on `section`.feature/.dim)."""
    if not isinstance(m.outputs, dict) or not m.outputs or not all(
            isinstance(k, str) and (is_int(v) and v >= 1) for k, v in m.outputs.items()):
        raise BundleError(f"expected output name -> positive width, got {m.outputs!r}",
                          field="outputs")
    if not (is_int(dim) and dim >= 1):
        raise BundleError(f"expected a positive integer, got {dim!r}", field=f"{section}.dim")
    if feature not in FEATURE_OUTPUTS:
        raise BundleError(f"expected one of {sorted(FEATURE_OUTPUTS)}, got {feature!r}",
                          field=f"{section}.feature")
    out = FEATURE_OUTPUTS[feature]
    if out not in m.outputs:
        raise BundleError(f"expected an entry for {out!r}, got {m.outputs!r}", field="outputs")
    if m.outputs[out] != dim:
        raise BundleError(f"{section} dim {dim} != width of output {out!r} ({m.outputs[out]})",
                          field=f"{section}.dim")


def _check_threshold(t: ThresholdInfo) -> None:
    if not isinstance(t.value, (int, float)) or not math.isfinite(t.value):
        raise BundleError(f"expected a finite number, got {t.value!r}", field="threshold.value")
    for name in ("target_tpr", "achieved_tpr"):
        v = getattr(t, name)
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise BundleError(f"expected a number in [0, 1], got {v!r}", field=f"threshold.{name}")
    if not is_int(t.n_samples) or t.n_samples < 0:
        raise BundleError(f"expected a count, got {t.n_samples!r}", field="threshold.n_samples")


def _check_json(m: Manifest) -> None:
    """Every field must be strict JSON: a NaN or infinity (Python's json reads them) in a free-form
    field such as `training` would otherwise get past the checks above and fail the checksum."""
    for name, value in m.to_dict().items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise BundleError(f"expected plain JSON values (no NaN or infinity): {e}",
                              field=name) from None


def _json_sha256(value: Any) -> str:
    """SHA-256 (hex) of canonical JSON: sorted keys, compact, no NaN or infinity (ValueError)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_digest(d: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest dict's canonical JSON (sorted keys, compact), less manifest_sha256."""
    return _json_sha256({k: v for k, v in d.items() if k != "manifest_sha256"})


def decision_digest(d: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of everything in a manifest dict that can change a score or a decision.

    `d` is `Manifest.to_dict()` with `files` filled in (ValueError without: the payload is what
    the digest is mostly about). It is the canonical JSON of `d` less DESCRIPTIVE_FIELDS (the
    version itself, the manifest checksum, the export time, the training metadata) and the
    bank's edit history (DESCRIPTIVE_BANK_FIELDS: its times and origins), so it
    covers every payload byte through `files` (models, index, labels, any file a scorer adds)
    and every setting: K, the threshold, the indexed feature, the index factory, preprocessing,
    class names, the served model and its quantisation, and any field added later."""
    if not d.get("files"):
        raise ValueError("decision_digest needs the payload checksums ('files')")
    body = {k: v for k, v in d.items() if k not in DESCRIPTIVE_FIELDS}
    if isinstance(body.get("bank"), Mapping):
        body["bank"] = {k: v for k, v in body["bank"].items() if k not in DESCRIPTIVE_BANK_FIELDS}
    return _json_sha256(body)


def derive_model_version(name: str, d: Mapping[str, Any]) -> str:
    """The model_version of the bundle whose manifest dict is `d`: `"<name>-<12 hex digits of
    decision_digest(d)>"`, e.g. "run7-3f9a0c1d2e4b".

    `name` is the human-readable part (the run name). Two bundles get the same version only if
    every decision-relevant byte is equal, so score tables (`rwood-score --resume`), metrics and
    GetInfo tell them apart. `write_bundle` calls it: every writer of bundles goes through it."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"expected a non-empty version name, got {name!r}")
    return f"{name}-{decision_digest(d)[:_VERSION_HEX]}"


def version_name(version: str) -> str:
    """The human-readable part of a model_version: `version` less the "-<12 hex digits>" that
    `derive_model_version` appends (unchanged when there is none)."""
    return _VERSION_SUFFIX.sub("", version) or version
