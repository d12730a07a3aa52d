"""The scan's output: summary tables beside the paper's expectations, and per-matrix rows as JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from weibull_monitor.models import COMPONENTS, expectations
from weibull_monitor.offline.scan import JSON_FIELDS, ScanResult
from weibull_monitor.offline.text import printable
from weibull_monitor.snapshot import keys
from weibull_monitor.snapshot.classes import class_members

__all__ = ["expectation_for", "format_tables", "rows_to_csv", "rows_to_json", "write_csv", "write_json"]


def expectation_for(klass: str, component: str, attention_kind: str | None) -> tuple[Any, str]:
    """The paper's band for a matrix (or None) and a short text saying what the paper expects there."""
    if component == "qkv":
        band = expectations.expected_band("selection", "fused")
        return band, f"{band.low:.2f}-{band.high:.2f} fused QKV (transitional)" if band else "-"
    band = expectations.expected_band(klass, attention_kind)
    if band is not None:
        return band, f"{band.low:.3f}-{band.high:.3f} {band.label}"
    if klass == "selection":
        return None, "selection: band depends on attention kind (unknown)"
    if klass == "value":
        return None, "no class; usually near W_o"
    return None, "not classified by the paper"


def _verdict(band: Any, k: float | None) -> str:
    if band is None or k is None:
        return ""
    if k < band.low:
        return "below"
    if k > band.high:
        return "above"
    return "inside"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    headers = [printable(h) for h in headers]
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return "\n".join(lines)


_KLASS_ORDER = ("selection", "value", "transmission", "mixed", "other")


def _component_order(components: Sequence[str]) -> list[str]:
    order = {c: i for i, c in enumerate(COMPONENTS)}
    return sorted(set(components), key=lambda c: (order.get(c, len(order)), c))


def _whole_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of whole matrices that fitted (split views are summarised separately)."""
    return [r for r in rows if r["ok"] and r["fused_parent"] is None]


def format_tables(results: Sequence[ScanResult]) -> str:
    """Summary tables: per class, per component and per layer (last checkpoint), k medians per class over steps."""
    if not results:
        return "nothing scanned"
    out: list[str] = []
    last = results[-1]
    kind = last.attention_kind
    header = f"{printable(last.path)}  ({last.format}"
    header += f", step {last.step}" if last.step is not None else ""
    header += f", attention: {kind or 'unknown'})"
    out.append(header)
    fitted = [r for r in last.rows if r["ok"]]
    out.append(
        f"{len(_whole_rows(last.rows))} matrices fitted, {len(fitted) - len(_whole_rows(last.rows))} split views, "
        f"{len(last.skipped)} skipped, {last.not_matrices} tensors that are no matrix (norms, biases) not fitted"
    )

    # Per class: the snapshot's own class members (the monitor's definition): split parts of fused matrices count,
    # a fused parent whose parts were split off does not, one that could not be split counts whole.
    rows_by_name = {r["name"]: r for r in last.rows}
    by_klass = {
        klass: [rows_by_name[key] for key in keys]
        for klass, keys in class_members(
            last.snapshot.fits, last.snapshot.roles, last.snapshot.matrices
        ).items()
    }
    rows = []
    for klass in sorted(by_klass, key=lambda c: (_KLASS_ORDER.index(c) if c in _KLASS_ORDER else 99, c)):
        members = by_klass[klass]
        ks = [r["k"] for r in members if r["k"] is not None]
        band, text = expectation_for(klass, "", kind)
        median = _median(ks)
        rows.append(
            [
                klass,
                str(len(members)),
                _fmt(median),
                _fmt(min(ks) if ks else None),
                _fmt(max(ks) if ks else None),
                _fmt(_median([r["r2"] for r in members if r["r2"] is not None]), 4),
                _fmt(_median([r["scale"] for r in members if r["scale"] is not None]), 4),
                text,
                _verdict(band, median),
            ]
        )
    out.append(
        "\nPer class (terminal medians in the paper; a young or fine-tuned model need not sit in them)"
    )
    out.append(
        _table(
            ["class", "n", "k median", "k min", "k max", "R2 median", "scale med", "paper", "vs paper"], rows
        )
    )

    # Per component.
    by_component: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for r in fitted:
        by_component.setdefault((r["component"], r["fused_parent"] is not None), []).append(r)
    rows = []
    for component in _component_order([c for c, _ in by_component]):
        for split in (False, True):
            members = by_component.get((component, split))
            if not members:
                continue
            ks = [r["k"] for r in members if r["k"] is not None]
            median = _median(ks)
            band, text = expectation_for(members[0]["klass"], component, kind)
            stderr = _median([r["k_stderr"] for r in members if r["k_stderr"] is not None])
            rows.append(
                [
                    component + (" (split)" if split else ""),
                    members[0]["klass"],
                    str(len(members)),
                    _fmt(median),
                    _fmt(stderr, 4),
                    _fmt(min(ks) if ks else None),
                    _fmt(max(ks) if ks else None),
                    text,
                    _verdict(band, median),
                ]
            )
    out.append("\nPer component")
    out.append(
        _table(["component", "class", "n", "k median", "stderr", "k min", "k max", "paper", "vs paper"], rows)
    )

    # Per layer: k of each component (median over experts/stacks), the paper's band in the header row.
    layered = [r for r in fitted if r["layer"] is not None]
    if layered:
        components = _component_order([r["component"] for r in layered])
        layers = sorted({r["layer"] for r in layered})
        cells: dict[tuple[int, str], list[float]] = {}
        for r in layered:
            if r["k"] is not None:
                cells.setdefault((r["layer"], r["component"]), []).append(r["k"])
        rows = []
        bands = []
        for component in components:
            klass = next(r["klass"] for r in layered if r["component"] == component)
            band, _ = expectation_for(klass, component, kind)
            bands.append(f"{band.low:.2f}-{band.high:.2f}" if band else "-")
        rows.append(["paper", *bands])
        for layer in layers:
            rows.append([str(layer), *(_fmt(_median(cells.get((layer, c), []))) for c in components)])
        out.append("\nPer layer: k (split views under their own component)")
        out.append(_table(["layer", *components], rows))

    if len(results) > 1:
        klasses = sorted(
            {r["klass"] for res in results for r in res.rows if r["ok"]},
            key=lambda c: (_KLASS_ORDER.index(c) if c in _KLASS_ORDER else 99, c),
        )
        rows = []
        for res in results:
            medians = [
                _fmt(res.snapshot.aggregates.get(keys.class_metric(klass, "k_median"))) for klass in klasses
            ]
            rows.append([str(res.step), *medians, Path(res.path).parent.name or res.path])
        out.append("\nk median per class over steps")
        out.append(_table(["step", *klasses, "checkpoint"], rows))

    skipped = [(res.step, name, reason) for res in results for name, reason in res.skipped]
    if skipped:
        out.append("\nSkipped")
        out.extend(
            f"  {printable(name)}{f' (step {step})' if step is not None else ''}: {printable(reason)}"
            for step, name, reason in skipped[:50]
        )
        if len(skipped) > 50:
            out.append(f"  ... and {len(skipped) - 50} more")
    return "\n".join(out)


def all_rows(results: Sequence[ScanResult]) -> list[dict[str, Any]]:
    return [row for res in results for row in res.rows]


def write_json(results: Sequence[ScanResult], stream: TextIO) -> None:
    """A JSON list of row objects (``JSON_FIELDS``), one object per line, written as it goes (no copy of the whole
    output in memory: 100,000 rows are 30 MB); nan becomes null, ``step`` is null for a single checkpoint."""
    stream.write("[")
    separator = "\n"
    for row in all_rows(results):
        stream.write(separator + json.dumps(row, allow_nan=False))
        separator = ",\n"
    stream.write("\n]\n")


def rows_to_json(results: Sequence[ScanResult]) -> str:
    """:func:`write_json` into a string."""
    buffer = io.StringIO()
    write_json(results, buffer)
    return buffer.getvalue()


def write_csv(results: Sequence[ScanResult], stream: TextIO) -> None:
    """The rows as CSV, written as it goes; text fields (names, paths, reasons) with control characters escaped,
    since CSV is often read on a terminal."""
    writer = csv.DictWriter(stream, fieldnames=list(JSON_FIELDS), lineterminator="\n")
    writer.writeheader()
    for row in all_rows(results):
        writer.writerow(
            {
                k: (
                    ""
                    if v is None
                    else "x".join(map(str, v))
                    if k == "shape"
                    else printable(v)
                    if isinstance(v, str)
                    else v
                )
                for k, v in row.items()
            }
        )


def rows_to_csv(results: Sequence[ScanResult]) -> str:
    """:func:`write_csv` into a string."""
    buffer = io.StringIO()
    write_csv(results, buffer)
    return buffer.getvalue()
