"""`export_bundle`: a finished training run -> a deployable bundle directory (rwood-export).

Use it once a run has model.pt and bank.npz (read and checked by `trainer.run_dir.RunDir`).
Steps, in a hidden staging directory beside the output (an interrupted export leaves no bundle
behind, see detector_server.bundle.write_bundle):
1. model.onnx: the run's DeployModel traced by `export_onnx`;
2. optionally the int8 model (`quantize`), which is then the served file;
3. the scorer, from the calibration images embedded by the served model (the runtime's
   `Embedder`): for knn, index.faiss + labels.npy, the index chosen, its search parameters set
   and checked against exact search by `detector_server.index_choice.choose_index` (refused
   below `min_recall` or when a query gets fewer than K neighbours; the numbers go into the
   manifest), sources.json (each row's training-set index, and file for a folder dataset) and
   the calibration embeddings as calibration_embeddings.npy (so `rwood-bank` can score them
   again after a bank edit); for mahalanobis, mahalanobis_means.npy and
   mahalanobis_precision.npy (class means, shared precision);
4. the threshold: those embeddings scored by a `Detector` on the staged bundle (the runtime's
   exact code path), then `metrics.threshold_at_tpr`; their scores are kept as
   calibration_scores.npy, the reference of the runtime's drift test and score histogram;
5. manifest + checksums, atomic rename, and a final `load_bundle` of the result. The model
   version is the run name plus the digest of everything that decides a score
   (`detector_server.manifest.derive_model_version`): another K, TPR, feature or index gives
   another version.
Test: tests/exporter/test_export.py.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
import onnxruntime as ort
import torch

from detector_server.bank_sources import TRAIN_ORIGIN, BankSources
from detector_server.bundle import (
    FEATURE_OUTPUTS,
    BankInfo,
    Bundle,
    IndexInfo,
    MahalanobisInfo,
    Manifest,
    ThresholdInfo,
    load_bundle,
    staging_dir,
    write_bundle,
)
from detector_server.detector import Detector
from detector_server.embedder import Embedder
from detector_server.errors import BundleError, CheckpointError, InputError
from detector_server.index_choice import AUTO, DEFAULT_MIN_RECALL, choose_index
from detector_server.mahalanobis import fit_mahalanobis
from detector_server.preprocess import PreprocessSpec
from detector_server.runtime import resolve_threads
from trainer.checkpoint import load_model
from trainer.ood_sets import load_image_set, parse_set_arg
from trainer.run_dir import BANK_FILE, RunDir, RunInfo
from trainer.run_dir import MODEL_FILE as RUN_MODEL_FILE

from .calibrate import calibrate_threshold, load_calibration_images
from .config import ExportConfig
from .onnx_export import INPUT_NAME, OUTPUT_NAMES, export_onnx
from .quantize import QUANTIZED_FILES, get_quantizer

__all__ = ["export_bundle", "MODEL_FILE", "INDEX_FILE", "LABELS_FILE", "CALIBRATION_FILE",
           "SOURCES_FILE", "CALIBRATION_EMBEDDINGS_FILE"]

log = logging.getLogger(__name__)

MODEL_FILE, INDEX_FILE, LABELS_FILE = "model.onnx", "index.faiss", "labels.npy"
CALIBRATION_FILE = "calibration_scores.npy"
SOURCES_FILE, CALIBRATION_EMBEDDINGS_FILE = "sources.json", "calibration_embeddings.npy"


def export_bundle(run_dir: str | Path, out: str | Path, *, feature: str = "penultimate",
                  k: int | None = None, tpr: float = 0.95, calibration: str | Path | None = None,
                  scorer: str = "knn", index_factory: str = AUTO,
                  search_params: dict[str, int] | None = None,
                  min_recall: float = DEFAULT_MIN_RECALL, index_memory_mib: float | None = None,
                  check_ood: tuple[str, ...] = (), quantize: str | None = None,
                  opset: int = ExportConfig.opset, overwrite: bool = False,
                  threads: int | None = None) -> Path:
    """Export RUN_DIR as a bundle at `out`; returns `out`. Options: see `ExportConfig`.

    Raises CheckpointError for a run without model.pt or bank.npz (or with an inconsistent
    bank), DataError for unusable calibration or --check-ood data, InputError for bad options (k
    beyond the bank too) and for an index configuration the check refuses (field `index` or
    `search`), BundleError when `out` exists (without `overwrite`) or the result fails
    verification. K, when not given: the run's k, else `detector_server.knn.default_k`.
    """
    cfg = ExportConfig(feature=feature, k=k, tpr=tpr, scorer=scorer,
                       index_factory=index_factory, search_params=dict(search_params or {}),
                       min_recall=min_recall, index_memory_mib=index_memory_mib,
                       check_ood=tuple(check_ood),
                       calibration=None if calibration is None else str(calibration),
                       quantize=quantize, opset=opset, overwrite=overwrite, threads=threads)
    run, out = RunDir(run_dir), Path(out)
    run.require(RUN_MODEL_FILE, BANK_FILE)
    if out.exists() and not cfg.overwrite:
        raise BundleError("already exists; pass --force to replace it", path=out)
    model, info = load_model(run.path)
    spec, class_names = info.preprocess, list(info.class_names)
    emb, labels = run.bank(cfg.feature)
    _check_bank_width(model, spec.size, cfg.feature, emb.shape[1], run.file(BANK_FILE))
    knn = cfg.scorer == "knn"
    k = run.choose_k(cfg.k, len(labels)) if knn else None
    images, source = load_calibration_images(run.path, cfg.calibration, spec)
    ood = _load_ood(cfg.check_ood, spec, class_names)
    name = run.path.resolve().name
    with staging_dir(out) as stage:
        widths, served, quant = _stage_models(stage, model, spec.size, images, cfg)
        dim = int(emb.shape[1])
        if knn:
            indices, files = run.bank_sources()
            BankSources.of(TRAIN_ORIGIN, indices, files).write(stage / SOURCES_FILE)
        manifest = Manifest(
            model_version=name,             # write_bundle appends the decision digest
            input_size=spec.size, outputs=widths, preprocess=spec.to_dict(),
            index=IndexInfo(len(labels), dim, INDEX_FILE, cfg.feature) if knn else None,
            class_names=tuple(class_names), k=k,
            threshold=ThresholdInfo(0.0, cfg.tpr, 0.0, 0, "uncalibrated"),
            model_file=MODEL_FILE, served_file=served, input_name=INPUT_NAME,
            labels_file=LABELS_FILE, quantization=quant,
            training=_training_metadata(run.path, info), created=_now(), scorer=cfg.scorer,
            mahalanobis=None if knn else MahalanobisInfo(dim, len(labels), feature=cfg.feature),
            bank=BankInfo(SOURCES_FILE, CALIBRATION_EMBEDDINGS_FILE) if knn else None)
        embedder = Embedder(stage / served, manifest, device="cpu",
                            threads=resolve_threads(cfg.threads))
        calib = embedder.embed(images)
        if knn:
            np.save(stage / CALIBRATION_EMBEDDINGS_FILE, calib, allow_pickle=False)
            ood_emb = {set_name: embedder.embed(x) for set_name, x in ood.items()}
            manifest = _stage_index(stage, emb, labels, calib, ood_emb, manifest, cfg)
        else:
            _stage_mahalanobis(stage, emb, labels, manifest)
        del embedder
        log.info("[4/5] calibrating the threshold at TPR %.3f on %d images", cfg.tpr, len(images))
        detector = Detector(Bundle(stage, manifest, labels if knn else None), device="cpu",
                            threads=cfg.threads)
        scores = detector.score_embeddings(calib).scores
        threshold = calibrate_threshold(scores, cfg.tpr, source)
        del detector
        _check_threshold(manifest, threshold)
        np.save(stage / CALIBRATION_FILE, scores.astype(np.float32), allow_pickle=False)
        log.info("[5/5] writing the bundle")
        write_bundle(stage, dataclasses.replace(manifest, threshold=threshold,
                                                calibration_file=CALIBRATION_FILE),
                     out, overwrite=cfg.overwrite, name=name)
    bundle = load_bundle(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    log.info("bundle %s: model %s, %.2f MB, threshold %.6g (TPR %.4f on %d %s images)", out,
             bundle.manifest.model_version, size / 1e6, threshold.value, threshold.achieved_tpr,
             threshold.n_samples, source)
    return out


def _stage_models(stage: Path, model: torch.nn.Module, size: int, images: np.ndarray,
                  cfg: ExportConfig) -> tuple[dict[str, int], str, dict[str, Any] | None]:
    """Steps 1 and 2: model.onnx and the optional quantised copy.

    Returns (output widths, the served file's name, the quantisation description or None).
    """
    log.info("[1/5] exporting ONNX (opset %d)", cfg.opset)
    widths = export_onnx(model, stage / MODEL_FILE, size, opset=cfg.opset)
    if not cfg.quantize:
        log.info("[2/5] no quantisation: the float model is served")
        return widths, MODEL_FILE, None
    log.info("[2/5] quantising (%s)", cfg.quantize)
    served = QUANTIZED_FILES[cfg.quantize]
    quant = get_quantizer(cfg.quantize)(stage / MODEL_FILE, stage / served, images,
                                        input_name=INPUT_NAME)
    return widths, served, quant


def _stage_index(stage: Path, emb: np.ndarray, labels: np.ndarray, calib: np.ndarray,
                 ood: dict[str, np.ndarray], manifest: Manifest, cfg: ExportConfig) -> Manifest:
    """Step 3 (knn): index.faiss over the bank rows, labels.npy; returns the manifest with the
    index's factory, search parameters, choice and check."""
    log.info("[3/5] choosing the faiss index (%s) for %d x %d bank rows, K=%d", cfg.index_factory,
             *emb.shape, manifest.k)
    choice = choose_index(emb, calib, manifest.k, factory=cfg.index_factory,
                          search_params=cfg.search_params, min_recall=cfg.min_recall,
                          memory_mib=cfg.index_memory_mib, tpr=cfg.tpr, ood_queries=ood)
    if ood and choice.check is None:
        log.info("--check-ood: %s is exact search, nothing to compare", choice.factory)
    faiss.write_index(choice.index, str(stage / INDEX_FILE))
    np.save(stage / LABELS_FILE, labels, allow_pickle=False)
    index = dataclasses.replace(
        manifest.index, factory=choice.factory, search_params=choice.search_params,
        choice=choice.to_manifest(), check=None if choice.check is None else choice.check.to_dict())
    return dataclasses.replace(manifest, index=index)


def _stage_mahalanobis(stage: Path, emb: np.ndarray, labels: np.ndarray,
                       manifest: Manifest) -> None:
    """Step 3 (mahalanobis): class means and shared precision of the bank rows, one .npy each
    (the files `manifest.mahalanobis` names)."""
    log.info("[3/5] fitting class means and the shared precision on %d x %d bank rows", *emb.shape)
    means, precision = fit_mahalanobis(emb, labels, len(manifest.class_names))
    np.save(stage / manifest.mahalanobis.means_file, means, allow_pickle=False)
    np.save(stage / manifest.mahalanobis.precision_file, precision, allow_pickle=False)


def _check_threshold(manifest: Manifest, threshold: ThresholdInfo) -> None:
    """The index check calibrated its own threshold on the same scores: it must be the same."""
    check = manifest.index.check if manifest.index is not None else None
    if check is not None and not np.isclose(check["threshold"], threshold.value, atol=1e-6):
        raise BundleError(f"the index check's threshold {check['threshold']} differs from the "
                          f"calibrated {threshold.value}: the Detector did not score as the check",
                          field="index.check")


def _load_ood(sets: tuple[str, ...], spec: PreprocessSpec,
              class_names: list[str]) -> dict[str, np.ndarray]:
    """--check-ood NAME=PATH sets at model input: {name: uint8 [N, S, S, 3]}."""
    out = {}
    for text in sets:
        try:
            name, path = parse_set_arg(text)
        except InputError as e:
            raise InputError(str(e).split(": ", 1)[-1], field="check_ood") from None
        out[name] = load_image_set(name, path, spec, class_names)[0]
    return out


@torch.no_grad()
def _check_bank_width(model: torch.nn.Module, size: int, feature: str, width: int,
                      path: Path) -> None:
    """The bank's rows must be as wide as the model's `feature` output (one black image tells)."""
    outs = dict(zip(OUTPUT_NAMES, model(torch.zeros((1, size, size, 3), dtype=torch.uint8))))
    got = int(outs[FEATURE_OUTPUTS[feature]].shape[1])
    if got != width:
        raise CheckpointError(f"bank {feature!r} rows are {width}-d but the model's are {got}-d: "
                              "the bank is from another model", path=path, field=feature)


def _training_metadata(run_dir: Path, info: RunInfo) -> dict[str, Any]:
    return {"run_name": run_dir.resolve().name, "config": info.config,
            "model_args": info.model_args, "data": info.data, "git_rev": info.git_rev,
            "created": info.created, "versions": info.versions,
            "export_versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                                "onnxruntime": ort.__version__, "faiss": faiss.__version__}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
