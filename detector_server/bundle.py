"""The bundle format: the one entry point for what `rwood-export` writes and the runtime reads.

Use `load_bundle(dir)` to open and verify a bundle (torch-free), `write_bundle(staging, manifest,
out)` to publish one atomically (the exporter), and `check_model_io` to check an ONNX Runtime
session against a manifest. The manifest itself (`Manifest`, `IndexInfo`, `MahalanobisInfo`,
`ThresholdInfo`, `manifest_digest`, `derive_model_version`, `FORMAT*`, `FEATURE_OUTPUTS`) is
defined in `detector_server.manifest` and re-exported here, so
`from detector_server.bundle import ...` gives every name of the format.
A bundle is one flat directory:

    manifest.json     `Manifest.to_dict()` as JSON (format, version, threshold, K, checksums, ...)
    model.onnx        input `image` uint8 [N, S, S, 3]; outputs `feature`, `projection`
                      float32 [N, D]
    model.int8.onnx   optional quantised copy (`Manifest.served_file` says which is served)
    index.faiss       KNN scorer: faiss.write_index of the indexed feature's bank rows (inner
                      product; search parameters in the manifest)
    labels.npy        KNN scorer: int64 [ntotal], the class of each indexed row
    mahalanobis_means.npy      Mahalanobis scorer, instead of the two above: the class means,
    mahalanobis_precision.npy  float64 [C, D], and the shared precision matrix, float64 [D, D]
    calibration_scores.npy  float32 [M], the scores of the M calibration images that set the
                      threshold: the reference of the drift test and of the server's score
                      histogram (`Manifest.calibration_file`; absent from older bundles)
    sources.json      optional (`manifest.bank`): where each indexed row came from
                      (detector_server/bank_sources.py)
    calibration_embeddings.npy  optional (`manifest.bank.calibration_embeddings_file`): float32
                      [M, D] embeddings of the calibration images, so a bank edit can score them
                      again

Loading refuses, with a `BundleError` naming the file, a bundle whose manifest is missing or of
an unknown format/version, a file that is missing or whose SHA-256 differs from the manifest, and
a model whose input/outputs do not match the manifest. Every file is read through
`detector_server.bundle_files`: regular files only, no symbolic links followed, bounded sizes.
Test: tests/runtime/test_bundle.py; attacks: tests/reliability/test_hostile_bundle.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ._faiss import faiss
from .atomic import exchange_paths, fsync_dir, fsync_file, write_json_atomic
from .bank_sources import BankSources
from .bundle_files import member_sha256, read_json, read_npy
from .bundle_watch import read_published
from .errors import BundleError
from .manifest import (
    DESCRIPTIVE_FIELDS,
    FEATURE_OUTPUTS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    READABLE_VERSIONS,
    SCORERS,
    BankInfo,
    IndexInfo,
    MahalanobisInfo,
    Manifest,
    ThresholdInfo,
    check_file_name,
    decision_digest,
    derive_model_version,
    manifest_digest,
    version_name,
)
from .preprocess import PreprocessSpec

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST_FILE", "FEATURE_OUTPUTS",
           "SCORERS", "IndexInfo", "MahalanobisInfo", "ThresholdInfo", "BankInfo", "Manifest",
           "Bundle", "load_bundle", "write_bundle", "staging_dir", "check_model_io",
           "file_sha256", "manifest_digest", "require_bundle_dir", "DESCRIPTIVE_FIELDS",
           "decision_digest", "derive_model_version", "version_name"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: its manifest, directory and the labels of the indexed rows.

    The ONNX session and the scorer's data (`read_index`, `read_mahalanobis`) are opened by the
    `Detector`, not here.
    """

    path: Path
    manifest: Manifest
    labels: np.ndarray | None           # int64 [ntotal] (KNN scorer); None for mahalanobis

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

    def calibration_scores(self) -> np.ndarray | None:
        """The calibration images' scores, float32 [threshold.n_samples] (finite), or None for a
        bundle exported before they were stored. BundleError naming the file when unusable."""
        name = self.manifest.calibration_file
        if name is None:
            return None
        path, n = self.path / name, self.manifest.threshold.n_samples
        try:
            scores = read_npy(self.path, name, np.float32, (n,))
        except BundleError as e:
            raise BundleError(f"expected finite float32 [{n}] (threshold.n_samples): "
                              f"{str(e).removeprefix(f'{path}: ')}", path=path) from None
        except OSError as e:
            raise BundleError(f"cannot read calibration scores: {e.strerror or e}",
                              path=path) from None
        if not np.isfinite(scores).all():
            raise BundleError(f"expected finite float32 [{n}] (threshold.n_samples), got "
                              "NaN or infinity", path=path)
        return scores

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

    def read_mahalanobis(self) -> tuple[np.ndarray, np.ndarray]:
        """(means float64 [C, D], precision float64 [D, D]) of a mahalanobis bundle, read with
        `bundle_files.read_npy` (dtype and shape checked from the header against the manifest:
        C = the class names, D = the feature width) and finite; BundleError naming the file."""
        info, c = self.manifest.mahalanobis, len(self.manifest.class_names)
        out = []
        for name, shape in ((info.means_file, (c, info.dim)),
                            (info.precision_file, (info.dim, info.dim))):
            path = self.path / name
            try:
                a = read_npy(self.path, name, np.float64, shape)
            except OSError as e:
                raise BundleError(f"cannot read the Mahalanobis parameters: {e.strerror or e}",
                                  path=path) from None
            if not np.isfinite(a).all():
                raise BundleError(f"expected finite float64 {list(shape)}, got NaN or infinity",
                                  path=path)
            out.append(a)
        return out[0], out[1]

    def sources(self) -> BankSources:
        """Where each indexed row came from; all unknown for a bundle without `manifest.bank`."""
        m = self.manifest
        rows = m.index.ntotal if m.index is not None else 0    # a mahalanobis bundle: no rows
        if m.bank is None or m.index is None:
            return BankSources.unknown(rows)
        return BankSources.read(self.path, m.bank.sources_file, m.index.ntotal)

    def calibration_embeddings(self) -> np.ndarray | None:
        """float32 [M, D] embeddings (the scored feature) of the calibration images, None when
        not stored."""
        m = self.manifest
        if m.bank is None or m.bank.calibration_embeddings_file is None:
            return None
        name = m.bank.calibration_embeddings_file
        try:
            return read_npy(self.path, name, np.float32, (None, m.dim))
        except OSError as e:
            raise BundleError(f"cannot read calibration embeddings: {e.strerror or e}",
                              path=self.path / name) from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



def require_bundle_dir(root: Path) -> None:
    """BundleError unless `root` is a directory with a manifest; a training run directory (what
    rwood-train writes) is named as such, with the command that makes a bundle of it."""
    if not root.is_dir():
        raise BundleError("bundle directory not found", path=root)
    if os.path.lexists(root / MANIFEST_FILE):   # a link, a FIFO: load_bundle's reader refuses it
        return
    if (root / "config.json").is_file() and any(
            (root / n).exists() for n in ("bank.npz", "model.pt", "checkpoints")):
        raise BundleError("this is a training run directory (rwood-train's), not a bundle; "
                          "rwood-serve and rwood-score take a bundle: make one with "
                          "rwood-export RUN_DIR --out BUNDLE", path=root)
    raise BundleError("manifest missing (not a bundle, or an unfinished export)",
                      path=root / MANIFEST_FILE)


def load_bundle(path: str | os.PathLike, *, verify_model: bool = True) -> Bundle:
    """Open and verify a bundle directory.

    Checks, in order: the manifest (format, version, fields, its own checksum), that every
    payload file is listed and present, every SHA-256, the labels array, and (with
    `verify_model`) that every ONNX file has the manifest's input and output names, dtypes and
    widths (a CPU session without graph optimisation).
    Every file is a regular file inside `path`, read within the bounds of
    `detector_server.bundle_files` (no symbolic link followed, no FIFO read, manifest size and
    nesting, .npy header); `path` itself may be a link.
    `Detector` passes `verify_model=False` and checks its own session instead.
    A bundle replaced while it is read is read again (`bundle_watch.read_published`), so the
    result is one
    published bundle, never a mix of two.
    Raises BundleError naming the file at fault.
    """
    root = Path(path)
    bundle = read_published(root, lambda: _load(root, verify_model))
    log.debug("loaded bundle %s (model %s)", root, bundle.manifest.model_version)
    return bundle


def _load(root: Path, verify_model: bool) -> Bundle:
    require_bundle_dir(root)
    mpath = root / MANIFEST_FILE
    raw = read_json(root, MANIFEST_FILE,
                    missing="manifest missing (not a bundle, or an unfinished export)")
    manifest = Manifest.from_dict(raw, mpath)
    try:
        digest = manifest_digest(raw)
    except ValueError as e:             # NaN or infinity in a key the manifest does not know
        raise BundleError(f"expected plain JSON values (no NaN or infinity): {e}",
                          path=mpath) from None
    if raw.get("manifest_sha256") != digest:
        raise BundleError("manifest was edited after export (manifest_sha256 does not match its "
                          "content); export again to change settings", path=mpath)
    _verify_files(root, manifest)
    labels = _load_labels(root, manifest) if manifest.scorer == "knn" else None
    bundle = Bundle(path=root, manifest=manifest, labels=labels)
    if verify_model:
        for name in dict.fromkeys((manifest.model_file, manifest.served_file)):
            check_model_io(_metadata_session(root / name), manifest, root / name)
    return bundle


def _verify_files(root: Path, m: Manifest) -> None:
    mpath = root / MANIFEST_FILE
    if not isinstance(m.files, dict):
        raise BundleError("expected an object of file name -> sha256", path=mpath, field="files")
    for name in m.payload_files:
        if name not in m.files:
            raise BundleError(f"{name!r} has no checksum in the manifest", path=mpath,
                              field="files")
    for name, digest in m.files.items():
        check_file_name(name, "files")
        try:
            actual = member_sha256(root, name)
        except OSError as e:
            raise BundleError(f"cannot read: {e.strerror or e}", path=root / name) from None
        if actual != digest:
            raise BundleError("SHA-256 differs from the manifest: the file was altered or "
                              "truncated after export", path=root / name)


def _load_labels(root: Path, m: Manifest) -> np.ndarray:
    path = root / m.labels_file
    try:
        labels = read_npy(root, m.labels_file, np.int64, (m.index.ntotal,))
    except OSError as e:
        raise BundleError(f"cannot read labels: {e.strerror or e}", path=path) from None
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
                 *, overwrite: bool = False, name: str | None = None) -> Path:
    """Publish a staged bundle: checksum its files, write manifest.json, rename to `out_dir`.

    The manifest's `files`, `model_version` and `manifest_sha256` are filled in here:
    `model_version` is `derive_model_version(name, ...)`, so it changes with every
    decision-relevant byte whoever writes the bundle. `name` is its human-readable part (the
    exporter passes the run name); without it, `version_name(manifest.model_version)` (the
    name of the bundle a copy or an edit was made from).

    `staging_dir` must hold the manifest's payload files (flat, no manifest.json yet) and be on
    the same filesystem as `out_dir` (use `staging_dir(out_dir)`). The rename is atomic: readers
    see either no bundle or the whole bundle. An existing `out_dir` is refused unless `overwrite`
    (and then only if it is a bundle or empty); it is swapped with the new one in one step
    (`atomic.exchange_paths`; where the system cannot, moved aside and replaced, leaving a moment
    without a bundle), then deleted.
    Returns `out_dir`. Raises BundleError naming the path at fault.
    """
    stage, out = Path(staging_dir), Path(out_dir)
    _check_target(out, overwrite)
    files = _stage_checksums(stage, manifest)
    d = dataclasses.replace(manifest, files=files).to_dict()
    d["model_version"] = derive_model_version(
        version_name(manifest.model_version) if name is None else name, d)
    d["manifest_sha256"] = manifest_digest(d)
    write_json_atomic(stage / MANIFEST_FILE, d, allow_nan=False)
    if out.exists() and exchange_paths(stage, out):
        # one step: readers (a serving rwood-serve reloading) see the old bundle or the new one
        fsync_dir(out.parent)
        shutil.rmtree(stage, ignore_errors=True)     # now the old bundle
        log.info("replaced bundle %s (%d files)", out, len(files) + 1)
        return out
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
    log.info("wrote bundle %s (model %s, %d files)", out, d["model_version"], len(files) + 1)
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
    for name in m.payload_files:
        if not (stage / name).is_file():
            raise BundleError("staged bundle lacks a file the manifest names", path=stage / name)
    files: dict[str, str] = {}
    for f in sorted(stage.iterdir()):
        if f.name == MANIFEST_FILE or not f.is_file():
            raise BundleError("staging directory must hold only payload files", path=f)
        fsync_file(f)
        files[f.name] = file_sha256(f)
    return files
