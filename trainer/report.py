"""Write an evaluation to a folder: report.json, report.md (paper Table 3 layout) and PNG plots.

Use `evaluate_run(run_dir, ood={...}, out=REPORT_DIR)` to evaluate a run and write its report
(what `rwood-eval` and `rwood-train --ood` call), or `write_report(evaluation, out_dir)` after
`trainer.evaluate.evaluate`; `detection_table` and `quality_table` format the same numbers for
several runs side by side (bench/paper_table.py). This module imports `trainer.evaluate`, never
the other way round. Every file is written atomically (temp file + os.replace). Plots use
matplotlib's object API (`matplotlib.figure.Figure`, Agg canvas), never pyplot, so no global
backend state is touched; report.md links exactly the plots written:
- score_histograms.png (with OOD sets only): ID vs each OOD set's scores as counts of images, the
  95%-TPR threshold as a dashed line on a bin edge (`histogram_bins`: no bar straddles it, and the
  lowest 1% drawn in the first bin never crosses it);
- roc.png (with OOD sets only): ROC curve of each OOD set (ID positive);
- embedding_2d.png: PCA (numpy SVD, fitted on the ID test embeddings), one colour and legend
  entry per class name (`class_colours`, no greys), OOD sets as lighter grey/black markers drawn
  underneath and subsampled.
- neighbors.png (when the bank images can be read back, `trainer.evidence`): the best-scored ID
  and the worst- and best-scored OOD images, each next to its nearest bank images.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from detector_server.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic

from .evaluate import Evaluation, evaluate
from .evidence import SHEET, contact_sheet

__all__ = ["evaluate_run", "write_report", "render_markdown", "detection_table", "quality_table",
           "detection_summary", "PLOTS", "pca_2d", "histogram_bins", "class_colours"]

PLOTS = ("score_histograms.png", "roc.png", "embedding_2d.png")   # the plots of every report
_MAX_ID_POINTS, _MAX_OOD_POINTS = 2000, 500   # points drawn in the 2-D projection


def evaluate_run(run_dir: str | Path, id_test: str | None = None,
                 ood: dict[str, str] | None = None, postprocessor: str = "knn",
                 k: int | None = None, feature: str = "penultimate", batch_size: int = 512,
                 device: str = "auto", out: str | Path | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """`trainer.evaluate.evaluate`, then `write_report` to `out` when given (nothing otherwise).

    Returns the report dict (report.json's content). Errors: those of `evaluate`.
    """
    ev = evaluate(run_dir, id_test=id_test, ood=ood, postprocessor=postprocessor, k=k,
                  feature=feature, batch_size=batch_size, device=device, progress=progress)
    if out is not None:
        write_report(ev, out)
    return ev.report


def write_report(ev: Evaluation, out_dir: str | Path) -> list[Path]:
    """Write report.json, the plots, then report.md (linking the plots written) into `out_dir`
    (created). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", ev.report, default=str)
    figures = {"embedding_2d.png": _embedding_figure}
    if len(ev.scores) > 1:  # histograms and ROC compare ID with OOD sets: none without them
        figures.update({"score_histograms.png": _histogram_figure, "roc.png": _roc_figure})
    if ev.evidence is not None and ev.evidence.bank_images is not None:
        figures[SHEET] = lambda e: contact_sheet(e.evidence)
    plots = [name for name in (*PLOTS, SHEET) if name in figures]
    for name in plots:
        buf = io.BytesIO()
        figures[name](ev).savefig(buf, format="png", dpi=110, bbox_inches="tight")
        write_bytes_atomic(out / name, buf.getvalue())
    write_text_atomic(out / "report.md", render_markdown(ev.report, plots=plots))
    return [out / "report.json", *(out / name for name in plots), out / "report.md"]


# ------------------------------------------------------------------------------ markdown
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}"


def detection_table(rows: dict[str, dict[str, Any]]) -> str:
    """Paper Table 3 layout: one row per run/method, FPR@95 and AUROC per OOD set, then average.

    rows: label -> report dict (report.json content); OOD sets are the union, in first-seen order.
    """
    sets = list(dict.fromkeys(n for r in rows.values() for n in r["ood"]))
    head = ["method"] + [f"{n} {m}" for n in sets + ["average"] for m in ("FPR@95↓", "AUROC↑")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        cells = [label]
        for n in sets:
            m = r["ood"].get(n, {})
            cells += [_pct(m.get("fpr@95")), _pct(m.get("auroc"))]
        cells += [_pct(r["average"].get("fpr@95")), _pct(r["average"].get("auroc"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_table(rows: dict[str, dict[str, Any]]) -> str:
    """Embedding quality per run/method and feature: mean MES radius, dispersion, ID accuracy."""
    lines = ["| method | feature | mean MES radius ↓ | dispersion (mean centroid cosine) ↓ | "
             "KNN accuracy ↑ |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        for feat, q in r["embedding_quality"].items():
            if isinstance(q, dict):
                lines.append(f"| {label} | {feat} | {q['mean_radius']:.4f} | {q['dispersion']:.4f} |"
                             f" {_pct(r['accuracy'].get('knn'))} |")
    return "\n".join(lines)


# What each column of the detection table counts (report.json keys in brackets).
_CONVENTIONS = (
    "- FPR@95 [`fpr@95`]: ID is the positive class (the paper's convention). The fraction of OOD "
    "images scored at or above the threshold that keeps 95% of the ID test images.",
    "- AUROC [`auroc`]: the same number whichever class is positive.",
    "- AUPR-In [`aupr_in`]: ID positive. AUPR-Out [`aupr_out`]: OOD positive, on the negated "
    "score. Both are average precision.",
    "- FPR@95 OOD-positive [`fpr@95_ood_positive`]: OOD is the positive class (the FPR@95 of "
    "OpenOOD's evaluator, the one the authors' released code reports). The fraction of ID images "
    "flagged as OOD at the threshold that flags 95% of the OOD images. Do not compare it with "
    "the first column.",
)


def detection_summary(report: dict[str, Any]) -> str:
    """The detection table of report.md (per OOD set and the average) as printed by the CLIs."""
    md = render_markdown(report)
    return md[md.index("## Detection"):md.index("## In-distribution")].rstrip()


def render_markdown(report: dict[str, Any], plots: list[str] | tuple[str, ...] = ()) -> str:
    """report.md: settings, the per-set detection table with the average, accuracy, quality, and
    links to `plots` (file names beside report.md; the section is left out when there are none)."""
    s = report["settings"]
    t = s["id_test"]
    scorer = f"**{s['postprocessor']}**" + (f" (K={s['k']})" if s["postprocessor"] == "knn" else "")
    lines = [f"# OOD evaluation of `{report['run_dir']}`", "",
             f"ID test: **{t['name']}** ({t['n']} images, {t['source']}). Scorer: {scorer} on "
             f"the **{s['feature']}** feature, bank of {s['bank_size']} training embeddings; a "
             f"higher score means more in-distribution. Numbers in %.", "",
             "## Detection", "", *_CONVENTIONS,
             f"(The ID-positive threshold is {report['id']['threshold@95']:.4f}.)", "",
             "| OOD set | N | FPR@95 ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ | FPR@95 OOD-positive ↓ |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["ood"].items():
        lines.append(f"| {name} | {m['n']} | {_pct(m['fpr@95'])} | {_pct(m['auroc'])} | "
                     f"{_pct(m['aupr_in'])} | {_pct(m['aupr_out'])} | "
                     f"{_pct(m.get('fpr@95_ood_positive'))} |")
    if report["average"]:
        a = report["average"]
        lines.append(f"| **average** | | **{_pct(a['fpr@95'])}** | **{_pct(a['auroc'])}** | "
                     f"{_pct(a['aupr_in'])} | {_pct(a['aupr_out'])} | "
                     f"{_pct(a.get('fpr@95_ood_positive'))} |")
    else:
        lines.append("| (no OOD sets given) | | | | | | |")
    lines += ["", "## In-distribution accuracy", "", "| classifier | accuracy (%) |", "|---|---|"]
    lines += [f"| {name} | {_pct(acc)} |" for name, acc in report["accuracy"].items()]
    lines += ["", "## Embedding quality (bank, paper section 4.1)", "",
              "| feature | mean MES radius ↓ | dispersion (mean pairwise centroid cosine) ↓ |",
              "|---|---|---|"]
    for feat, q in report["embedding_quality"].items():
        if isinstance(q, dict):
            lines.append(f"| {feat} | {q['mean_radius']:.4f} | {q['dispersion']:.4f} |")
    lines += ["", report["embedding_quality"]["note"]]
    figures = [p for p in plots if p != SHEET]
    if figures:
        lines += ["", "## Plots", "", *(f"![{p[:-4]}]({p})" for p in figures)]
    if SHEET in plots or report.get("evidence", {}).get("note"):
        lines += ["", "## Evidence: the nearest bank images", "",
                  "The best-scored ID images and each OOD set's worst- and best-scored images, "
                  "each next to the bank rows behind its KNN score (class, similarity, source: "
                  "`train#i` is row i of the training set)."
                  " For a bundle with this feature and a Flat index, `rwood-serve` returns "
                  "these rows for `neighbors`.", ""]
        lines.append(f"![neighbors]({SHEET})" if SHEET in plots
                     else f"No contact sheet: {report['evidence']['note']}.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ plots
def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 4.0)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def histogram_bins(id_scores: np.ndarray, ood_scores: np.ndarray, threshold: float,
                   bins: int = 50) -> tuple[np.ndarray, float]:
    """Bin edges for the score histogram with `threshold` as one of them, and the value below
    which scores are drawn in the first bin (the lowest 1% of both sets, or lower).

    Every bar then lies wholly on one side of the threshold line, and a score drawn in the first
    bin stays on its side: the bars left of the line hold exactly the scores below the threshold
    (those the deployed detector flags). Returns (float64 edges, ascending; clip value).
    """
    both = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    lo, hi = float(np.percentile(both, 1)), float(both.max())
    below = both[both < threshold]
    lo = min(lo, threshold)
    if below.size and lo >= threshold:   # fewer than 1% below: draw them where they are
        lo = float(below.min())
    hi = max(hi, threshold)
    width = (hi - lo) / bins if hi > lo else max(1e-3, 1e-3 * abs(threshold))
    left = threshold - width * np.arange(int(np.ceil((threshold - lo) / width - 1e-9)), 0, -1)
    right = threshold + width * np.arange(0, int(np.floor((hi - threshold) / width + 1e-9)) + 2)
    return np.concatenate([left, right]), lo


def _histogram_figure(ev: Evaluation):
    names = [n for n in ev.scores if n != "id"]
    ncols = min(3, len(names))
    fig, axes = _figure(ncols, -(-len(names) // ncols), (4.6, 3.4))
    thr = ev.report["id"]["threshold@95"]
    for ax, name in zip(axes.flat, names):
        edges, lo = histogram_bins(ev.scores["id"], ev.scores[name], thr)
        for s, label, color in ((ev.scores["id"], "ID", "tab:blue"),
                                (ev.scores[name], name, "tab:red")):
            ax.hist(np.maximum(s, lo), bins=edges, alpha=0.55, color=color,
                    label=f"{label} ({len(s):,})")
        ax.axvline(thr, color="k", linestyle="--", linewidth=1.2, label="95% TPR threshold")
        ax.set_title(f"{name}: FPR@95 {_pct(ev.report['ood'][name]['fpr@95'])}%", fontsize=10)
        ax.set_xlabel("score (higher = more ID; lowest 1% drawn in the first bin)")
        ax.set_ylabel("images (count)")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _roc_figure(ev: Evaluation):
    from sklearn.metrics import roc_curve

    fig, axes = _figure(1, 1, (5.0, 4.6))
    ax = axes[0, 0]
    for name in (n for n in ev.scores if n != "id"):
        y = np.r_[np.ones(len(ev.scores["id"])), np.zeros(len(ev.scores[name]))]
        fpr, tpr, _ = roc_curve(y, np.r_[ev.scores["id"], ev.scores[name]])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {_pct(ev.report['ood'][name]['auroc'])}%)")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    ax.axhline(0.95, color="k", linestyle="--", linewidth=0.8, label="TPR 95%")
    ax.set_xlabel("false positive rate (OOD accepted)")
    ax.set_ylabel("true positive rate (ID accepted)")
    ax.set_title("ROC, in-distribution positive")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def pca_2d(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Project `fit` and `others` ([N, D] each) on the top-2 principal axes of `fit` (numpy SVD)."""
    mean = fit.mean(axis=0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    return [(x - mean) @ vt[:2].T for x in (fit, *others)]


def _embedding_figure(ev: Evaluation):
    """PCA of the ID test embeddings, one colour and legend entry per class (names); OOD sets as
    grey/black markers, drawn first, lighter and subsampled, so ID points stay visible."""
    rng = np.random.default_rng(0)
    id_emb, labels = ev.embeddings["id"], ev.id_labels
    keep = np.sort(rng.choice(len(id_emb), min(len(id_emb), _MAX_ID_POINTS), replace=False))
    names = [n for n in ev.embeddings if n != "id"]
    per_set = min(_MAX_OOD_POINTS, max(100, 2 * len(keep)))   # OOD never swamps a small ID set
    ood = [ev.embeddings[n][np.sort(rng.choice(len(ev.embeddings[n]),
                                               min(len(ev.embeddings[n]), per_set),
                                               replace=False))] for n in names]
    proj = pca_2d(id_emb[keep], *ood)
    fig, axes = _figure(1, 1, (7.0, 5.6))
    ax = axes[0, 0]
    for i, (p, name) in enumerate(zip(proj[1:], names)):
        ax.scatter(p[:, 0], p[:, 1], marker="x+^vsd*"[i % 7], s=12, alpha=0.3,
                   color=_OOD_COLOURS[i % len(_OOD_COLOURS)], linewidths=0.7, zorder=1,
                   label=f"OOD: {name} ({len(p)} of {len(ev.embeddings[name])})")
    shown = labels[keep]
    colours = class_colours(len(ev.class_names))
    for c in [c for c in range(len(ev.class_names)) if np.any(shown == c)]:
        pts = proj[0][shown == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=10, alpha=0.85, color=colours[c], zorder=2,
                   label=ev.class_names[c] if len(ev.class_names) <= _MAX_LEGEND_CLASSES else None)
    if np.any(shown < 0):   # ID images without a class label
        pts = proj[0][shown < 0]
        ax.scatter(pts[:, 0], pts[:, 1], s=10, alpha=0.85, color="tab:blue", zorder=2,
                   label="ID (no class label)")
    ax.set_title(f"PCA of ID test {ev.report['settings']['feature']} embeddings (by class), "
                 "OOD overlaid", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.5)
    fig.tight_layout()
    return fig


_MAX_LEGEND_CLASSES = 20
_OOD_COLOURS = ("black", "0.45", "0.25", "0.6")          # greys: never a class colour


def class_colours(n: int) -> list[tuple[float, float, float, float]]:
    """n distinct RGBA class colours, none grey (grey and black are the OOD markers): tab10
    without its grey for up to 9 classes, tab20 without its greys for up to 18, else hsv."""
    from matplotlib import colormaps

    if n <= 9:
        return [colormaps["tab10"](i) for i in range(10) if i != 7][:n]
    if n <= 18:
        return [colormaps["tab20"](i) for i in range(20) if i not in (14, 15)][:n]
    return [colormaps["hsv"](i / n) for i in range(n)]
