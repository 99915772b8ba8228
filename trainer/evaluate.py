"""Evaluate a trained run: OOD detection metrics, ID accuracy and embedding quality.

Use `evaluate(...)` (one postprocessor) or `evaluate_many(...)` to get the numbers and the score
arrays as `Evaluation` objects; nothing is written here (`trainer.report.write_report` renders and
writes them, `trainer.report.evaluate_run` does both, for `rwood-eval` and `rwood-train --ood`).

Steps: load the run (`trainer.run_dir.RunDir`, `checkpoint.load_model`); embed the ID test set and
every OOD set (uint8 at the run's input size, prepared by `trainer.ood_sets`); score them against
the run's bank rows with the postprocessor: "knn" is `detector_server.knn.KNNScorer` (the
deployed runtime's scorer, so these numbers are the deployed scores) and "mahalanobis" is
`trainer.mahalanobis.MahalanobisScorer`; metrics come from `detector_server.metrics`. ID accuracy:
KNN vote on the bank (always), the postprocessor's prediction, and the linear head when the model
has one. Embedding quality of both bank features (paper 4.1). The evidence behind the KNN scores
(`trainer.evidence`): the extreme images of each set with their nearest bank images.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from detector_server.bundle import FEATURE_OUTPUTS
from detector_server.errors import InputError
from detector_server.knn import KNNScorer, build_index, index_to_device
from detector_server.metrics import fpr_at_tpr_ood_positive, ood_metrics, threshold_at_tpr
from detector_server.validate import check_int

from .embedding_quality import QUALITY_NOTE, embedding_quality
from .evidence import Evidence, collect_evidence
from .mahalanobis import MahalanobisScorer
from .ood_sets import load_image_set, parse_set_arg
from .run_dir import BANK_FILE, CALIBRATION_FILE, MODEL_FILE, RunDir, RunInfo

__all__ = ["Evaluation", "evaluate", "evaluate_many", "list_postprocessors", "METRIC_KEYS",
           "REPORT_FORMAT_VERSION"]

log = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1
TPR = 0.95
# fpr@95: ID positive (the paper's convention, the default everywhere); fpr@95_ood_positive: OOD
# positive, the FPR@95 of OpenOOD's evaluator that the authors' released code reports.
METRIC_KEYS = ("fpr@95", "auroc", "aupr_in", "aupr_out", "fpr@95_ood_positive")

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]   # emb -> (scores, predicted)
_POSTPROCESSORS: dict[str, Callable[..., Scorer]] = {}


def _register(fn: Callable[..., Scorer]) -> Callable[..., Scorer]:
    _POSTPROCESSORS[fn.__name__] = fn
    return fn


@_register
def knn(bank: np.ndarray, labels: np.ndarray, k: int, num_classes: int, device: str) -> Scorer:
    return _knn_scorer(bank, labels, k, num_classes, device).score


def _knn_scorer(bank: np.ndarray, labels: np.ndarray, k: int, num_classes: int,
                device: str) -> KNNScorer:
    index = index_to_device(build_index(bank), "cpu" if device == "cpu" else "auto")
    return KNNScorer(index, labels, k=k, num_classes=num_classes)


@_register
def mahalanobis(bank: np.ndarray, labels: np.ndarray, k: int, num_classes: int,
                device: str) -> Scorer:
    return MahalanobisScorer(bank, labels, num_classes=num_classes).score


def list_postprocessors() -> list[str]:
    return sorted(_POSTPROCESSORS)


@dataclass
class Evaluation:
    """Everything an evaluation produced: the JSON report and the arrays the plots need."""

    report: dict[str, Any]
    scores: dict[str, np.ndarray]            # "id" and each OOD name -> float32 [N]
    embeddings: dict[str, np.ndarray]        # same keys -> float32 [N, D], the scored feature
    id_labels: np.ndarray                    # int64 [N_id], -1 where unknown
    class_names: list[str] = field(default_factory=list)
    evidence: Evidence | None = None         # extreme images and their nearest bank rows (KNN)


def _resolve_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"expected auto, cpu or cuda, got {device!r}", field="device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine; use --device cpu", field="device")
    return device


def _id_test_set(id_test: str | None, run: RunDir,
                 info: RunInfo) -> tuple[str, str, np.ndarray, np.ndarray]:
    """(name, source, images, labels) of the ID test set: `id_test` if given, else the run's test
    split (digits, cifar10, cifar100), else the run's held-out calibration split (in neither
    training nor the bank, so a fair ID test set for an npz or folder dataset)."""
    if id_test is not None:
        name, path = ((Path(id_test).stem, id_test) if Path(id_test).exists()
                      else parse_set_arg(id_test, field="id_test"))
        images, labels = load_image_set(name, path, info.preprocess, list(info.class_names))
        return name, str(path), images, labels
    cfg = info.config
    dataset = cfg.get("dataset")
    from .data import has_test_split, load_dataset, parse_classes, select_classes

    if not has_test_split(dataset):
        images, labels = run.calibration(
            instead=f"the run's dataset ({dataset!r}) has no test split either: pass --id-test "
                    "PATH (an .npz or image folder of in-distribution test images)")
        log.warning("the run's dataset (%s) has no test split: the in-distribution test set is "
                    "the run's held-out calibration split (%d images; rwood-eval --id-test PATH "
                    "evaluates on other images)", dataset, len(images))
        source = f"{run.file(CALIBRATION_FILE)} (held-out split of the training data)"
        return "calibration", source, images, labels

    d = load_dataset(dataset, cfg.get("data"), "test", size=info.preprocess.size)
    if cfg.get("classes"):
        d = select_classes(d, parse_classes(cfg["classes"], d.class_names))
    return dataset, f"{dataset} test split ({d.source})", d.images, d.labels


def _embed(model, images: np.ndarray, name: str, batch_size: int, device: str,
           progress: bool) -> dict[str, np.ndarray]:
    """embed_arrays, plus the linear head's logits (captured by a hook) when the net has one."""
    from .bank import embed_arrays

    classifier = getattr(model.net, "classifier", None)
    logits: list[np.ndarray] = []
    hook = None if classifier is None else classifier.register_forward_hook(
        lambda _m, _i, out: logits.append(out.detach().float().cpu().numpy()))
    try:
        out = embed_arrays(model, images, batch_size=batch_size, device=device,
                           progress=progress, desc=f"embedding {name}")
    finally:
        if hook is not None:
            hook.remove()
    if logits:
        out["logits"] = np.concatenate(logits)
    return out


def _accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float | None:
    ok = (labels >= 0) & (labels < num_classes)
    return float(np.mean(pred[ok] == labels[ok])) if ok.any() else None


def evaluate(run_dir: str | Path, id_test: str | None = None, ood: dict[str, str] | None = None,
             postprocessor: str = "knn", k: int | None = None, feature: str = "penultimate",
             batch_size: int = 512, device: str = "auto", progress: bool = False) -> Evaluation:
    """Evaluate one run with one postprocessor (see the module doc and `evaluate_many`)."""
    return evaluate_many(run_dir, id_test, ood, (postprocessor,), k, feature, batch_size, device,
                         progress)[postprocessor]


def evaluate_many(run_dir: str | Path, id_test: str | None = None,
                  ood: dict[str, str] | None = None, postprocessors: tuple[str, ...] = ("knn",),
                  k: int | None = None, feature: str = "penultimate", batch_size: int = 512,
                  device: str = "auto", progress: bool = False) -> dict[str, Evaluation]:
    """Evaluate one run with several postprocessors, embedding every image set once.

    `ood` maps a set name to an .npz / folder / torchvision root (`trainer.ood_sets`); `id_test`
    defaults to the run's test split, else its calibration split; `k` to the run's k, else
    `detector_server.knn.default_k` (see `RunDir.choose_k`). Returns {postprocessor:
    Evaluation}. Raises InputError for bad settings, CheckpointError for an incomplete run
    directory and DataError for unreadable image sets, each naming the option, file or folder.
    """
    from .checkpoint import load_model

    for post in postprocessors:
        _check_settings(post, feature, batch_size, k)
    if ood and "id" in ood:
        raise InputError("'id' is reserved for the in-distribution set; rename the OOD set",
                         field="ood")
    run = RunDir(run_dir)
    run.require(MODEL_FILE, BANK_FILE)
    device = _resolve_device(device)
    model, info = load_model(run.path, device=device)
    class_names = list(info.class_names)
    bank_emb, bank_labels = run.bank(feature)
    k = run.choose_k(k, len(bank_labels))

    # embed the ID test set (with the linear head's logits when there is one) and the OOD sets
    output = FEATURE_OUTPUTS[feature]
    id_name, id_source, id_images, id_labels = _id_test_set(id_test, run, info)
    log.info("ID test %s: %d images", id_name, len(id_images))
    id_out = _embed(model, id_images, id_name, batch_size, device, progress)
    embeddings = {"id": id_out[output]}
    images = {"id": id_images}
    for name, path in (ood or {}).items():
        images[name], _ = load_image_set(name, path, info.preprocess)
        log.info("OOD %s: %d images", name, len(images[name]))
        embeddings[name] = _embed(model, images[name], name, batch_size, device, progress)[output]
    accuracy: dict[str, float | None] = {
        "knn": None, "linear_head": (_accuracy(id_out["logits"].argmax(1), id_labels,
                                               len(class_names)) if "logits" in id_out else None)}
    settings = {"k": k, "feature": feature, "index_factory": "Flat", "tpr": TPR,
                "batch_size": batch_size, "device": device, "bank_size": int(len(bank_labels)),
                "id_test": {"name": id_name, "source": id_source, "n": int(len(id_images))},
                "ood": {n: {"path": str(p), "n": int(len(embeddings[n]))}
                        for n, p in (ood or {}).items()}}
    quality = {f: embedding_quality(*((bank_emb, bank_labels) if f == feature else run.bank(f)),
                                    class_names=class_names)
               for f in run.bank_features()}

    # score with the KNN scorer (always: its vote is the reported KNN accuracy, its neighbours
    # the evidence) and the others
    knn_scorer = _knn_scorer(bank_emb, bank_labels, k, len(class_names), device)
    results: dict[str, Evaluation] = {}
    evidence = None
    for post in ("knn", *[p for p in postprocessors if p != "knn"]):
        scorer = (knn_scorer.score if post == "knn"
                  else _POSTPROCESSORS[post](bank_emb, bank_labels, k, len(class_names), device))
        scored = {n: scorer(e) for n, e in embeddings.items()}
        if post == "knn":
            evidence = collect_evidence(run, info, knn_scorer, {n: s for n, (s, _) in scored.items()},
                                        embeddings, images)
        accuracy[post] = _accuracy(scored["id"][1], id_labels, len(class_names))
        if post in postprocessors:
            scores = {n: s for n, (s, _) in scored.items()}
            report = _report(run.path, {"postprocessor": post, **settings}, info, scores,
                             dict(accuracy), quality)
            report["evidence"] = evidence.summary()
            results[post] = Evaluation(report, scores, embeddings, id_labels, class_names,
                                       evidence)
    return results


def _check_settings(postprocessor: str, feature: str, batch_size: int, k: int | None) -> None:
    if postprocessor not in _POSTPROCESSORS:
        raise InputError(f"expected one of {list_postprocessors()}, got {postprocessor!r}",
                         field="postprocessor")
    if feature not in FEATURE_OUTPUTS:
        raise InputError(f"expected one of {list(FEATURE_OUTPUTS)}, got {feature!r}",
                         field="feature")
    check_int(batch_size, "batch_size", minimum=1)
    if k is not None:
        check_int(k, "k", minimum=1)


def _report(run_dir: Path, settings: dict[str, Any], info: RunInfo,
            scores: dict[str, np.ndarray], accuracy: dict[str, float | None],
            quality: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON report: settings, per-set metrics and their average, accuracy, quality."""
    per_set = {n: {**ood_metrics(scores["id"], scores[n], TPR),
                   "fpr@95_ood_positive": fpr_at_tpr_ood_positive(scores["id"], scores[n], TPR),
                   "n": int(len(scores[n]))}
               for n in scores if n != "id"}
    average = {m: float(np.mean([v[m] for v in per_set.values()]))
               for m in METRIC_KEYS} if per_set else {}
    return {
        "format": "reweightood-eval", "format_version": REPORT_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir), "settings": settings,
        "model": dict(info.model_args), "class_names": list(info.class_names),
        "id": {"threshold@95": threshold_at_tpr(scores["id"], TPR), "n": int(len(scores["id"])),
               "score_mean": float(np.mean(scores["id"])), "score_std": float(np.std(scores["id"]))},
        "ood": per_set, "average": average, "accuracy": accuracy,
        "embedding_quality": {**quality, "note": QUALITY_NOTE},
    }

