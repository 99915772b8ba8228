"""The bundle format: the one definition of what `rwood-export` writes and the runtime reads.

Use `load_bundle(dir)` to open and verify a bundle (torch-free), `write_bundle(staging, manifest,
out)` to publish one atomically (the exporter), and `check_model_io` to check an ONNX Runtime
session against a manifest. A bundle is one flat directory:

    manifest.json     `Manifest.to_dict()` as JSON (format, version, threshold, K, checksums, ...)
    model.onnx        input `image` uint8 [N, S, S, 3]; outputs `feature`, `projection`
                      float32 [N, D]
    model.int8.onnx   optional quantised copy (`Manifest.served_file` says which is served)
    index.faiss       faiss.write_index of the indexed feature's bank rows (inner product)
    labels.npy        int64 [ntotal], the class of each indexed row (np.load(allow_pickle=False))

Loading refuses, with a `BundleError` naming the file, a bundle whose manifest is missing or of
an unknown format/version, a file that is missing or whose SHA-256 differs from the manifest, and
a model whose input/outputs do not match the manifest. Test: tests/runtime/test_bundle.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ._faiss import faiss
from .atomic import fsync_dir, fsync_file, write_json_atomic
from .errors import BundleError, InputError
from .knn import FEATURE_OUTPUTS
from .preprocess import PreprocessSpec
from .validate import is_int

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_FILE", "FEATURE_OUTPUTS", "IndexInfo",
           "ThresholdInfo", "Manifest", "Bundle", "load_bundle", "write_bundle", "staging_dir",
           "check_model_io", "file_sha256", "manifest_digest"]

log = logging.getLogger(__name__)

FORMAT = "reweightood-bundle"
FORMAT_VERSION = 1                      # bump on any incompatible change; loaders refuse others
MANIFEST_FILE = "manifest.json"
METRICS = ("inner_product",)            # unit rows: inner product ranks like L2 (DESIGN section 2)


@dataclass(frozen=True)
class IndexInfo:
    """The FAISS index of the bundle and what it holds."""

    ntotal: int                         # rows in the index (= len(labels))
    dim: int                            # embedding width (= the indexed output's width)
    file: str = "index.faiss"
    feature: str = "penultimate"        # a key of FEATURE_OUTPUTS
    factory: str = "Flat"               # the faiss.index_factory string it was built with
    metric: str = "inner_product"


@dataclass(frozen=True)
class ThresholdInfo:
    """The decision threshold (score < value means OOD) and how it was calibrated."""

    value: float                        # KNN score threshold
    target_tpr: float                   # TPR asked for (0.95)
    achieved_tpr: float                 # fraction of calibration scores >= value
    n_samples: int                      # calibration images used
    source: str                         # where they came from, e.g. "run:calibration.npz"


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about a bundle; `manifest.json` is `to_dict()`.

    `files` maps every file of the bundle except manifest.json to its SHA-256 (hex), and
    `manifest_sha256` protects the manifest itself (an edited threshold or K is refused: change
    them by exporting again); `write_bundle` fills in both. File names are plain names inside
    the bundle directory.
    """

    model_version: str                  # "<run name>-<sha256(model.onnx)[:12]>"
    input_size: int                     # S: input is uint8 [N, S, S, 3]
    outputs: dict[str, int]             # ONNX output -> width: {"feature": Dp, "projection": 128}
    preprocess: dict[str, Any]          # PreprocessSpec.to_dict()
    index: IndexInfo
    class_names: tuple[str, ...]
    k: int                              # neighbours for the KNN score
    threshold: ThresholdInfo
    model_file: str = "model.onnx"      # the float32 model
    served_file: str = "model.onnx"     # the model the runtime runs (model_file or the int8 one)
    input_name: str = "image"
    labels_file: str = "labels.npy"
    quantization: dict[str, Any] | None = None   # how served_file was quantised, None for float
    training: dict[str, Any] = field(default_factory=dict)  # run name, config, data fingerprint
    created: str = ""                   # ISO time of export
    files: dict[str, str] = field(default_factory=dict)
    manifest_sha256: str = ""           # SHA-256 of the other fields (see manifest_digest)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise BundleError(f"expected {FORMAT!r}, got {self.format!r}", field="format")
        if self.format_version != FORMAT_VERSION:
            raise BundleError(f"unknown format version {self.format_version!r}; this runtime reads "
                              f"version {FORMAT_VERSION} (re-export with a matching rwood-export)",
                              field="format_version")
        for name in ("model_file", "served_file", "labels_file"):
            _check_file_name(getattr(self, name), name)
        _check_file_name(self.index.file, "index.file")
        try:
            spec = PreprocessSpec.from_dict(self.preprocess)
        except InputError as e:
            raise BundleError(str(e), field="preprocess") from None
        if spec.size != self.input_size:
            raise BundleError(f"preprocess size {spec.size} != input_size {self.input_size}",
                              field="input_size")
        _check_index(self)
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
    def indexed_output(self) -> str:
        """Name of the ONNX output whose rows are in the index ("feature" or "projection")."""
        return FEATURE_OUTPUTS[self.index.feature]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str | os.PathLike | None = None) -> "Manifest":
        """Build and validate a manifest from parsed JSON; BundleError naming `path` and field."""
        if not isinstance(d, dict):
            raise BundleError(f"expected a JSON object, got {type(d).__name__}", path=path)
        try:
            if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
                return cls._check_version_only(d)  # raises with a clear message
            kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
            kw["index"] = IndexInfo(**_sub(d, "index", IndexInfo))
            kw["threshold"] = ThresholdInfo(**_sub(d, "threshold", ThresholdInfo))
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
                          f"reads version {FORMAT_VERSION}", field="format_version")


def _sub(d: dict[str, Any], key: str, cls: type) -> dict[str, Any]:
    sub = d.get(key)
    if not isinstance(sub, dict):
        raise BundleError(f"expected an object, got {type(sub).__name__}", field=key)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(sub) - names)
    if unknown:
        raise BundleError(f"unknown key(s) {unknown}", field=key)
    return sub


def _check_file_name(name: Any, fld: str) -> None:
    if not isinstance(name, str) or not name or name != Path(name).name or name.startswith("."):
        raise BundleError(f"expected a plain file name inside the bundle, got {name!r}", field=fld)
    if name == MANIFEST_FILE:
        raise BundleError(f"{MANIFEST_FILE} cannot be a payload file", field=fld)


def _check_index(m: Manifest) -> None:
    if not isinstance(m.outputs, dict) or not m.outputs or not all(
            isinstance(k, str) and (is_int(v) and v >= 1) for k, v in m.outputs.items()):
        raise BundleError(f"expected output name -> positive width, got {m.outputs!r}",
                          field="outputs")
    ix = m.index
    if not (is_int(ix.dim) and ix.dim >= 1):
        raise BundleError(f"expected a positive integer, got {ix.dim!r}", field="index.dim")
    if ix.feature not in FEATURE_OUTPUTS:
        raise BundleError(f"expected one of {sorted(FEATURE_OUTPUTS)}, got {ix.feature!r}",
                          field="index.feature")
    if ix.metric not in METRICS:
        raise BundleError(f"expected one of {METRICS}, got {ix.metric!r}", field="index.metric")
    if FEATURE_OUTPUTS[ix.feature] not in m.outputs:
        raise BundleError(f"expected an entry for {FEATURE_OUTPUTS[ix.feature]!r}, got "
                          f"{m.outputs!r}", field="outputs")
    if m.outputs[FEATURE_OUTPUTS[ix.feature]] != ix.dim:
        out = FEATURE_OUTPUTS[ix.feature]
        raise BundleError(f"index dim {ix.dim} != width of output {out!r} ({m.outputs[out]})",
                          field="index.dim")
    if not (is_int(m.k) and m.k >= 1) or not (is_int(ix.ntotal) and ix.ntotal >= 1) or m.k > ix.ntotal:
        raise BundleError(f"expected 1 <= k <= ntotal, got k={m.k!r}, ntotal={ix.ntotal!r}",
                          field="k")


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


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: its manifest, directory and the labels of the indexed rows.

    The ONNX session and the FAISS index are opened by the `Detector` (or `read_index`), not here.
    """

    path: Path
    manifest: Manifest
    labels: np.ndarray                  # int64 [ntotal]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def served_model_path(self) -> Path:
        return self.path / self.manifest.served_file

    @property
    def index_path(self) -> Path:
        return self.path / self.manifest.index.file

    @property
    def spec(self) -> PreprocessSpec:
        return self.manifest.spec

    def read_index(self) -> faiss.Index:
        """Read the FAISS index (CPU) and check its size, width and metric against the manifest."""
        path, ix = self.index_path, self.manifest.index
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise BundleError(f"cannot read FAISS index: {str(e).splitlines()[0]}",
                              path=path) from None
        if index.ntotal != ix.ntotal or index.d != ix.dim:
            raise BundleError(f"index holds {index.ntotal} x {index.d}, manifest says "
                              f"{ix.ntotal} x {ix.dim}", path=path)
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise BundleError("index metric is not inner product", path=path)
        return index


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest(d: dict[str, Any]) -> str:
    """SHA-256 of a manifest dict's canonical JSON (sorted keys, compact), less manifest_sha256."""
    body = {k: v for k, v in d.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_bundle(path: str | os.PathLike, *, verify_model: bool = True) -> Bundle:
    """Open and verify a bundle directory.

    Checks, in order: the manifest (format, version, fields, its own checksum), that every
    payload file is listed and present, every SHA-256, the labels array, and (with
    `verify_model`) that every ONNX file has the manifest's input and output names, dtypes and
    widths (a CPU session without graph optimisation).
    `Detector` passes `verify_model=False` and checks its own session instead.
    Raises BundleError naming the file at fault.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError("bundle directory not found", path=root)
    mpath = root / MANIFEST_FILE
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError("manifest missing (not a bundle, or an unfinished export)",
                          path=mpath) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"unreadable manifest: {e}", path=mpath) from None
    manifest = Manifest.from_dict(raw, mpath)
    if raw.get("manifest_sha256") != manifest_digest(raw):
        raise BundleError("manifest was edited after export (manifest_sha256 does not match its "
                          "content); export again to change settings", path=mpath)
    _verify_files(root, manifest)
    labels = _load_labels(root / manifest.labels_file, manifest)
    bundle = Bundle(path=root, manifest=manifest, labels=labels)
    if verify_model:
        for name in dict.fromkeys((manifest.model_file, manifest.served_file)):
            check_model_io(_metadata_session(root / name), manifest, root / name)
    log.debug("loaded bundle %s (model %s)", root, manifest.model_version)
    return bundle


def _verify_files(root: Path, m: Manifest) -> None:
    mpath = root / MANIFEST_FILE
    if not isinstance(m.files, dict):
        raise BundleError("expected an object of file name -> sha256", path=mpath, field="files")
    for name in (m.model_file, m.served_file, m.index.file, m.labels_file):
        if name not in m.files:
            raise BundleError(f"{name!r} has no checksum in the manifest", path=mpath,
                              field="files")
    for name, digest in m.files.items():
        _check_file_name(name, "files")
        f = root / name
        if not f.is_file():
            raise BundleError("file listed in the manifest is missing", path=f)
        if file_sha256(f) != digest:
            raise BundleError("SHA-256 differs from the manifest: the file was altered or "
                              "truncated after export", path=f)


def _load_labels(path: Path, m: Manifest) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read labels: {e}", path=path) from None
    if labels.dtype != np.int64 or labels.shape != (m.index.ntotal,):
        raise BundleError(f"expected int64 [{m.index.ntotal}], got {labels.dtype} {labels.shape}",
                          path=path)
    if labels.size and (labels.min() < 0 or labels.max() >= len(m.class_names)):
        raise BundleError(f"labels outside [0, {len(m.class_names)})", path=path)
    return labels


def _metadata_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BundleError(f"ONNX Runtime cannot load the model: {str(e)[:300]}",
                          path=path) from None


def check_model_io(session: ort.InferenceSession, manifest: Manifest,
                   path: str | os.PathLike) -> None:
    """Check a session's input and outputs against the manifest; BundleError naming `path`.

    Input: exactly one, named `manifest.input_name`, uint8 [batch, S, S, 3]. Outputs: each name
    in `manifest.outputs`, float32 [batch, D] with D as the manifest says. A symbolic width is
    measured by running one black image.
    """
    s = manifest.input_size
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != manifest.input_name:
        raise BundleError(f"expected one input {manifest.input_name!r}, got "
                          f"{[i.name for i in inputs]}", path=path)
    i0 = inputs[0]
    if i0.type != "tensor(uint8)" or len(i0.shape) != 4 or list(i0.shape[1:]) != [s, s, 3]:
        raise BundleError(f"expected input uint8 [N, {s}, {s}, 3], got {i0.type} {i0.shape}",
                          path=path)
    outs = {o.name: o for o in session.get_outputs()}
    measured: dict[str, int] | None = None
    for name, dim in manifest.outputs.items():
        o = outs.get(name)
        if o is None:
            raise BundleError(f"model has no output {name!r} (outputs: {sorted(outs)})", path=path)
        if o.type != "tensor(float)" or len(o.shape) != 2:
            raise BundleError(f"expected output {name!r} float32 [N, {dim}], got {o.type} "
                              f"{o.shape}", path=path)
        width = o.shape[1]
        if not isinstance(width, int):
            if measured is None:
                res = session.run(None, {i0.name: np.zeros((1, s, s, 3), np.uint8)})
                measured = {o.name: int(r.shape[-1]) for o, r in zip(session.get_outputs(), res)}
            width = measured[name]
        if width != dim:
            raise BundleError(f"output {name!r} has width {width}, manifest says {dim}", path=path)


@contextmanager
def staging_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden directory beside `out_dir` (same filesystem, so the final rename is atomic).

    Removed on exit unless `write_bundle` has already moved it to `out_dir`. A process killed
    outright leaves at most this `.NAME.staging-*` directory behind, never a partial `out_dir`.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bundle(staging_dir: str | os.PathLike, manifest: Manifest, out_dir: str | os.PathLike,
                 *, overwrite: bool = False) -> Path:
    """Publish a staged bundle: checksum its files, write manifest.json, rename to `out_dir`.

    `staging_dir` must hold the manifest's payload files (flat, no manifest.json yet) and be on
    the same filesystem as `out_dir` (use `staging_dir(out_dir)`). The rename is atomic: readers
    see either no bundle or the whole bundle. An existing `out_dir` is refused unless `overwrite`
    (and then only if it is a bundle or empty); it is moved aside, replaced, then deleted.
    Returns `out_dir`. Raises BundleError naming the path at fault.
    """
    stage, out = Path(staging_dir), Path(out_dir)
    _check_target(out, overwrite)
    files = _stage_checksums(stage, manifest)
    d = dataclasses.replace(manifest, files=files).to_dict()
    d["manifest_sha256"] = manifest_digest(d)
    write_json_atomic(stage / MANIFEST_FILE, d, allow_nan=False)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(stage, out)
    except OSError as e:
        if old is not None:
            os.rename(old, out)
        raise BundleError(f"cannot move the staged bundle into place ({e}); the staging directory "
                          f"must be on the same filesystem", path=out) from None
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("wrote bundle %s (%d files)", out, len(files) + 1)
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise BundleError("already exists; pass overwrite=True (rwood-export --force) to "
                          "replace it", path=out)
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file()):
        raise BundleError("exists and is not a bundle; refusing to replace it", path=out)


def _stage_checksums(stage: Path, m: Manifest) -> dict[str, str]:
    if not stage.is_dir():
        raise BundleError("staging directory not found", path=stage)
    for name in (m.model_file, m.served_file, m.index.file, m.labels_file):
        if not (stage / name).is_file():
            raise BundleError("staged bundle lacks a file the manifest names", path=stage / name)
    files: dict[str, str] = {}
    for f in sorted(stage.iterdir()):
        if f.name == MANIFEST_FILE or not f.is_file():
            raise BundleError("staging directory must hold only payload files", path=f)
        fsync_file(f)
        files[f.name] = file_sha256(f)
    return files
