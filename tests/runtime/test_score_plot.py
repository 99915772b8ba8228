"""rwood-score --plot (detector_server.score_plot), checked through the plot's data and geometry:
bin edges against the threshold, the bars' counts, integer count ticks, outliers counted instead
of squeezing the rest into one bar, and a legend that covers no bar. Scores are real: those the
tiny bundle gives digits it never saw, plus one far outlier."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector_server.score_plot import histogram_bins, plot_scores, score_figure

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def scores(tiny_bundle: Path, id_images: np.ndarray) -> tuple[np.ndarray, float]:
    """99 real scores and one far outlier, and a threshold inside the bulk."""
    from detector_server.detector import Detector

    det = Detector(tiny_bundle, device="cpu", threads=1)
    s = det.score_arrays(id_images[:99]).scores.astype(np.float64)
    return np.r_[s, s.min() - 50 * (s.max() - s.min())], float(np.quantile(s, 0.3))


def test_one_outlier_does_not_squeeze_the_rest_into_one_bar(scores):
    """Before: 10 bins spanning min..max, so one outlier put almost every image in one bar that
    the threshold split."""
    s, t = scores
    h = histogram_bins(s, t)
    assert 1 <= h.below + h.above <= 5 and h.counts.sum() + h.below + h.above == 100
    assert h.counts.max() <= 40, h.counts
    assert len(h.counts) >= 10
    assert t in h.edges, "the threshold is a bin edge: no bar mixes OOD and ID"
    left = h.edges[:-1] < t
    assert h.counts[left].sum() + h.below == h.ood == int((s < t).sum())
    assert h.edges[0] <= np.sort(s)[h.below] and h.edges[-1] >= s.max()
    assert h.lowest == s.min()


def test_figure_has_integer_counts_two_sides_and_a_legend_off_the_bars(scores, tmp_path):
    """Before: fractional count ticks (0.5, 1.5, ...) and a legend inside the axes, over the
    tallest bar."""
    s, t = scores
    fig = score_figure(s, t, "tiny")
    fig.canvas.draw()
    ax = fig.axes[0]
    ticks = ax.get_yticks()
    assert np.all(ticks == np.round(ticks)), ticks
    bars = [p for c in ax.containers for p in c.patches]
    heights = np.array([b.get_height() for b in bars])
    h = histogram_bins(s, t)
    assert sorted(heights.tolist()) == sorted(h.counts.tolist())
    colours = {b.get_facecolor() for b in bars if b.get_x() + b.get_width() <= t}
    colours_id = {b.get_facecolor() for b in bars if b.get_x() >= t}
    assert len(colours) == len(colours_id) == 1 and colours != colours_id
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(legend.overlaps(b.get_window_extent(renderer)) for b in bars)
    assert legend.x0 >= ax.get_window_extent(renderer).x1, "beside the axes"
    assert fig.bbox.contains(legend.x1 - 1, legend.y0 + 1), "and inside the figure"
    labels = [x.get_text() for x in ax.get_legend().get_texts()]
    assert any(f"{h.ood} of 100 OOD" in x for x in labels)
    assert any(f"{h.below} below the axis" in x for x in labels)
    assert ax.get_ylabel() == "images (count)"
    png = plot_scores(s, t, tmp_path / "h.png")
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("case", ["all_equal", "all_below", "with_errors", "none"])
def test_edge_cases_keep_the_threshold_on_an_edge(case):
    t = -0.3
    s = {"all_equal": np.full(7, -0.2), "all_below": np.linspace(-0.9, -0.5, 20),
         "with_errors": np.r_[np.linspace(-0.5, -0.1, 20), np.nan, np.nan],
         "none": np.array([np.nan])}[case]
    h = histogram_bins(s, t)
    assert t in h.edges and np.all(np.diff(h.edges) > 0)
    assert h.counts.sum() + h.below + h.above == h.total == int(np.isfinite(s).sum())
    assert h.ood == int((s[np.isfinite(s)] < t).sum())
