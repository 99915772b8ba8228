"""The evidence behind an evaluation's scores: extreme images next to their nearest bank images.

Use `collect_evidence(...)` inside `trainer.evaluate` (it computes; `trainer.report` draws the
contact sheet `neighbors.png` with `contact_sheet`). Which images: the best-scored ID test images,
and for each OOD set its worst-scored images (lowest scores: flagged most surely) and its
best-scored ones (highest scores: the OOD images most like the bank, the likeliest to be
accepted). Each comes with its nearest bank rows from the deployed KNN scorer's search
(`KNNScorer.score_neighbors`), so the sheet shows what the runtime's `neighbors` would return.

The bank images are read back from the run's training data (`RunDir.bank_sources`: the rows of
the training set, and the files for a folder dataset): only the files needed for a folder, the
dataset (checked against the run's fingerprint) otherwise. When they cannot be read (data moved,
another machine) the evidence carries the reason instead and no sheet is drawn.
Test: tests/trainer/test_evaluate.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector_server.errors import DataError, ReweightOODError
from detector_server.knn import KNNScorer
from detector_server.listing import read_file
from detector_server.preprocess import decode_image, to_model_array

from .run_dir import RunDir, RunInfo

__all__ = ["Evidence", "EvidenceRow", "collect_evidence", "contact_sheet", "N_SHOWN",
           "N_NEIGHBORS", "SHEET"]

log = logging.getLogger(__name__)

N_SHOWN = 3         # images per group on the sheet
N_NEIGHBORS = 5     # bank images next to each
SHEET = "neighbors.png"


@dataclass(frozen=True)
class EvidenceRow:
    """One image of the sheet and its nearest bank rows."""

    group: str                  # e.g. "ID, best-scored", "mnist, worst-scored"
    image: np.ndarray           # uint8 [S, S, 3]
    score: float
    rows: np.ndarray            # int64 [n], bank rows, nearest first (-1 = missing)
    sims: np.ndarray            # float32 [n], their similarities


@dataclass
class Evidence:
    """The rows of the sheet, and the bank images they reference (None, with `note`, when the
    training data cannot be read back)."""

    rows: list[EvidenceRow]
    bank_labels: np.ndarray                          # int64 [N] class of every bank row
    bank_sources: list[str]                          # "train#17" / "train/cat/0001.png" per row
    bank_images: dict[int, np.ndarray] | None = None  # bank row -> uint8 [S, S, 3]
    note: str = ""
    class_names: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The report.json entry: each image's group, score and neighbours (row, class,
        similarity, source), and `note` when no sheet can be drawn."""
        return {"note": self.note, "images": [
            {"group": r.group, "score": r.score, "neighbors": [
                {"row": int(row), "label": self.class_names[self.bank_labels[row]],
                 "similarity": float(sim), "source": self.bank_sources[row]}
                for row, sim in zip(r.rows, r.sims) if row >= 0]} for r in self.rows]}


def collect_evidence(run: RunDir, info: RunInfo, scorer: KNNScorer, scores: dict[str, np.ndarray],
                     embeddings: dict[str, np.ndarray], images: dict[str, np.ndarray],
                     n: int = N_SHOWN, neighbors: int = N_NEIGHBORS) -> Evidence:
    """Pick the extreme images of every set ("id" and the OOD sets: the keys of `scores`,
    `embeddings` float32 [N, D] and `images` uint8 [N, S, S, 3]), find their nearest bank rows
    with `scorer`, and read those bank images back from the training data."""
    picks: list[tuple[str, str, np.ndarray]] = []
    for name, s in scores.items():
        order = np.argsort(s, kind="stable")
        if name == "id":
            picks.append(("id", "ID, best-scored", order[::-1][:n]))
        else:
            picks += [(name, f"{name}, worst-scored", order[:n]),
                      (name, f"{name}, best-scored", order[::-1][:n])]
    k = min(neighbors, scorer.k)
    rows: list[EvidenceRow] = []
    for name, group, idx in picks:
        _, _, sims, ids = scorer.score_neighbors(embeddings[name][idx], k)
        rows += [EvidenceRow(group, images[name][i], float(scores[name][i]), ids[j], sims[j])
                 for j, i in enumerate(idx)]
    indices, files = run.bank_sources()
    sources = ([f"train/{f}" for f in files] if files is not None
               else [f"train#{i}" for i in indices])
    ev = Evidence(rows, scorer.labels, sources, class_names=list(info.class_names))
    needed = sorted({int(r) for row in rows for r in row.rows if r >= 0})
    try:
        ev.bank_images = dict(zip(needed, _training_images(info, indices[needed],
                                                           None if files is None
                                                           else [files[r] for r in needed])))
    except ReweightOODError as e:
        ev.note = f"the bank images cannot be read back from the training data ({e})"
        log.warning("no contact sheet: %s", ev.note)
    return ev


def _training_images(info: RunInfo, rows: np.ndarray, files: list[str] | None) -> list[np.ndarray]:
    """uint8 [S, S, 3] images of training-set `rows` (the files, for a folder dataset)."""
    from .data import fingerprint, load_dataset, parse_classes, select_classes

    cfg, spec = info.config, info.preprocess
    if files is not None:                       # a folder dataset: read just these files
        root = Path(cfg.get("data") or "")
        out = []
        for f in files:
            try:
                out.append(to_model_array(decode_image(read_file(root / f)), spec))
            except OSError as e:
                raise _moved(root / f, e) from None
        return out
    full = load_dataset(cfg["dataset"], cfg.get("data"), "train", spec.size)
    if cfg.get("classes"):
        full = select_classes(full, parse_classes(cfg["classes"], len(full.class_names)))
    if fingerprint(full) != info.data.get("fingerprint"):
        raise _moved(full.source, "its content differs from the run's (fingerprint)")
    return [full.images[int(r)] for r in rows]


def _moved(path: object, why: object) -> DataError:
    return DataError(f"not the run's training data: {why}", path=str(path))


def contact_sheet(ev: Evidence):
    """A matplotlib Figure: one line per EvidenceRow, the image then its nearest bank images,
    each titled with its class, similarity and source."""
    from matplotlib.figure import Figure

    cols = 1 + max(len(r.rows) for r in ev.rows)
    fig = Figure(figsize=(1.6 * cols, 1.75 * len(ev.rows)))
    axes = fig.subplots(len(ev.rows), cols, squeeze=False)
    for line, r in zip(axes, ev.rows):
        line[0].imshow(r.image)
        line[0].set_title(f"{r.group}\nscore {r.score:.3f}", fontsize=6.5, color="darkred")
        for ax, row, sim in zip(line[1:], r.rows, r.sims):
            if row < 0:
                continue
            ax.imshow(ev.bank_images[int(row)])
            ax.set_title(f"{ev.class_names[ev.bank_labels[row]]}  {sim:.3f}\n"
                         f"{ev.bank_sources[row]}", fontsize=6)
        for ax in line:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
    fig.suptitle("Nearest bank images (class, similarity, source) behind the extreme scores",
                 fontsize=9)
    fig.tight_layout()
    return fig
