"""The layer x step heatmap of k: one renderer for the W&B sink and the report, one colour scale.

The colour scale is centred on the Gaussian anchor (white), blue below it (heavier-tailed |w|, e.g. Selection),
red above it; its range comes from the panels of the paper's classes only (``other`` and ``recurrent`` panels, a
LoRA factor or an embedding, are drawn clipped to it). Matplotlib's object API only (no pyplot state), so drawing is safe outside the main thread.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from weibull_monitor.models.components import KLASS_OF_COMPONENT

__all__ = ["HEATMAP_GROUPS", "Cells", "KHistory", "colour_spread", "draw_k_heatmap", "k_cells", "render_k_heatmap"]

#: panel -> {(layer, step): median k over the matrices of that layer in that panel}
Cells = dict[str, dict[tuple[int, int], float]]

#: Dashboard panels: label -> components whose per-layer median k fills that panel.
HEATMAP_GROUPS = {
    "Q": ("q",),
    "K": ("k",),
    "FFN": ("ffn_up", "ffn_gate", "ffn_down", "ffn_gate_up"),
}

COLOUR_MAP = "RdBu_r"
#: The colour range never shrinks below +-this around the anchor (an almost untrained run stays pale).
MIN_SPREAD = 0.02


def k_cells(points: Iterable[tuple[str, int, int, float]]) -> Cells:
    """(panel, layer, step, k) points -> median k per panel, layer and step."""
    grouped: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for panel, layer, step, k in points:
        if math.isfinite(k):
            grouped[panel][(int(layer), int(step))].append(float(k))
    return {p: {cell: statistics.median(ks) for cell, ks in d.items()} for p, d in grouped.items()}


class KHistory:
    """Per-layer median k of the dashboard panels (Q, K, FFN) over the snapshots seen so far.

    Kept by the sink, not read back from the dashboard, so drawing a heatmap costs no network round trip.
    """

    def __init__(self, groups: Mapping[str, tuple[str, ...]] = HEATMAP_GROUPS) -> None:
        self.groups = dict(groups)
        self.steps: list[int] = []
        self.cells: Cells = {g: {} for g in self.groups}

    def add(self, snapshot: Any) -> None:
        points = []
        for key, fit in snapshot.fits.items():
            role = snapshot.roles.get(key)
            if role is None or role.layer is None or not fit.ok:
                continue
            points += [
                (g, role.layer, snapshot.step, fit.k)
                for g, comps in self.groups.items()
                if role.component in comps
            ]
        if snapshot.step not in self.steps:
            self.steps.append(snapshot.step)
        for group, cells in k_cells(points).items():
            self.cells[group].update(cells)

    def matrix(self, group: str) -> tuple[list[int], list[int], list[list[float]]]:
        """(layers, steps, rows of k with nan where a layer had no fit at a step) for one panel."""
        cells = self.cells[group]
        layers = sorted({layer for layer, _ in cells})
        steps = sorted(self.steps)
        return layers, steps, [[cells.get((layer, step), math.nan) for step in steps] for layer in layers]


def draw_k_heatmap(
    figure: Any, cells: Cells, steps: Sequence[int], anchor: float, *, columns: int = 4, label_size: int = 7
) -> None:
    """Draw one panel per key of ``cells`` (in order) on ``figure``, with one colour bar centred on ``anchor``."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    panels = [p for p in cells if cells[p]]
    steps = sorted(steps)
    if not panels:
        ax = figure.add_subplot()
        ax.text(0.5, 0.5, "no layered matrices", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    spread = colour_spread(cells, anchor)
    norm = TwoSlopeNorm(vcenter=anchor, vmin=anchor - spread, vmax=anchor + spread)
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    step_index = {s: i for i, s in enumerate(steps)}
    for ax, panel in zip(axes.flat, panels):
        layers = sorted({layer for layer, _ in cells[panel]})
        grid = np.full((len(layers), len(steps)), np.nan)
        for (layer, step), k in cells[panel].items():
            if step in step_index:
                grid[layers.index(layer), step_index[step]] = k
        image = ax.imshow(
            grid, aspect="auto", origin="lower", cmap=COLOUR_MAP, norm=norm, interpolation="nearest"
        )
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel("layer")
        ax.set_xlabel("step")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=label_size)
        ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 5))})
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=label_size)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if image is not None:
        figure.colorbar(image, ax=axes, label=f"k (white: Gaussian anchor {anchor:.4f})", shrink=0.9)


#: Panels (components) whose k may lie far from the paper's classes: they never set the colour range (their cells
#: beyond it show the end colours), so one LoRA factor or embedding does not wash out every other panel.
OUTSIDE_THE_RANGE_CLASSES = ("other", "recurrent")


def colour_spread(cells: Cells, anchor: float) -> float:
    """Half-width of the colour range around the anchor: the largest |k - anchor| over the panels of the paper's
    classes (all panels when there are none), never below :data:`MIN_SPREAD`."""
    panels = [p for p in cells if cells[p]]
    ranged = [p for p in panels if KLASS_OF_COMPONENT.get(p) not in OUTSIDE_THE_RANGE_CLASSES] or panels
    values = [k for p in ranged for k in cells[p].values() if math.isfinite(k)]
    return max([MIN_SPREAD, *(abs(k - anchor) for k in values)])


def render_k_heatmap(history: KHistory, anchor: float) -> Any:
    """An RGB uint8 array (H, W, 3) of the history's heatmap, for dashboards that take images."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [g for g in history.groups if history.cells.get(g)]
    figure = Figure(figsize=(4.2 * max(1, len(panels)) + 1, 3.4), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    draw_k_heatmap(
        figure, {g: history.cells[g] for g in panels}, history.steps, anchor, columns=max(1, len(panels))
    )
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
