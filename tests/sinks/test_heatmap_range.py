"""The heatmap's colour range comes from the paper's classes: an ``other`` panel (a LoRA factor, an embedding) far
from the anchor is drawn clipped and does not wash out the rest."""

from __future__ import annotations

import pytest

from weibull_monitor.sinks.heatmap import MIN_SPREAD, colour_spread, draw_k_heatmap

ANCHOR = 1.2054


def test_other_and_recurrent_panels_do_not_set_the_colour_range():
    cells = {
        "q": {(0, 0): 1.10, (1, 0): 1.15},
        "ffn_up": {(0, 0): 1.19, (1, 0): 1.21},
        "other": {(0, 0): 0.6, (1, 0): 1.8},
        "rec_in": {(0, 0): 2.5},
    }
    assert colour_spread(cells, ANCHOR) == pytest.approx(ANCHOR - 1.10)
    # with only such panels there is nothing else to scale to
    assert colour_spread({"other": {(0, 0): 0.6}}, ANCHOR) == pytest.approx(ANCHOR - 0.6)
    assert colour_spread({"q": {(0, 0): ANCHOR}}, ANCHOR) == MIN_SPREAD


def test_the_drawn_colour_bar_uses_that_range():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure()
    cells = {"q": {(0, 0): 1.1, (0, 1): 1.15}, "other": {(0, 0): 0.6, (0, 1): 1.8}}
    draw_k_heatmap(figure, cells, [0, 1], ANCHOR)
    image = figure.axes[0].images[0]
    assert image.norm.vmin == pytest.approx(ANCHOR - (ANCHOR - 1.1))
    assert image.norm.vmax == pytest.approx(ANCHOR + (ANCHOR - 1.1))
