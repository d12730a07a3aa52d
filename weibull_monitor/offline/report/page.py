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
from pathlib import Path

from weibull_monitor._version import __version__
from weibull_monitor.models import expectations
from weibull_monitor.offline.report.data import ReportError, RunData, load_run
from weibull_monitor.offline.report.figures import (
    KLASSES,
    anchor_k,
    fig_alerts,
    fig_class_medians,
    fig_components,
    fig_k_heatmap,
    fig_layer_profile,
    fig_scale,
    fig_t_over_tau,
)
from weibull_monitor.snapshot import keys
from weibull_monitor.store import RunStore

__all__ = ["write_report"]


_SERIES_FIGURES = (
    ("k_heatmap", fig_k_heatmap, "k per layer and step, one panel per component. White is the Gaussian anchor "
     "k = 1.2054 (the k of Gaussian weights, not necessarily of this model's initialisation); blue is below it "
     "(heavier tail, e.g. Selection), red above."),
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
    for klass in (*KLASSES, "mixed", "other"):
        value = data.metrics.get(keys.class_metric(klass, "k_median"), {}).get(last)
        if value is None:
            continue
        band = expectations.expected_band(klass, data.attention_kind)
        if band is None:
            verdict, paper = "", "-" if klass != "value" else "no band (usually near W_o)"
        else:
            verdict = "inside" if band.contains(value) else "below" if value < band.low else "above"
            paper = f"{band.low:.3f}-{band.high:.3f} ({band.label})"
        growth = data.metrics.get(keys.class_metric(klass, "scale_growth"), {}).get(last)
        rows.append(
            f"<tr><td>{html.escape(klass)}</td><td>{value:.4f}</td><td>{value - anchor_k():+.4f}</td>"
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
    for rewind in data.rewinds:
        step = int(rewind["step"])
        gone = f"steps {rewind['superseded_first']}-{rewind['superseded_last']}"
        meta.append(
            (
                "restart" if step < 0 else f"rewind to step {step}",
                f"{gone} of the abandoned timeline ({rewind['n_superseded']} snapshots) superseded "
                f"(branch {rewind['branch']}, {rewind.get('reason') or 'resume'}); kept in the store",
            )
        )
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


def write_report(
    store_path: str | Path, out_dir: str | Path, run: str | int | None = None, *, branches: bool = True
) -> Path:
    """Draw the figures of every run in ``store_path`` (or only ``run``, a name or id) into ``out_dir``.

    The figures follow each run's live timeline; rewinds are marked on the step axes, and with ``branches`` the
    abandoned (superseded) branches are drawn faintly beside the live one.

    Returns the path of ``index.html``. Raises FileNotFoundError for a missing store, ValueError for an unknown run
    or an empty store (ReportError), ImportError (with the pip line) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
    except ImportError as exc:
        raise ImportError("report needs matplotlib: pip install 'weibull-monitor[plot]'") from exc
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
        datas = [load_run(store, r, branches=branches) for r in runs]
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
    title = f"weibull-monitor report: {store_path.name}"
    toc = "".join(f'<li><a href="#{html.escape(d.slug)}">{html.escape(d.name)}</a></li>' for d in datas)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f'<p class="muted">Weibull shape k and scale λ of each weight matrix (fit of |w| on the middle 80% of '
        f"Hazen plotting positions). Gaussian anchor k = {anchor_k():.4f}. Written by weibull-monitor "
        f"{html.escape(__version__)} from {html.escape(str(store_path))}.</p>\n"
        f"<ul>{toc}</ul>\n" + "\n".join(sections) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
