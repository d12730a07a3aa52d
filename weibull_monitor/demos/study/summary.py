"""The printed summary: per-run table, per-seed lines and their spread, k trajectories against T/τ."""

from __future__ import annotations

import math
import statistics

from weibull_monitor.demos.study.analysis import RunResult, StudyResult


def _fmt_k(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    return f"{finite[0]:.3f}→{finite[-1]:.3f}"


def format_summary(result: StudyResult) -> str:
    """The printed table: one row per run, then the fitted line (all runs pooled) and, with several seeds, each
    seed's line and the spread of r and of the slope over the seeds."""
    fused = any("qkv (fused)" in r.k for r in result.runs)
    width = _name_width(result)
    header = (
        f"{'run':<{width}} {'√(η/λwd)':>8} {'τ':>6} {'T/τ':>5} {'λ_first':>8} {'λ_end':>8} {'λ_end/λ_first':>13} "
        f"{'ρ(λ/λ₀,T/τ)':>11} {'λ_end/√(η/λwd)':>14} {'sel k':>13} {'trans k':>13}"
        + (f" {'qkv k':>13}" if fused else "")
    )
    lines = [header, "-" * len(header)]
    for name, reason in result.skipped.items():
        lines.append(f"{name:<{width}} skipped: {reason}")
    for r in result.runs:
        first = r.scale[0] / r.growth[0] if r.growth[0] else math.nan
        lines.append(
            f"{r.name:<{width}} {r.sqrt_lr_over_wd:>8.4f} {r.tau:>6.0f} {r.t_over_tau[-1]:>5.2f} {first:>8.4f} "
            f"{r.terminal_scale:>8.4f} {r.terminal_growth:>13.2f} {r.growth_spearman:>+11.2f} "
            f"{r.scale_over_sqrt[-1]:>14.3f} {_fmt_k(r.k['selection']):>13} {_fmt_k(r.k['transmission']):>13}"
            + (f" {_fmt_k(r.k.get('qkv (fused)', [])):>13}" if fused else "")
        )
    lines.append("")
    settings = len({(round(r.sqrt_lr_over_wd, 6), round(r.tau, 3)) for r in result.runs})
    seeds = result.seeds
    runs = f"{len(result.runs)} runs" + (
        f" ({settings} settings, {len(seeds)} seeds)" if len(seeds) > 1 else ""
    )
    lines.append(
        f"terminal Transmission median λ against √(η/λ_wd) over {runs} "
        f"(span {result.sqrt_span:.1f}x): Pearson r = {result.pearson_r:.4f}, "
        f"slope = {result.slope:.4f}, intercept = {result.intercept:+.5f}; "
        f"through the origin λ ≈ {result.through_origin:.4f}·√(η/λ_wd) (Pythia, mean λ of W_o and FFN: 0.087)"
    )
    if len(result.per_seed) > 1:
        lines.append(
            f"over the seeds, each seed's own line: Pearson r {result.r_spread}; slope {result.slope_spread}"
        )
        for line in result.per_seed:
            lines.append(
                f"  seed {line.seed}: {line.n_runs} runs, Pearson r = {line.pearson_r:.4f}, slope = {line.slope:.4f}, "
                f"intercept = {line.intercept:+.5f}, through the origin {line.through_origin:.4f}"
            )
    by_tau: dict[int, list[float]] = {}
    for r in result.runs:
        by_tau.setdefault(round(r.tau), []).append(r.scale_over_sqrt[-1])
    if len(by_tau) > 1:  # the constant is not universal: show it per clock
        lines.append(
            "terminal λ/√(η/λ_wd) by τ: "
            + "; ".join(
                f"τ = {tau}: {statistics.mean(v):.3f} (mean of {len(v)}, {min(v):.3f} to {max(v):.3f})"
                for tau, v in sorted(by_tau.items())
            )
        )
    for panel in ("selection", "qkv (fused)"):
        if any(panel in r.k for r in result.runs):
            lines.append("")
            lines.extend(format_k_trajectories(result, panel))
    return "\n".join(lines)


def _name_width(result: StudyResult) -> int:
    return max([22, *(len(r.name) for r in result.runs), *(len(name) for name in result.skipped)])


def k_at(run: RunResult, panel: str, t_over_tau: float) -> float:
    """The class-median k of ``panel`` at the snapshot nearest to ``t_over_tau`` (NaN when not recorded)."""
    values = run.k.get(panel)
    if not values:
        return math.nan
    nearest = min(range(len(run.t_over_tau)), key=lambda i: abs(run.t_over_tau[i] - t_over_tau))
    return values[nearest]


def format_k_trajectories(result: StudyResult, panel: str = "selection") -> list[str]:
    """Median k of ``panel`` at whole T/τ (nearest snapshot), one row per run."""
    end = min(math.floor(r.t_over_tau[-1] + 1e-9) for r in result.runs)
    marks = list(range(end + 1))
    width = _name_width(result)
    lines = [
        f"{panel} median k at T/τ ≈ " + ", ".join(map(str, marks)) + " (nearest snapshot)",
        f"{'run':<{width}} " + " ".join(f"{m:>6}" for m in marks),
    ]
    for r in result.runs:
        lines.append(f"{r.name:<{width}} " + " ".join(f"{k_at(r, panel, m):>6.3f}" for m in marks))
    return lines
