"""``weibull-monitor report``: PNG figures and one HTML page drawn from a run store (matplotlib, Agg backend).

For a run with several snapshots (a training run, or a scanned checkpoint series):

* ``k_heatmap``: layer x step heatmap of k, one panel per component, coloured around the Gaussian anchor;
* ``class_medians``: Selection, Value and Transmission median k over steps with the anchor line, the paper's bands,
  and every alert marked on the timeline;
* ``scale``: scale growth λ/λ_first per class, λ against √(η/λ_wd) with the Pythia line, and λ/√(η/λ_wd) over steps;
* ``t_over_tau``: the class medians against T/τ = Σ η_t·λ_wd (the optimizer's budget) instead of the step;
* ``alerts``: the alert timeline, one row per rule.

For a single scan (one snapshot): ``layer_profile`` (k per layer, one line per component, with the bands) and
``components`` (every matrix's k by component). The page references the figures by relative path and needs nothing
from the network. Inputs that do not exist (no learning rate in a scan, no weight decay) give a panel that says so.
"""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weibull_monitor import expectations

__all__ = ["ReportError", "RunData", "load_run", "write_report"]


class ReportError(ValueError):
    """The store holds nothing to draw (no such run, no snapshots yet)."""


_KLASSES = ("selection", "value", "transmission")
_KLASS_COLOURS = {"selection": "#d62728", "value": "#9467bd", "transmission": "#1f77b4", "mixed": "#8c564b"}
_LEVEL_COLOURS = {"info": "#7f7f7f", "warning": "#ff7f0e", "critical": "#d62728"}


class RunData:
    """Everything the figures of one run need, read once from the store."""

    def __init__(
        self, run: dict[str, Any], snapshots: list[dict], fits: list[dict], aggregates: list[dict], alerts
    ):
        self.run = run
        self.run_id = int(run["run_id"])
        self.name = str(run["name"])
        self.snapshots = snapshots
        self.steps = [int(s["step"]) for s in snapshots]
        self.fits = [f for f in fits if f.get("ok")]
        self.all_fits = fits
        self.alerts = alerts
        self.metrics: dict[str, dict[int, float]] = {}
        for row in aggregates:
            if row["value"] is not None:
                self.metrics.setdefault(row["metric"], {})[int(row["step"])] = float(row["value"])
        kinds = [s.get("attention_kind") for s in snapshots if s.get("attention_kind")]
        self.attention_kind = kinds[-1] if kinds else run.get("attention_kind")
        self.t_over_tau = {
            int(s["step"]): s["T_over_tau"] for s in snapshots if s.get("T_over_tau") is not None
        }

    @property
    def single(self) -> bool:
        return len(self.steps) <= 1

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        values = self.metrics.get(metric, {})
        steps = [s for s in self.steps if s in values and math.isfinite(values[s])]
        return steps, [values[s] for s in steps]

    @property
    def slug(self) -> str:
        return f"run{self.run_id}"

    @property
    def title(self) -> str:
        """The run name, shortened from the left for figure titles (scan runs are named by their full path)."""
        return self.name if len(self.name) <= 48 else "…" + self.name[-47:]


def load_run(store: Any, run: dict[str, Any]) -> RunData:
    run_id = run["run_id"]
    return RunData(
        run,
        store.snapshots(run_id),
        store.fits(run_id=run_id),
        store.aggregates(run_id=run_id),
        store.alerts(run_id),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Figures. Each takes the run and a path, draws with matplotlib's object API (no global pyplot state) and saves.


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
    from weibull_monitor.roles import COMPONENTS

    order = {c: i for i, c in enumerate(COMPONENTS)}
    return sorted(set(components), key=lambda c: (order.get(c, len(order)), c))


def _anchor() -> float:
    from weibull_monitor.fit import K_GAUSSIAN

    return float(K_GAUSSIAN)


def _bands(ax: Any, attention_kind: str | None, horizontal: bool = True) -> None:
    """Shade the paper's Transmission band and the Selection band for this attention kind, and draw the anchor."""
    transmission = expectations.expected_band("transmission")
    selection = expectations.expected_band("selection", attention_kind)
    span = ax.axhspan if horizontal else ax.axvspan
    line = ax.axhline if horizontal else ax.axvline
    if transmission is not None:
        span(transmission.low, transmission.high, color=_KLASS_COLOURS["transmission"], alpha=0.12, lw=0,
             label=f"paper: {transmission.label} {transmission.low:.3f}-{transmission.high:.3f}")  # fmt: skip
    if selection is not None:
        span(selection.low, selection.high, color=_KLASS_COLOURS["selection"], alpha=0.10, lw=0,
             label=f"paper: {selection.label} {selection.low:.2f}-{selection.high:.2f}")  # fmt: skip
    line(_anchor(), color="black", ls="--", lw=1, label=f"Gaussian anchor k = {_anchor():.4f}")


def _k_cells(data: RunData) -> dict[str, dict[tuple[int, int], float]]:
    """component -> {(layer, step): median k over the matrices of that layer and component}."""
    cells: dict[str, dict[tuple[int, int], list[float]]] = {}
    for f in data.fits:
        if f["layer"] is None or f["k"] is None:
            continue
        cells.setdefault(f["component"], {}).setdefault((int(f["layer"]), int(f["step"])), []).append(
            float(f["k"])
        )
    return {c: {key: statistics.median(v) for key, v in d.items()} for c, d in cells.items()}


def fig_k_heatmap(data: RunData, path: Path) -> None:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    cells = _k_cells(data)
    components = _component_order(list(cells))
    if not components:
        fig = _figure(7, 3)
        _note(fig.add_subplot(), "no layered matrices in this run")
        fig.savefig(path)
        return
    layers = sorted({layer for c in cells.values() for layer, _ in c})
    steps = data.steps
    values = [v for c in cells.values() for v in c.values()]
    anchor = _anchor()
    spread = max(0.02, max(abs(v - anchor) for v in values))
    norm = TwoSlopeNorm(vcenter=anchor, vmin=anchor - spread, vmax=anchor + spread)
    columns = min(4, len(components))
    rows = math.ceil(len(components) / columns)
    fig = _figure(3.6 * columns + 1, 0.25 * len(layers) * rows + 1.6 * rows + 0.6)
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for ax, component in zip(axes.flat, components):
        grid = np.full((len(layers), len(steps)), np.nan)
        for (layer, step), k in cells[component].items():
            if step in steps:
                grid[layers.index(layer), steps.index(step)] = k
        image = ax.imshow(
            grid, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm, interpolation="nearest"
        )
        ax.set_title(component, fontsize=10)
        ax.set_ylabel("layer")
        ax.set_xlabel("step")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 5))})
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
    for ax in list(axes.flat)[len(components) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label=f"k (centre: Gaussian anchor {anchor:.4f})", shrink=0.9)
    fig.suptitle(f"{data.title}: Weibull shape k per layer and step")
    fig.savefig(path)


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
    drawn = False
    for klass in (*_KLASSES, "mixed"):
        steps, ks = data.series(f"weibull/{klass}/k_median")
        if steps:
            ax.plot(steps, ks, marker="o", ms=3, color=_KLASS_COLOURS[klass], label=f"{klass} median k")
            drawn = True
    _mark_alerts(ax, data)
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
    for klass in _KLASSES:
        steps, values = data.series(f"weibull/{klass}/{metric}")
        if steps:
            ax.plot(steps, values, marker="o", ms=3, color=_KLASS_COLOURS[klass], label=klass)
            drawn = True
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
        for klass in (*_KLASSES, "mixed"):
            values = data.metrics.get(f"weibull/{klass}/k_median", {})
            xs = [x_of[s] for s in steps if s in values]
            ys = [values[s] for s in steps if s in values]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, color=_KLASS_COLOURS[klass], label=f"{klass} median k")
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


# ---------------------------------------------------------------------------------------------------------------------
# The page.

_SERIES_FIGURES = (
    ("k_heatmap", fig_k_heatmap, "k per layer and step, one panel per component. White is the Gaussian anchor "
     "(k at initialisation); blue is below it (heavier tail, e.g. Selection), red above."),
    ("class_medians", fig_class_medians, "Median k of each class over steps, with the anchor, the paper's terminal "
     "bands, and alerts as dotted vertical lines."),
    ("scale", fig_scale, "Scale λ: growth since the first snapshot, λ against √(η/λ_wd) with the Pythia "
     "terminal line, and the ratio λ/√(η/λ_wd) over steps."),
    ("t_over_tau", fig_t_over_tau, "The class medians against T/τ (Σ η_t·λ_wd), the axis on which the paper "
     "compares runs of different length and learning rate."),
    ("alerts", fig_alerts, "Alerts raised, one row per rule, coloured by level."),
)  # fmt: skip
_SINGLE_FIGURES = (
    ("layer_profile", fig_layer_profile, "k per layer, one line per component, with the anchor and the paper's "
     "terminal bands for this attention kind."),
    ("components", fig_components, "k of every matrix by component; * marks the split parts of fused matrices."),
)  # fmt: skip

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f4f4f4; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
.inside { color: #2a7f2a; } .below, .above { color: #b35900; }
.level-critical { color: #c00; font-weight: bold; } .level-warning { color: #b35900; }
.muted { color: #777; }
"""

# Reports a figure that did not load as a console error (headless checks catch it) and counts the ones that did.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img.figure"), loaded = 0;
  images.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { loaded += 1; }
    else { console.error("figure failed to load: " + img.getAttribute("src")); }
  });
  document.body.setAttribute("data-figures-loaded", String(loaded));
  document.body.setAttribute("data-figures-total", String(images.length));
});
"""


def _summary_rows(data: RunData) -> list[str]:
    """Last snapshot: class median k beside the paper's band, drift from the anchor."""
    if not data.steps:
        return []
    last = data.steps[-1]
    rows = []
    for klass in (*_KLASSES, "mixed", "other"):
        value = data.metrics.get(f"weibull/{klass}/k_median", {}).get(last)
        if value is None:
            continue
        band = expectations.expected_band(klass, data.attention_kind)
        if band is None:
            verdict, paper = "", "-" if klass != "value" else "no band (usually near W_o)"
        else:
            verdict = "inside" if band.contains(value) else "below" if value < band.low else "above"
            paper = f"{band.low:.3f}-{band.high:.3f} ({band.label})"
        growth = data.metrics.get(f"weibull/{klass}/scale_growth", {}).get(last)
        rows.append(
            f"<tr><td>{html.escape(klass)}</td><td>{value:.4f}</td><td>{value - _anchor():+.4f}</td>"
            f"<td>{'-' if growth is None else f'{growth:.3f}'}</td><td>{html.escape(paper)}</td>"
            f'<td class="{verdict}">{verdict}</td></tr>'
        )
    return rows


def _run_section(data: RunData, figures: list[tuple[str, str]]) -> str:
    parts = [f'<section id="{html.escape(data.slug)}"><h2>Run: {html.escape(data.name)}</h2>']
    steps = f"{data.steps[0]} to {data.steps[-1]} ({len(data.steps)} snapshots)" if data.steps else "none"
    matrices = len({f["name"] for f in data.all_fits})
    meta = [
        ("steps", steps if not data.single else "a single snapshot (a scan of one checkpoint)"),
        ("matrices", str(matrices)),
        ("attention kind", data.attention_kind or "unknown"),
        ("selection expectation", expectations.selection_expectation(data.attention_kind) or "unknown"),
        ("alerts", str(len(data.alerts))),
    ]
    if data.t_over_tau:
        meta.append(("T/τ at the last snapshot", f"{list(data.t_over_tau.values())[-1]:.4g}"))
    parts.append(
        "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in meta)
    )
    parts.append("</table>")
    summary = _summary_rows(data)
    if summary:
        parts.append("<h3>Classes at the last snapshot</h3><table><tr><th>class</th><th>median k</th>"
                     "<th>k − anchor</th><th>λ growth</th><th>paper (terminal)</th><th></th></tr>")  # fmt: skip
        parts.extend(summary)
        parts.append("</table>")
        parts.append('<p class="muted">The paper\'s bands are terminal values of fully trained models; a short or '
                     "fine-tuned run need not reach them. The tool reports what it measures.</p>")  # fmt: skip
    for filename, caption in figures:
        parts.append(
            f'<figure><img class="figure" src="{html.escape(filename)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if data.alerts:
        parts.append(
            "<h3>Alerts</h3><table><tr><th>step</th><th>level</th><th>rule</th><th>message</th></tr>"
        )
        for alert in data.alerts[:500]:
            parts.append(
                f'<tr><td>{int(alert["step"])}</td><td class="level-{html.escape(alert["level"])}">'
                f"{html.escape(alert['level'])}</td><td>{html.escape(alert['rule'])}</td>"
                f"<td>{html.escape(alert.get('message') or '')}</td></tr>"
            )
        parts.append("</table>")
        if len(data.alerts) > 500:
            parts.append(f'<p class="muted">... and {len(data.alerts) - 500} more in the store.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def write_report(store_path: str | Path, out_dir: str | Path, run: str | int | None = None) -> Path:
    """Draw the figures of every run in ``store_path`` (or only ``run``, a name or id) into ``out_dir``.

    Returns the path of ``index.html``. Raises FileNotFoundError for a missing store, ValueError for an unknown run
    or an empty store (ReportError), ImportError (with the pip line) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
    except ImportError as exc:
        raise ImportError("report needs matplotlib: pip install 'weibull-monitor[plot]'") from exc
    from weibull_monitor.store import RunStore

    store_path = Path(store_path)
    if not store_path.is_file():
        raise FileNotFoundError(f"{store_path}: no such run store")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with RunStore(store_path) as store:
        runs = store.runs()
        if run is not None:
            runs = [r for r in runs if str(r["run_id"]) == str(run) or r["name"] == str(run)]
            if not runs:
                raise ReportError(f"{store_path}: no run named or numbered {run!r}")
        datas = [load_run(store, r) for r in runs]
    datas = [d for d in datas if d.steps]
    if not datas:
        raise ReportError(f"{store_path}: no snapshots recorded yet")

    sections = []
    for data in datas:
        figures = []
        for key, draw, caption in _SINGLE_FIGURES if data.single else _SERIES_FIGURES:
            filename = f"{data.slug}_{key}.png"
            draw(data, out / filename)
            figures.append((filename, caption))
        sections.append(_run_section(data, figures))
    from weibull_monitor import __version__

    title = f"weibull-monitor report: {store_path.name}"
    toc = "".join(f'<li><a href="#{html.escape(d.slug)}">{html.escape(d.name)}</a></li>' for d in datas)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f'<p class="muted">Weibull shape k and scale λ of each weight matrix (fit of |w| on the middle 80% of '
        f"Hazen plotting positions). Gaussian anchor k = {_anchor():.4f}. Written by weibull-monitor "
        f"{html.escape(__version__)} from {html.escape(str(store_path))}.</p>\n"
        f"<ul>{toc}</ul>\n" + "\n".join(sections) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
