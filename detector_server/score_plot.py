"""The score histogram of `rwood-score --plot`: all scores of a table and the bundle's threshold.

Use `plot_scores(scores, threshold, path)` to see at a glance how a folder splits around the
threshold; `score_folder(..., plot=PATH)` calls it on the finished table. matplotlib is not a
runtime dependency: `check_available()` raises the InputError that says how to install it, so
the driver refuses `--plot` before scoring anything.

What the plot promises (`histogram_bins` computes it, `score_figure` draws it):
- counts, on an integer axis; bars left of the threshold (OOD) and right of it (ID) in two colours;
- the threshold is a bin edge, so no bar mixes OOD and ID images;
- the axis spans the bulk of the scores (Tukey's far-out fences, 3 IQR beyond the quartiles,
  widened to hold the threshold): a few far outliers do not squeeze everything into one bar.
  Scores outside it are not clipped into the edge bars; the legend counts them;
- the legend sits beside the axes, never over a bar.
Test: tests/runtime/test_score_plot.py.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["plot_scores", "score_figure", "histogram_bins", "Histogram", "check_available"]

_MIN_BINS, _MAX_BINS = 10, 60
_FENCE_IQR = 3.0                # Tukey's far-out fences


def check_available() -> None:
    """Raise InputError (how to install it) when matplotlib cannot be imported."""
    _figure()


def _figure() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib (or drop --plot)",
                         field="plot") from None
    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    return fig


@dataclass(frozen=True)
class Histogram:
    """Bins of the finite scores: edges float64 [B + 1] (the threshold is one of them), counts
    int64 [B], and the scores left out below edges[0] and above edges[-1]."""

    edges: np.ndarray
    counts: np.ndarray
    below: int
    above: int
    ood: int                    # scores < threshold, outliers included
    total: int                  # finite scores
    lowest: float               # the extremes of the finite scores (nan when there are none)
    highest: float


def histogram_bins(scores: np.ndarray, threshold: float) -> Histogram:
    """Bin `scores` (float [N]; nan = error rows, left out) as the module docstring says."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    t = float(threshold)
    if s.size == 0:
        return Histogram(np.array([t - 1.0, t, t + 1.0]), np.zeros(2, np.int64), 0, 0, 0, 0,
                         math.nan, math.nan)
    q1, q3 = np.quantile(s, [0.25, 0.75])
    fence = _FENCE_IQR * (q3 - q1) if q3 > q1 else math.inf
    bulk = s[(s >= q1 - fence) & (s <= q3 + fence)]
    lo, hi = min(float(bulk.min()), t), max(float(bulk.max()), t)
    span = hi - lo or max(abs(t), 1.0) * 0.1
    inside = int(((s >= lo) & (s <= hi)).sum())
    n_bins = int(np.clip(round(math.sqrt(inside)), _MIN_BINS, _MAX_BINS))
    width = span / n_bins
    # Edges on a grid through the threshold: t + k * width, covering [lo, hi].
    k_lo, k_hi = math.floor((lo - t) / width), math.ceil((hi - t) / width)
    k_lo, k_hi = min(k_lo, -1), max(k_hi, 1)
    edges = t + width * np.arange(k_lo, k_hi + 1, dtype=np.float64)
    edges[-k_lo] = t                                     # exactly, whatever the rounding
    edges[0], edges[-1] = min(edges[0], lo), max(edges[-1], hi)
    below, above = int((s < edges[0]).sum()), int((s > edges[-1]).sum())
    # Bins are [a, b) (the last [a, b]): a score equal to the threshold is ID, as is_ood is
    # score < threshold.
    counts = np.histogram(s[(s >= edges[0]) & (s <= edges[-1])], bins=edges)[0]
    return Histogram(edges, counts.astype(np.int64), below, above, int((s < t).sum()), s.size,
                     float(s.min()), float(s.max()))


def score_figure(scores: np.ndarray, threshold: float, title: str = "") -> Any:
    """The histogram figure of `scores` (see the module docstring); needs matplotlib."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    h = histogram_bins(scores, threshold)
    ax = fig.add_subplot(1, 1, 1)
    left, widths = h.edges[:-1], np.diff(h.edges)
    is_ood = left < threshold
    for mask, colour, label in ((is_ood, "tab:orange", "OOD (score < threshold)"),
                                (~is_ood, "tab:blue", "ID")):
        ax.bar(left[mask], h.counts[mask], width=widths[mask], align="edge", color=colour,
               edgecolor="white", linewidth=0.5, label=f"{label}: {_n_side(h, mask)}")
    ax.axvline(threshold, color="tab:red", linestyle="--",
               label=f"threshold {threshold:.4g}: {h.ood} of {h.total} OOD")
    if h.below:
        ax.plot([], [], " ", label=f"not drawn: {h.below} below the axis (lowest {h.lowest:.4g})")
    if h.above:
        ax.plot([], [], " ", label=f"not drawn: {h.above} above the axis (highest "
                                   f"{h.highest:.4g})")
    ax.set_xlim(h.edges[0], h.edges[-1])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("KNN score (higher = more in-distribution)")
    ax.set_ylabel("images (count)")
    ax.set_title(f"rwood-score {title}".strip(), fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    return fig


def _n_side(h: Histogram, mask: np.ndarray) -> int:
    """Images on one side of the threshold that the bars show."""
    return int(h.counts[mask].sum())


def plot_scores(scores: np.ndarray, threshold: float, path: str | os.PathLike,
                title: str = "") -> Path:
    """Save the histogram of `scores` (float [N]; nan = error rows, left out) with the threshold
    line to `path` (PNG, PDF or SVG by suffix). Needs matplotlib (InputError otherwise)."""
    fig = score_figure(scores, threshold, title)
    path = Path(path)
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot save the plot: {e}", path=path) from None
    return path
