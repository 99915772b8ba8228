"""The score histogram of `rwood-score --plot`: all scores of a table and the bundle's threshold.

Use `plot_scores(scores, threshold, path)` to see at a glance how a folder splits around the
threshold; `score_folder(..., plot=PATH)` calls it on the finished table. matplotlib is not a
runtime dependency: `check_available()` raises the InputError that says how to install it, so
the driver refuses `--plot` before scoring anything. Test: tests/runtime/test_score_folder.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["plot_scores", "check_available"]


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
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    return fig


def plot_scores(scores: np.ndarray, threshold: float, path: str | os.PathLike,
                title: str = "") -> Path:
    """Save a histogram of `scores` (float [N]; nan = error rows, left out) with the threshold
    line to `path` (PNG, PDF or SVG by suffix). Needs matplotlib (InputError otherwise)."""
    fig = _figure()
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    ax = fig.add_subplot(1, 1, 1)
    ood = int((s < threshold).sum())
    ax.hist(s, bins=min(80, max(10, int(np.sqrt(max(1, s.size))))), color="tab:blue", alpha=0.8)
    ax.axvline(threshold, color="tab:red", linestyle="--",
               label=f"threshold {threshold:.4g}: {ood} of {s.size} OOD")
    ax.set_xlabel("KNN score (higher = more in-distribution)")
    ax.set_ylabel("images")
    ax.set_title(f"rwood-score {title}".strip())
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot save the plot: {e}", path=path) from None
    return path
