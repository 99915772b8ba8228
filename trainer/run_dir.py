"""The run directory: the one reader (and writer) of what `rwood-train` leaves behind.

Use `RunDir(path)` wherever a finished run is consumed (`rwood-eval`, `rwood-export`,
`checkpoint.load_model`): it checks which files are there, reads config.json as a flat `RunInfo`,
reads and checks the bank rows of one feature and the held-out calibration split, and picks K.
Every refusal is a `CheckpointError` (config.json, model.pt, bank.npz) or a `DataError`
(calibration.npz) naming the file and, where there is one, the key. The training loop writes
config.json, bank.npz and calibration.npz with `write_run_info`, `write_bank` and
`write_calibration`; model.pt and checkpoints/ belong to `trainer.checkpoint` (torch).
Layout: docs/CONTRACTS.md. No torch (numpy and detector_server only). Test: tests/trainer/test_run_dir.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from detector_server.atomic import atomic_write, write_json_atomic
from detector_server.bundle import FEATURE_OUTPUTS, MANIFEST_FILE
from detector_server.errors import CheckpointError, DataError, InputError, ReweightOODError
from detector_server.knn import SMALL_BANK_SHARE, default_k
from detector_server.preprocess import PreprocessSpec
from detector_server.validate import check_int, is_int

__all__ = ["RunDir", "RunInfo", "RUN_FORMAT", "RUN_FORMAT_VERSION", "CONFIG_FILE", "MODEL_FILE",
           "BANK_FILE", "CALIBRATION_FILE", "HASHES_FILE", "write_run_info", "write_bank",
           "write_calibration", "image_hashes", "write_image_hashes", "K_HELP"]

log = logging.getLogger(__name__)
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)   # what np.load of a bad file raises

RUN_FORMAT, RUN_FORMAT_VERSION = "reweightood-run", 1
CONFIG_FILE, MODEL_FILE = "config.json", "model.pt"
BANK_FILE, CALIBRATION_FILE = "bank.npz", "calibration.npz"
HASHES_FILE = "bank_hashes.npy"     # uint64 [N]: `image_hashes` of the bank's images
# --k's help in rwood-train, rwood-eval and rwood-export: `RunDir.choose_k` in words
K_HELP = ("KNN neighbours: the score is the distance to the K-th nearest bank embedding. Default: "
          "the run's --k, else 100, or 300 for more than 10 classes (CIDER's settings); on a small "
          "bank, where that would be over 2/3 of the smallest class, a tenth of the smallest "
          "class (logged).")
_WHAT = {  # file -> what a missing one means
    CONFIG_FILE: "no run record (rwood-train writes it when training starts); is this a run "
                 "directory?",
    MODEL_FILE: "no final model (rwood-train writes it when training ends); is the run finished?",
    BANK_FILE: "no embedding bank (rwood-train writes it after the model); is the run finished?",
}


@dataclass(frozen=True)
class RunInfo:
    """RUN_DIR/config.json, flat: what the run was and how its model takes input."""

    config: dict[str, Any]              # TrainConfig.to_dict() of the run
    model_args: dict[str, Any]          # arch, num_classes, head_dim, with_classifier
    preprocess: PreprocessSpec
    class_names: tuple[str, ...]
    data: dict[str, Any] = field(default_factory=dict)      # dataset, path, fingerprint, n_train, ...
    runtime: dict[str, Any] = field(default_factory=dict)   # device, world_size, steps_per_epoch, sync_bn
    versions: dict[str, str] = field(default_factory=dict)  # python, torch, torchvision, numpy
    git_rev: str | None = None
    created: str | None = None          # ISO time the record was written
    finished: bool = False              # True once model.pt, bank.npz and calibration.npz exist
                                        # (no calibration.npz when calibration_fraction is 0)

    def to_dict(self) -> dict[str, Any]:
        """config.json's content (format and format_version first)."""
        return {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
                "finished": self.finished, "config": self.config, "model_args": self.model_args,
                "preprocess": self.preprocess.to_dict(), "class_names": list(self.class_names),
                "data": self.data, "runtime": self.runtime, "versions": self.versions,
                "git_rev": self.git_rev, "created": self.created}

    @classmethod
    def from_dict(cls, d: Any, path: str | Path | None = None) -> "RunInfo":
        """Check parsed config.json; CheckpointError naming `path` and the key at fault."""
        def bad(key: str, want: str) -> CheckpointError:
            got = d.get(key) if isinstance(d, dict) else d
            return CheckpointError(f"expected {want}, got {got!r}", path=path, field=key)

        if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
            raise bad("format", repr(RUN_FORMAT))
        if d.get("format_version") != RUN_FORMAT_VERSION:
            raise bad("format_version", f"{RUN_FORMAT_VERSION} (written by another version?)")
        for key in ("config", "model_args"):
            if not isinstance(d.get(key), dict):
                raise bad(key, "an object")
        for key in ("data", "runtime", "versions"):
            if not isinstance(d.get(key, {}), dict):
                raise bad(key, "an object")
        names = d.get("class_names")
        if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
            raise bad("class_names", "a non-empty list of strings")
        for key in ("git_rev", "created"):
            if not isinstance(d.get(key), (str, type(None))):
                raise bad(key, "a string or null")
        if not isinstance(d.get("finished", False), bool):
            raise bad("finished", "true or false")
        try:
            spec = PreprocessSpec.from_dict(d.get("preprocess"))
        except (ReweightOODError, TypeError, ValueError) as e:
            raise CheckpointError(f"unusable preprocessing: {e}", path=path,
                                  field="preprocess") from None
        return cls(config=d["config"], model_args=d["model_args"], preprocess=spec,
                   class_names=tuple(names), data=d.get("data", {}),
                   runtime=d.get("runtime", {}), versions=d.get("versions", {}),
                   git_rev=d.get("git_rev"), created=d.get("created"),
                   finished=d.get("finished", False))


class RunDir:
    """A run directory, checked as it is read. Cheap to make: files are read on first use.

    path: the folder `rwood-train --out` wrote. CheckpointError if it is not a directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"run directory not found (a finished run holds {CONFIG_FILE}, "
                                  f"{MODEL_FILE}, {BANK_FILE} and {CALIBRATION_FILE})",
                                  path=self.path)
        if (self.path / MANIFEST_FILE).is_file() and not self.file(CONFIG_FILE).is_file():
            raise CheckpointError(f"this is a bundle (it holds {MANIFEST_FILE}); rwood-eval and "
                                  "rwood-export take a run directory, the folder rwood-train "
                                  "--out wrote (rwood-serve and rwood-score take bundles)",
                                  path=self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def require(self, *names: str) -> None:
        """CheckpointError naming the first of `names` (CONFIG_FILE, MODEL_FILE, BANK_FILE) that
        is not a file, and what its absence means."""
        for name in names:
            if not self.file(name).is_file():
                raise CheckpointError(_WHAT.get(name, "missing"), path=self.file(name))

    @cached_property
    def info(self) -> RunInfo:
        """config.json as a `RunInfo`; CheckpointError when it is missing, unreadable or malformed."""
        self.require(CONFIG_FILE)
        path = self.file(CONFIG_FILE)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable run record: {e}", path=path) from None
        return RunInfo.from_dict(d, path)

    def bank_features(self) -> list[str]:
        """The features (keys of FEATURE_OUTPUTS) bank.npz holds, in table order."""
        self.require(BANK_FILE)
        with _open_npz(self.file(BANK_FILE), CheckpointError) as f:
            return [name for name in FEATURE_OUTPUTS if name in f.files]

    def bank(self, feature: str) -> tuple[np.ndarray, np.ndarray]:
        """The bank rows of `feature`: (float32 [N, D] finite, int64 [N] labels in [0, C)).

        InputError for a feature name not in FEATURE_OUTPUTS; CheckpointError naming bank.npz and
        the array for a missing bank, a missing array, a wrong dtype or shape, non-finite rows or
        labels outside the run's C classes.
        """
        if feature not in FEATURE_OUTPUTS:
            raise InputError(f"expected one of {list(FEATURE_OUTPUTS)}, got {feature!r}",
                             field="feature")
        self.require(BANK_FILE)
        path, num_classes = self.file(BANK_FILE), len(self.info.class_names)
        with _open_npz(path, CheckpointError) as f:
            emb, labels = (_array(f, key, path, CheckpointError) for key in (feature, "labels"))
        if emb.dtype != np.float32 or emb.ndim != 2 or not len(emb) or not emb.shape[1]:
            raise CheckpointError(f"expected float32 [N, D] with N, D >= 1, got {emb.dtype} "
                                  f"{emb.shape}", path=path, field=feature)
        if not np.isfinite(emb).all():
            raise CheckpointError("holds NaN or infinite values (did training diverge?)",
                                  path=path, field=feature)
        if labels.dtype.kind not in "iu" or labels.shape != (len(emb),):
            raise CheckpointError(f"expected integer labels [{len(emb)}], got {labels.dtype} "
                                  f"{labels.shape}", path=path, field="labels")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise CheckpointError(f"labels outside [0, {num_classes}) (the run's classes)",
                                  path=path, field="labels")
        return emb, labels.astype(np.int64)

    def bank_sources(self) -> tuple[np.ndarray, list[str] | None]:
        """Where the bank rows came from: (int64 [N] rows of the training set, the image files
        relative to the dataset folder for folder datasets, else None). CheckpointError naming
        bank.npz and the array when one is missing or does not match the labels."""
        self.require(BANK_FILE)
        path = self.file(BANK_FILE)
        with _open_npz(path, CheckpointError) as f:
            labels, indices = (_array(f, key, path, CheckpointError) for key in ("labels", "indices"))
            files = _array(f, "files", path, CheckpointError) if "files" in f.files else None
        if indices.dtype.kind not in "iu" or indices.shape != labels.shape:
            raise CheckpointError(f"expected integer indices {labels.shape}, got {indices.dtype} "
                                  f"{indices.shape}", path=path, field="indices")
        if files is not None and (files.dtype.kind != "U" or files.shape != labels.shape):
            raise CheckpointError(f"expected file names {labels.shape}, got {files.dtype} "
                                  f"{files.shape}", path=path, field="files")
        return indices.astype(np.int64), None if files is None else [str(f) for f in files]

    def calibration(self, instead: str) -> tuple[np.ndarray, np.ndarray]:
        """The held-out split: (uint8 [M, S, S, 3] at model input, int64 [M] labels), M >= 1.

        It is in neither training nor the bank. DataError naming calibration.npz (and the array)
        when it is missing, empty or malformed; `instead` says what the caller accepts in its
        place (e.g. "pass --calibration PATH").
        """
        path, size = self.file(CALIBRATION_FILE), self.info.preprocess.size
        if not path.is_file():
            raise DataError(f"the run has no held-out calibration split (trained with "
                            f"calibration_fraction 0?); {instead}", path=path)
        with _open_npz(path, DataError) as f:
            images, labels = (_array(f, key, path, DataError) for key in ("images", "labels"))
        if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
            raise DataError(f"expected uint8 [M, {size}, {size}, 3] (the run's input size), got "
                            f"{images.dtype} {images.shape}", path=path, field="images")
        if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
            raise DataError(f"expected integer labels [{len(images)}], got {labels.dtype} "
                            f"{labels.shape}", path=path, field="labels")
        if not len(images):
            raise DataError(f"the run's calibration split is empty; {instead}", path=path,
                            field="images")
        return images, labels.astype(np.int64)

    def choose_k(self, k: int | None, bank_size: int) -> int:
        """K for KNN scoring: `k` if given (InputError unless 1 <= k <= bank_size), else the run's
        configured k (capped at the bank size), else `detector_server.knn.default_k` with the
        bank's class sizes (its small-bank rule). A given or configured K above SMALL_BANK_SHARE
        of the smallest class is kept, with a warning. CheckpointError naming config.json for a
        configured k that is no integer."""
        sizes = self._class_sizes()
        if k is not None:
            check_int(k, "k", minimum=1)
            if k > bank_size:
                raise InputError(f"k={k} exceeds the {bank_size} rows of the bank; use {bank_size} "
                                 f"or less ({default_k(len(self.info.class_names), bank_size, sizes)}"
                                 " by the default rule)", field="k")
            return self._warn_large(int(k), sizes)
        configured = self.info.config.get("k")
        if configured is None:
            return default_k(len(self.info.class_names), bank_size, sizes)
        if not is_int(configured) or configured < 1:
            raise CheckpointError(f"expected a positive integer or null, got {configured!r}",
                                  path=self.file(CONFIG_FILE), field="config.k")
        if configured > bank_size:
            log.warning("the run's K=%d is larger than the bank (%d rows); using K=%d",
                        configured, bank_size, bank_size)
        return self._warn_large(min(int(configured), bank_size), sizes)

    def _class_sizes(self) -> list[int] | None:
        """Bank rows per class (classes with rows), from bank.npz's labels; None without them."""
        try:
            with np.load(self.file(BANK_FILE), allow_pickle=False) as f:
                labels = f["labels"]
        except (*_NPZ_ERRORS, KeyError):
            return None
        counts = np.bincount(labels[labels >= 0].astype(np.int64)) if labels.size else labels
        return [int(c) for c in counts if c > 0] or None

    @staticmethod
    def _warn_large(k: int, sizes: list[int] | None) -> int:
        if sizes and k > SMALL_BANK_SHARE * min(sizes):
            log.warning("K=%d is %.0f%% of the smallest class (%d bank rows): its images' K-th "
                        "neighbours lie in other classes; a smaller --k (about %d) usually "
                        "separates OOD better", k, 100.0 * k / min(sizes), min(sizes),
                        max(1, min(sizes) // 10))
        return k

    def bank_hashes(self) -> np.ndarray | None:
        """`image_hashes` of the bank's images (uint64 [N]), or None for a run written before
        they were kept. CheckpointError naming the file when it is unreadable."""
        path = self.file(HASHES_FILE)
        if not path.is_file():
            return None
        try:
            hashes = np.load(path, allow_pickle=False)
        except _NPZ_ERRORS as e:
            raise CheckpointError(f"cannot read: {e}", path=path) from None
        if hashes.dtype != np.uint64 or hashes.ndim != 1:
            raise CheckpointError(f"expected uint64 [N], got {hashes.dtype} {hashes.shape}",
                                  path=path)
        return hashes


def _open_npz(path: Path, error: type[ReweightOODError]):
    try:
        return np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as e:
        raise error(f"cannot read: {e}", path=path) from None


def _array(f, key: str, path: Path, error: type[ReweightOODError]) -> np.ndarray:
    if key not in f.files:
        raise error(f"missing array; found {sorted(f.files)}", path=path, field=key)
    try:
        return f[key]
    except _NPZ_ERRORS as e:  # a damaged or pickled member
        raise error(f"cannot read: {e}", path=path, field=key) from None


# ------------------------------------------------------------------------------ writing
def write_run_info(run_dir: str | Path, info: RunInfo) -> Path:
    """Write RUN_DIR/config.json atomically; returns its path."""
    return write_json_atomic(Path(run_dir) / CONFIG_FILE, info.to_dict(), default=str)


def write_bank(run_dir: str | Path, embeddings: dict[str, np.ndarray], labels: np.ndarray,
               indices: np.ndarray, class_names: list[str],
               files: list[str] | None = None) -> Path:
    """Write RUN_DIR/bank.npz atomically.

    embeddings: model output name -> float32 [N, D] unit rows (`embed_arrays`' result), stored
    under the feature names of FEATURE_OUTPUTS; labels, indices (rows of the training set):
    int [N]; files: each row's image file relative to the dataset folder (folder datasets).
    Returns the path.
    """
    arrays = {name: embeddings[out].astype(np.float32) for name, out in FEATURE_OUTPUTS.items()}
    if files is not None:
        arrays["files"] = np.asarray(files, dtype=str)
    return _write_npz(Path(run_dir) / BANK_FILE, **arrays, labels=labels.astype(np.int64),
                      indices=indices.astype(np.int64),
                      class_names=np.asarray(class_names, dtype=str))


def write_calibration(run_dir: str | Path, images: np.ndarray, labels: np.ndarray,
                      indices: np.ndarray) -> Path:
    """Write RUN_DIR/calibration.npz atomically: uint8 [M, S, S, 3] images, int64 labels and
    indices (rows of the training set). Returns the path."""
    return _write_npz(Path(run_dir) / CALIBRATION_FILE, images=images,
                      labels=labels.astype(np.int64), indices=indices.astype(np.int64))


def image_hashes(images: np.ndarray) -> np.ndarray:
    """One 64-bit BLAKE2b hash per image of uint8 [N, S, S, 3] (model input): uint64 [N].

    The same pixels give the same hash, so a set can be checked against the bank for overlap.
    """
    return np.fromiter((int.from_bytes(hashlib.blake2b(np.ascontiguousarray(im).tobytes(),
                                                       digest_size=8).digest(), "little")
                        for im in images), dtype=np.uint64, count=len(images))


def write_image_hashes(run_dir: str | Path, images: np.ndarray) -> Path:
    """Write RUN_DIR/bank_hashes.npy atomically: `image_hashes` of the bank's images."""
    hashes = image_hashes(images)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, hashes, allow_pickle=False)
    return atomic_write(Path(run_dir) / HASHES_FILE, write)


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(path, write)
