"""Edit a bundle's bank with the bundle's own model: the library behind `rwood-bank add/remove`.

Use `add_images(bundle, data, out)` to teach a deployed detector new in-distribution images (a
new class, a new camera) without retraining, and `remove_rows(bundle, out, label=... |
source=...)` to take rows out again. Both run on the serving host with the runtime alone (no
torch): the images go through the bundle's `Detector` (its preprocessing and ONNX model), the
embeddings into its FAISS index (`bank_index`: no retraining of IVF/PQ), and a new bundle is
published with `bundle.write_bundle`, the one writer of the format (atomically: with `out` the
served bundle, `rwood-serve --watch` or SIGHUP picks it up with no failed request).

What a new bundle records (`manifest.bank`): every row's source (`bank_sources`), the lineage
(one entry per edit: parent version, rows added or removed, from where, when, the threshold
decision) and the calibration embeddings, with their scores on the edited bank as the new
`calibration_file` (the drift test's reference). Its `model_version` is the exported version plus
`+bank-<decision digest>` (`write_bundle`: the digest covers the new index, labels and sources;
the lineage is descriptive). The threshold is kept (and the calibration set's TPR at it is
re-measured on the stored calibration embeddings: adding rows can only raise KNN scores, removing
them only lower them) unless `calibration` (held-out ID images of every class, none of them in
the bank) is given: then it is set again at the target TPR on those images.
Test: tests/runtime/test_bank_edit.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import ann, bank_index
from ._faiss import faiss
from .bank_sources import TRAIN_ORIGIN, BankSources
from .bundle import (
    BankInfo,
    Bundle,
    Manifest,
    ThresholdInfo,
    load_bundle,
    staging_dir,
    write_bundle,
)
from .calibration import MIN_CALIBRATION, calibrate_threshold, tpr_at
from .detector import Detector
from .errors import BundleError, DataError, InputError
from .image_sets import read_image_set
from .knn import KNNScorer
from .validate import check_number

__all__ = ["add_images", "remove_rows", "EditReport"]

log = logging.getLogger(__name__)

# names of the calibration files when the parent bundle has none (the exporter's names)
CALIBRATION_EMBEDDINGS_FILE, CALIBRATION_SCORES_FILE = ("calibration_embeddings.npy",
                                                        "calibration_scores.npy")
_SAME = 1.0 - 1e-5              # cosine at or above which a calibration image is a bank row


@dataclass(frozen=True)
class EditReport:
    """What one edit did: the new bundle, the versions and the lineage entry it recorded."""

    out: Path
    parent_version: str
    model_version: str
    rows_before: int
    rows_after: int
    entry: dict[str, Any]

    def describe(self) -> str:
        """The human summary `rwood-bank` prints."""
        e, t = self.entry, self.entry["threshold"]
        what = (f"added {e['rows']} rows from {e['from']}" if e["op"] == "add"
                else f"removed {e['rows']} rows ({e['by']})")
        lines = [f"bundle      {self.out}", f"version     {self.parent_version} -> {self.model_version}",
                 f"bank        {what}: {self.rows_before} -> {self.rows_after} rows"]
        if e.get("new_classes"):
            lines.append(f"new classes {', '.join(e['new_classes'])}")
        if t["mode"] == "kept":
            lines.append(f"threshold   kept at {t['value']:.6g}; " + (
                f"calibration TPR {t['calibration_tpr_before']:.4f} -> "
                f"{t['calibration_tpr_after']:.4f} on {t['n']} images"
                if t.get("n") else "calibration TPR not measured (the bundle holds no "
                                   "calibration embeddings; pass --calibration)"))
        else:
            lines.append(f"threshold   {t['previous']:.6g} -> {t['value']:.6g} (TPR "
                         f"{t['achieved_tpr']:.4f} on {t['n']} images of {t['source']}; the "
                         f"old threshold kept {t['previous_threshold_tpr']:.4f})")
        fit = e.get("index_fit")
        if fit and fit.get("warn"):
            lines.append(f"warning     {_far_warning(fit)}")
        return "\n".join(lines)


def _far_warning(fit: dict[str, Any]) -> str:
    return (f"{fit['far_fraction']:.0%} of the added rows are farther from the trained IVF "
            f"centroids than 95% of the calibration images: searches with a small nprobe may "
            f"miss them (re-export the bundle, which retrains the index, when this grows)")


def add_images(bundle: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
               label: str | None = None, calibration: str | os.PathLike | None = None,
               tpr: float | None = None, overwrite: bool = False,
               threads: int | None = None) -> EditReport:
    """Add the images of `data` (an image folder or npz, see `image_sets`) to the bank of
    `bundle` and publish the result at `out` (may be `bundle` itself, with `overwrite`).

    label: the class of every image (flat folder); a class the bundle does not know is appended
    to class_names. calibration / tpr: recalibrate the threshold (see the module docstring; tpr
    defaults to the bundle's target). Raises BundleError (bundle, out), DataError (data,
    calibration) or InputError (options), each naming the path or field.
    """
    b, det = _open(bundle, out, overwrite, threads, calibration, tpr)
    m = b.manifest
    images = read_image_set(data, det.prepare, label=label)
    names = list(m.class_names)
    new_classes = [c for c in dict.fromkeys(images.labels) if c not in names]
    names += new_classes
    added = det.embed(images.images)
    index = b.read_index()
    fit = bank_index.ivf_fit(index, added, b.calibration_embeddings())
    bank_index.add_rows(index, added)
    labels = np.concatenate([b.labels, np.array([names.index(c) for c in images.labels],
                                                dtype=np.int64)])
    sources = b.sources()
    origin = _origin_name(Path(data), sources.origins)
    sources = sources.concat(BankSources.of(origin, images.index, images.paths))
    entry = {"op": "add", "from": images.source, "origin": origin, "rows": len(images),
             "classes": dict(Counter(images.labels)), "new_classes": new_classes,
             "index_fit": fit}
    if fit and fit.get("warn"):
        log.warning(_far_warning(fit))
    return _publish(b, det, index, labels, sources, tuple(names), Path(out), entry,
                    calibration, tpr, overwrite, exact=added)


def remove_rows(bundle: str | os.PathLike, out: str | os.PathLike, *, label: str | None = None,
                source: str | None = None, calibration: str | os.PathLike | None = None,
                tpr: float | None = None, overwrite: bool = False,
                threads: int | None = None) -> EditReport:
    """Remove from the bank of `bundle` every row of class `label`, or every row whose source
    string matches the glob `source` (`BankSources.describe`, e.g. "digit6/*" or "train#1*"),
    and publish the result at `out`. Exactly one of the two. Trailing classes left without rows
    are dropped from class_names (others stay, so class indices never move).
    InputError when nothing matches or fewer than K rows would remain.
    """
    if (label is None) == (source is None):
        raise InputError("give exactly one of --label NAME and --source GLOB", field="label")
    b, det = _open(bundle, out, overwrite, threads, calibration, tpr)
    m, sources = b.manifest, b.sources()
    if label is not None:
        if label not in m.class_names:
            raise InputError(f"unknown class {label!r}; the bundle's classes: "
                             f"{', '.join(m.class_names)}", field="label")
        drop, by = b.labels == m.class_names.index(label), f"label {label!r}"
    else:
        drop, by = sources.matches(source), f"source {source!r}"
    if not drop.any():
        raise InputError(f"no bank row matches ({by}); `rwood-bank info` lists the sources",
                         field="label" if label is not None else "source")
    keep = ~drop
    if keep.sum() < m.k:
        raise InputError(f"removing {int(drop.sum())} rows would leave {int(keep.sum())}, fewer "
                         f"than K={m.k}", field="label" if label is not None else "source")
    index = bank_index.remove_rows(b.read_index(), keep, m.index.factory)
    labels = b.labels[keep]
    used = int(labels.max()) + 1
    names = m.class_names[:used]
    entry = {"op": "remove", "by": by, "rows": int(drop.sum()),
             "classes": dict(Counter(m.class_names[c] for c in b.labels[drop])),
             "dropped_classes": list(m.class_names[used:])}
    return _publish(b, det, index, labels, sources.take(keep), names, Path(out), entry,
                    calibration, tpr, overwrite, exact=None)


def _open(bundle: str | os.PathLike, out: str | os.PathLike, overwrite: bool,
          threads: int | None, calibration: Any, tpr: float | None) -> tuple[Bundle, Detector]:
    """Check the options, load and verify the bundle and its Detector (CPU); refuse an
    existing `out` before any work."""
    if tpr is not None:
        if calibration is None:
            raise InputError("a target TPR needs --calibration images", field="tpr")
        if check_number(tpr, "tpr", above=0.0) >= 1.0:
            raise InputError(f"expected a number in (0, 1), got {tpr!r}", field="tpr")
    b = load_bundle(bundle)
    bank_index.require_bank(b.manifest, b.path)
    if Path(out).exists() and not overwrite:
        raise BundleError("already exists; pass --force to replace it (it may be the bundle "
                          "itself: rwood-serve then reloads it)", path=out)
    return b, Detector(b, device="cpu", threads=threads)


def _origin_name(data: Path, taken: tuple[str, ...]) -> str:
    """A short unique origin name for `data`: its name without suffix, made safe for globs."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", data.resolve().name.removesuffix(".npz")) or "data"
    name, i = base, 1
    while name in taken or name == TRAIN_ORIGIN:
        i += 1
        name = f"{base}-{i}"
    return name


def _publish(b: Bundle, det: Detector, index: faiss.Index, labels: np.ndarray,
             sources: BankSources, class_names: tuple[str, ...], out: Path, entry: dict[str, Any],
             calibration: str | os.PathLike | None, tpr: float | None, overwrite: bool,
             exact: np.ndarray | None) -> EditReport:
    """Stage index, labels, sources, the calibration embeddings and scores and the unchanged
    payload files, decide the threshold, write the manifest through `write_bundle`, verify."""
    m = b.manifest
    ann.apply_search_params(index, m.index.search_params, "index.search_params")
    scorer = KNNScorer(index, labels, m.k, num_classes=len(class_names))
    cal = _threshold(b, det, scorer, calibration, tpr, exact)
    if scorer.short_queries:            # export refuses such an index; so does an edit
        raise BundleError(
            f"{scorer.short_queries} of {scorer.queries} calibration images get fewer than "
            f"K={m.k} neighbours from the edited {m.index.factory} index at its search "
            f"parameters {m.index.search_params} (they would score -2): remove fewer rows, or "
            "export again (rwood-export --search)", path=out, field="index.search_params")
    entry["threshold"] = cal.record
    bank = m.bank or BankInfo()
    emb_file = bank.calibration_embeddings_file or CALIBRATION_EMBEDDINGS_FILE
    scores_file = m.calibration_file or CALIBRATION_SCORES_FILE
    with staging_dir(out) as stage:
        faiss.write_index(index, str(stage / m.index.file))
        np.save(stage / m.labels_file, labels, allow_pickle=False)
        sources.write(stage / bank.sources_file)
        if cal.embeddings is not None:      # the calibration set and its scores on the new bank
            np.save(stage / emb_file, cal.embeddings, allow_pickle=False)
            np.save(stage / scores_file, cal.scores, allow_pickle=False)
        elif m.calibration_file is not None:
            log.warning("the bundle's calibration scores cannot be scored again on the edited "
                        "bank (no calibration embeddings): they are left out, and with them the "
                        "drift test; pass --calibration to store new ones")
        rewritten = {m.index.file, m.labels_file, bank.sources_file, emb_file, scores_file}
        for name in m.files:            # the models and anything else the bundle carries
            if name not in rewritten:
                shutil.copy2(b.path / name, stage / name)
        root = bank.lineage[0]["parent"] if bank.lineage else m.model_version
        entry = {"parent": m.model_version, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
        stored = cal.embeddings is not None
        manifest = dataclasses.replace(
            m, class_names=class_names, threshold=cal.threshold,
            index=dataclasses.replace(m.index, ntotal=int(len(labels))),
            calibration_file=scores_file if stored else None,
            bank=BankInfo(bank.sources_file, emb_file if stored else None,
                          bank.lineage + (entry,)), files={}, manifest_sha256="")
        write_bundle(stage, manifest, out, overwrite=overwrite, name=f"{root}+bank")
    version = load_bundle(out).manifest.model_version
    log.info("bundle %s: %s -> %s, %d -> %d rows", out, m.model_version, version, m.index.ntotal,
             len(labels))
    return EditReport(out, m.model_version, version, m.index.ntotal, int(len(labels)), entry)


@dataclass(frozen=True)
class _Calibration:
    """The threshold decision of one edit."""

    threshold: ThresholdInfo
    embeddings: np.ndarray | None       # float32 [M, D], the calibration set to store
    scores: np.ndarray | None           # float32 [M], their scores on the edited bank
    record: dict[str, Any]              # the lineage entry's "threshold"


def _threshold(b: Bundle, det: Detector, scorer: KNNScorer,
               calibration: str | os.PathLike | None, tpr: float | None,
               exact: np.ndarray | None) -> _Calibration:
    """Keep the threshold (and re-measure the stored calibration set at it), or set it again on
    the `calibration` images; `scorer` is the edited bank's."""
    old: Manifest = b.manifest
    value = old.threshold.value
    if calibration is None:
        emb = b.calibration_embeddings()
        if emb is None:
            return _Calibration(old.threshold, None, None, {"mode": "kept", "value": value})
        before = tpr_at(det.score_embeddings(emb).scores, value)
        scores = scorer.score(emb)[0]
        after = tpr_at(scores, value)
        log.info("threshold kept at %.6g: calibration TPR %.4f -> %.4f (%d images)", value,
                 before, after, len(emb))
        return _Calibration(dataclasses.replace(old.threshold, achieved_tpr=after), emb, scores,
                            {"mode": "kept", "value": value, "calibration_tpr_before": before,
                             "calibration_tpr_after": after, "n": int(len(emb))})
    images = read_image_set(calibration, det.prepare, need_labels=False)
    if len(images) < MIN_CALIBRATION:
        raise DataError(f"{len(images)} calibration images; need at least {MIN_CALIBRATION}",
                        path=calibration)
    emb = det.embed(images.images)
    _check_not_in_bank(emb, scorer, exact, images.paths, calibration)
    scores = scorer.score(emb)[0]
    target = old.threshold.target_tpr if tpr is None else tpr
    info = calibrate_threshold(scores, target, f"rwood-bank:{images.source}")
    return _Calibration(info, emb, scores, {
        "mode": "recalibrated", "previous": value, "value": info.value,
        "achieved_tpr": info.achieved_tpr, "n": info.n_samples, "source": images.source,
        "previous_threshold_tpr": tpr_at(scores, value)})


def _check_not_in_bank(cal: np.ndarray, scorer: KNNScorer, exact: np.ndarray | None,
                       paths: tuple[str, ...], where: str | os.PathLike) -> None:
    """DataError naming the first calibration image that is a bank row (its own nearest
    neighbour would bias the threshold, DESIGN section 2): by the index's nearest row, and for
    the rows just added by their exact embeddings (a PQ index only approximates similarities)."""
    _, _, sims, _ = scorer.score_neighbors(cal, 1)
    near = sims[:, 0]
    if exact is not None and len(exact):
        near = np.maximum(near, (cal @ exact.T).max(axis=1))
    hit = np.flatnonzero(near >= _SAME)
    if hit.size:
        i = int(hit[0])
        raise DataError(f"{hit.size} calibration image(s) are in the bank, e.g. "
                        f"{paths[i] or f'row {i}'} (similarity {near[i]:.6f}): calibrate on "
                        "held-out images", path=where)
