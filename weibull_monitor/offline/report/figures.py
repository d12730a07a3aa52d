"""The report's figures. Each takes a run and a path, draws with matplotlib's object API (no global pyplot state)
and saves a PNG."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weibull_monitor.estimator import K_GAUSSIAN
from weibull_monitor.models import COMPONENTS, expectations
from weibull_monitor.offline.report.data import RunData
from weibull_monitor.sinks.heatmap import Cells, draw_k_heatmap, k_cells
from weibull_monitor.snapshot import keys

__all__ = [
    "fig_alerts",
    "fig_class_medians",
    "fig_components",
    "fig_k_heatmap",
    "fig_layer_profile",
    "fig_scale",
    "fig_t_over_tau",
]

KLASSES = ("selection", "value", "transmission")
KLASS_COLOURS = {"selection": "#d62728", "value": "#9467bd", "transmission": "#1f77b4", "mixed": "#8c564b"}
_LEVEL_COLOURS = {"info": "#7f7f7f", "warning": "#ff7f0e", "critical": "#d62728"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _note(ax: Any, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=10,
        color="#555555",
        wrap=True,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _component_order(components: Sequence[str]) -> list[str]:
    order = {c: i for i, c in enumerate(COMPONENTS)}
    return sorted(set(components), key=lambda c: (order.get(c, len(order)), c))


def anchor_k() -> float:
    return float(K_GAUSSIAN)


def _bands(ax: Any, attention_kind: str | None, horizontal: bool = True) -> None:
    """Shade the paper's Transmission band and the Selection band for this attention kind, and draw the anchor."""
    transmission = expectations.expected_band("transmission")
    selection = expectations.expected_band("selection", attention_kind)
    span = ax.axhspan if horizontal else ax.axvspan
    line = ax.axhline if horizontal else ax.axvline
    if transmission is not None:
        span(transmission.low, transmission.high, color=KLASS_COLOURS["transmission"], alpha=0.12, lw=0,
             label=f"paper: {transmission.label} {transmission.low:.3f}-{transmission.high:.3f}")  # fmt: skip
    if selection is not None:
        span(selection.low, selection.high, color=KLASS_COLOURS["selection"], alpha=0.10, lw=0,
             label=f"paper: {selection.label} {selection.low:.2f}-{selection.high:.2f}")  # fmt: skip
    line(anchor_k(), color="black", ls="--", lw=1, label=f"Gaussian anchor k = {anchor_k():.4f}")


def _k_cells(data: RunData) -> Cells:
    """component -> {(layer, step): median k over the matrices of that layer and component}."""
    return k_cells(
        (f["component"], int(f["layer"]), int(f["step"]), float(f["k"]))
        for f in data.fits
        if f["layer"] is not None and f["k"] is not None
    )


def fig_k_heatmap(data: RunData, path: Path) -> None:
    cells = _k_cells(data)
    panels = _component_order(list(cells))
    layers = {layer for c in cells.values() for layer, _ in c}
    rows = max(1, math.ceil(len(panels) / 4))
    fig = _figure(3.6 * min(4, max(1, len(panels))) + 1, 0.25 * len(layers) * rows + 1.6 * rows + 0.6)
    draw_k_heatmap(fig, {c: cells[c] for c in panels}, data.steps, anchor_k())
    fig.suptitle(f"{data.title}: Weibull shape k per layer and step")
    fig.savefig(path)


def _mark_rewinds(ax: Any, data: RunData, x_of: dict[int, float] | None = None) -> None:
    """A vertical line at every rewind (the step training went back to), labelled with the step; on a T/τ axis
    (``x_of``: step -> T/τ) at the T/τ of that step."""
    drawn = False
    for rewind in data.rewinds:
        step = int(rewind["step"])
        x = max(step, 0) if x_of is None else x_of.get(step)
        if x is None:
            continue
        label = "rewind" if not drawn else None
        drawn = True
        ax.axvline(x, color="#444444", lw=1.2, ls="-.", alpha=0.8, label=label)
        text = "restart" if step < 0 else f"rewind to {step}"
        ax.annotate(text, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                    textcoords="offset points", fontsize=7, color="#444444", va="top", rotation=90)  # fmt: skip


def _plot_abandoned(ax: Any, data: RunData, metric: str, colour: str, t_axis: bool = False) -> bool:
    """The abandoned branches' values of ``metric``, faint and dashed, from the live point they forked from; on a
    T/τ axis each against its own T/τ (the abandoned timeline's budget, not the live one)."""
    drawn = False
    for series in data.abandoned.values():
        values = series.get(metric, {})
        x_of = series.get(keys.T_OVER_TAU, {}) if t_axis else None
        steps = sorted(s for s in values if math.isfinite(values[s]) and (x_of is None or s in x_of))
        if len(steps) < 2:
            continue
        xs = steps if x_of is None else [x_of[s] for s in steps]
        ax.plot(xs, [values[s] for s in steps], color=colour, alpha=0.3, lw=1, ls="--", marker="x", ms=3)
        drawn = True
    return drawn


def _legend_abandoned(ax: Any) -> None:
    ax.plot([], [], color="#777777", alpha=0.5, ls="--", marker="x", ms=3, label="abandoned branch (superseded)")


def _mark_alerts(ax: Any, data: RunData) -> None:
    seen: set[str] = set()
    for alert in data.alerts:
        level = alert["level"]
        label = f"alert: {level}" if level not in seen else None
        seen.add(level)
        ax.axvline(
            int(alert["step"]),
            color=_LEVEL_COLOURS.get(level, "#333333"),
            lw=1,
            alpha=0.6,
            ls=":",
            label=label,
        )


def fig_class_medians(data: RunData, path: Path) -> None:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    _bands(ax, data.attention_kind)
    drawn = abandoned = False
    for klass in (*KLASSES, "mixed"):
        steps, ks = data.series(keys.class_metric(klass, "k_median"))
        if steps:
            ax.plot(steps, ks, marker="o", ms=3, color=KLASS_COLOURS[klass], label=f"{klass} median k")
            drawn = True
        abandoned = _plot_abandoned(ax, data, keys.class_metric(klass, "k_median"), KLASS_COLOURS[klass]) or abandoned
    if abandoned:
        _legend_abandoned(ax)
    _mark_alerts(ax, data)
    _mark_rewinds(ax, data)
    if not drawn:
        _note(ax, "no class medians recorded")
    ax.set_xlabel("step")
    ax.set_ylabel("median k")
    ax.set_title(f"{data.title}: class medians (attention: {data.attention_kind or 'unknown'})")
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path)


def _plot_class_series(ax: Any, data: RunData, metric: str) -> bool:
    """One line per class of ``weibull/<class>/<metric>`` over steps; False when no class has it."""
    drawn = False
    for klass in KLASSES:
        steps, values = data.series(keys.class_metric(klass, metric))
        if steps:
            ax.plot(steps, values, marker="o", ms=3, color=KLASS_COLOURS[klass], label=klass)
            drawn = True
        _plot_abandoned(ax, data, keys.class_metric(klass, metric), KLASS_COLOURS[klass])
    if drawn:
        _mark_rewinds(ax, data)
    return drawn


def fig_scale(data: RunData, path: Path) -> None:
    fig = _figure(13, 4)
    growth_ax, lam_ax, ratio_ax = fig.subplots(1, 3)
    if _plot_class_series(growth_ax, data, "scale_growth"):
        growth_ax.axhline(1.0, color="black", lw=0.8, ls="--")
        growth_ax.set_xlabel("step")
        growth_ax.set_ylabel("λ / λ at the first snapshot (median)")
        growth_ax.legend(fontsize=7)
    else:
        _note(growth_ax, "no scale growth recorded")
    growth_ax.set_title("scale growth")

    # λ of W_o and the FFN (the paper's quantity) against √(η/λ_wd), one point per snapshot.
    points: dict[int, tuple[list[float], list[float]]] = {}
    for f in data.fits:
        lr, wd = f.get("lr"), f.get("weight_decay")
        if (
            f["klass"] != "transmission"
            or lr is None
            or wd is None
            or lr <= 0
            or wd <= 0
            or f["scale"] is None
        ):
            continue
        xs, ys = points.setdefault(int(f["step"]), ([], []))
        xs.append(math.sqrt(lr / wd))
        ys.append(float(f["scale"]))
    if points:
        steps = sorted(points)
        x = [statistics.mean(points[s][0]) for s in steps]
        y = [statistics.mean(points[s][1]) for s in steps]
        scatter = lam_ax.scatter(x, y, c=steps, cmap="viridis", s=18)
        fig.colorbar(scatter, ax=lam_ax, label="step")
        top = max(x) * 1.1
        constant = expectations.PYTHIA_SCALE_PER_SQRT_LR_WD
        lam_ax.plot([0, top], [0, constant * top], color="black", ls="--", lw=1,
                    label=f"Pythia terminal: λ = {constant}·√(η/λ_wd)")  # fmt: skip
        lam_ax.set_xlabel("√(η/λ_wd)")
        lam_ax.set_ylabel("mean λ, transmission matrices")
        lam_ax.legend(fontsize=7)
    else:
        _note(lam_ax, "η and λ_wd unknown\n(no optimizer recorded, or no weight decay)")
    lam_ax.set_title("λ against √(η/λ_wd)")

    if _plot_class_series(ratio_ax, data, "scale_over_sqrt_lr_wd"):
        ratio_ax.axhline(
            expectations.PYTHIA_SCALE_PER_SQRT_LR_WD, color="black", ls="--", lw=1, label="Pythia 0.087"
        )
        ratio_ax.set_xlabel("step")
        ratio_ax.set_ylabel("λ / √(η/λ_wd) (median)")
        ratio_ax.legend(fontsize=7)
    else:
        _note(ratio_ax, "λ/√(η/λ_wd) undefined\n(no learning rate or no weight decay)")
    ratio_ax.set_title("λ / √(η/λ_wd)")
    fig.suptitle(f"{data.title}: scale")
    fig.savefig(path)


def fig_t_over_tau(data: RunData, path: Path) -> None:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    steps = [s for s in data.steps if s in data.t_over_tau]
    if len(steps) < 1:
        _note(ax, "T/τ undefined for this run\n(no optimizer recorded, or no weight decay)")
    else:
        _bands(ax, data.attention_kind)
        x_of = data.t_over_tau
        for klass in (*KLASSES, "mixed"):
            values = data.metrics.get(keys.class_metric(klass, "k_median"), {})
            xs = [x_of[s] for s in steps if s in values]
            ys = [values[s] for s in steps if s in values]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, color=KLASS_COLOURS[klass], label=f"{klass} median k")
            _plot_abandoned(ax, data, keys.class_metric(klass, "k_median"), KLASS_COLOURS[klass], t_axis=True)
        if data.abandoned:
            _legend_abandoned(ax)
        _mark_rewinds(ax, data, x_of)
        ax.set_xlabel("T/τ = Σ η_t·λ_wd (training budget in units of the AdamW timescale)")
        ax.set_ylabel("median k")
        ax.legend(fontsize=7)
    ax.set_title(f"{data.title}: class medians against T/τ")
    fig.savefig(path)


def fig_alerts(data: RunData, path: Path) -> None:
    fig = _figure(8, 2.5 + 0.25 * len({a["rule"] for a in data.alerts}))
    ax = fig.add_subplot()
    if not data.alerts:
        _note(ax, "no alerts recorded for this run")
    else:
        rules = sorted({a["rule"] for a in data.alerts})
        for level, colour in _LEVEL_COLOURS.items():
            chosen = [a for a in data.alerts if a["level"] == level]
            if chosen:
                ax.scatter([int(a["step"]) for a in chosen], [rules.index(a["rule"]) for a in chosen],
                           color=colour, label=level, s=30, marker="D")  # fmt: skip
        ax.set_yticks(range(len(rules)), rules, fontsize=8)
        ax.set_xlabel("step")
        if data.steps:
            ax.set_xlim(min(data.steps) - 1, max(data.steps) + 1)
        _mark_rewinds(ax, data)
        ax.legend(fontsize=7)
    ax.set_title(f"{data.title}: alerts")
    fig.savefig(path)


def fig_layer_profile(data: RunData, path: Path) -> None:
    cells = _k_cells(data)
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    components = _component_order(list(cells))
    if not components:
        _note(ax, "no layered matrices")
    else:
        _bands(ax, data.attention_kind)
        step = data.steps[-1] if data.steps else None
        for component in components:
            points = sorted((layer, k) for (layer, s), k in cells[component].items() if s == step)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4, label=component)
        ax.set_xlabel("layer")
        ax.set_ylabel("k")
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{data.title}: k per layer (attention: {data.attention_kind or 'unknown'})")
    fig.savefig(path)


def fig_components(data: RunData, path: Path) -> None:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    by_component: dict[str, list[float]] = {}
    for f in data.fits:
        if f["k"] is not None:
            label = f["component"] + ("*" if f["fused_parent"] else "")
            by_component.setdefault(label, []).append(float(f["k"]))
    labels = _component_order([c.rstrip("*") for c in by_component])
    ordered = [c for base in labels for c in (base, base + "*") if c in by_component]
    if not ordered:
        _note(ax, "no fits")
    else:
        _bands(ax, data.attention_kind)
        for i, label in enumerate(ordered):
            ks = by_component[label]
            ax.scatter([i] * len(ks), ks, s=12, alpha=0.7)
            ax.plot([i - 0.3, i + 0.3], [statistics.median(ks)] * 2, color="black", lw=2)
        ax.set_xticks(range(len(ordered)), ordered, rotation=30, fontsize=8)
        ax.set_ylabel("k (bar: median)")
        ax.legend(fontsize=7)
    ax.set_title(f"{data.title}: k of every matrix by component (* = split view of a fused matrix)")
    fig.savefig(path)
