"""The study's three figures (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weibull_monitor.demos.study.analysis import RunResult, StudyResult
from weibull_monitor.demos.study.config import FIGURE_NAMES
from weibull_monitor.estimator import K_GAUSSIAN
from weibull_monitor.models import expectations


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.05 + 0.85 * i / max(1, n - 1)) for i in range(n)]


def _setting_key(r: RunResult) -> tuple[float, float]:
    return round(r.sqrt_lr_over_wd, 6), round(r.tau, 3)


def _styles(runs: list[RunResult]) -> list[tuple[Any, str, str | None]]:
    """(colour, marker, legend label) per run: one colour per setting (its seeds share it, and only the first run of
    a setting is labelled), one marker per τ."""
    keys = sorted({_setting_key(r) for r in runs})
    colours = dict(zip(keys, _colours(len(keys))))
    seen: set[tuple[float, float]] = set()
    styles = []
    for r, marker in zip(runs, _markers(runs)):
        key = _setting_key(r)
        label = None if key in seen else _label(r)
        seen.add(key)
        styles.append((colours[key], marker, label))
    return styles


def _label(r: RunResult) -> str:
    return f"√(η/λwd)={r.sqrt_lr_over_wd:.3f}, τ={r.tau:.0f}"


def _markers(runs: list[RunResult]) -> list[str]:
    """One marker per distinct τ, so runs on different clocks stay apart in every figure."""
    taus = sorted({round(r.tau) for r in runs})
    shapes = "osD^vP*X"
    return [shapes[taus.index(round(r.tau)) % len(shapes)] for r in runs]


def write_figures(result: StudyResult, out_dir: str | Path) -> list[Path]:
    """study_scale.png, study_growth.png, study_k.png under ``out_dir`` (matplotlib, Agg, no pyplot state)."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    styles = _styles(result.runs)
    seeds = len(result.seeds)
    paths = [out / name for name in FIGURE_NAMES]

    fig = Figure(figsize=(6.5, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    xs = [r.sqrt_lr_over_wd for r in result.runs]
    for r, (colour, marker, label) in zip(result.runs, styles):
        ax.scatter(
            [r.sqrt_lr_over_wd],
            [r.terminal_scale],
            color=colour,
            marker=marker,
            s=45,
            zorder=3,
            alpha=0.8,
            label=label,
        )
    top = max(xs) * 1.1
    ax.plot(
        [0, top],
        [result.intercept, result.intercept + result.slope * top],
        color="black",
        lw=1,
        label=f"least squares{f' ({seeds} seeds pooled)' if seeds > 1 else ''}: slope {result.slope:.3f}, "
        f"r = {result.pearson_r:.3f}",
    )
    ax.plot(
        [0, top],
        [0, result.through_origin * top],
        color="grey",
        ls=":",
        lw=1,
        label=f"through 0: λ = {result.through_origin:.3f}·√(η/λwd)",
    )
    ax.set_xlim(0, top)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("√(η/λ_wd)")
    ax.set_ylabel("terminal median λ, Transmission (W_o, FFN)")
    ax.set_title(
        "terminal scale against √(η/λ_wd)"
        + (f": r per seed {result.r_spread.low:.3f} to {result.r_spread.high:.3f}" if seeds > 1 else "")
    )
    ax.legend(fontsize=7)
    fig.savefig(paths[0])

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    growth_ax, ratio_ax = fig.subplots(1, 2)
    for r, (colour, marker, label) in zip(result.runs, styles):
        style = {"marker": marker, "ms": 3, "color": colour, "label": label}
        growth_ax.plot(r.t_over_tau, r.growth, **style)
        ratio_ax.plot(r.t_over_tau, r.scale_over_sqrt, **style)
    growth_ax.axhline(1.0, color="black", lw=0.8, ls="--")
    growth_ax.set_xlabel("T/τ = Σ η_t·λ_wd")
    growth_ax.set_ylabel("λ / λ_first (Transmission median)")
    growth_ax.set_title("scale growth: each run rises to its own equilibrium")
    ratio_ax.set_xlabel("T/τ = Σ η_t·λ_wd")
    ratio_ax.set_ylabel("λ / √(η/λ_wd) (Transmission median; η: peak)")
    ratio_ax.set_title("scale over √(η/λ_wd): one band for every run")
    ratio_ax.set_ylim(bottom=0)
    for axis in (growth_ax, ratio_ax):
        axis.legend(fontsize=7)
    fig.savefig(paths[1])

    panels = ["selection", "value", "transmission"]
    if any("qkv (fused)" in r.k for r in result.runs):
        panels.insert(0, "qkv (fused)")
    fig = Figure(figsize=(4.2 * len(panels), 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    kind = result.runs[0].attention_kind
    for ax, panel in zip(axes, panels):
        band_class = "selection" if panel in ("selection", "qkv (fused)") else panel
        band = expectations.expected_band(band_class, "fused" if panel == "qkv (fused)" else kind)
        if band is not None:
            ax.axhspan(band.low, band.high, color="#1f77b4", alpha=0.12, lw=0, label=f"paper: {band}")
        ax.axhline(K_GAUSSIAN, color="black", lw=0.8, ls="--", label=f"Gaussian anchor {K_GAUSSIAN:.4f}")
        for r, (colour, marker, label) in zip(result.runs, styles):
            values = r.k.get(panel)
            if values:
                ax.plot(r.t_over_tau, values, marker=marker, ms=3, color=colour, label=label)
        ax.set_xlabel("T/τ")
        ax.set_title(f"{panel} median k")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("median k")
    fig.suptitle(f"class-median k against T/τ (attention: {kind or 'unknown'})")
    fig.savefig(paths[2])
    result.figures = paths
    return paths


# ------------------------------------------------------------------------------------------------ the study
