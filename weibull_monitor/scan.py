"""``weibull-monitor scan``: fit every weight matrix of saved checkpoints and summarise them beside the paper.

The pure part: :func:`scan_checkpoint` turns one :class:`~weibull_monitor.loaders.Checkpoint` into rows (one per matrix,
plus one per split view of a fused matrix); :func:`format_tables`, :func:`rows_to_json` and :func:`rows_to_csv` render
them; :func:`write_store` records them in a :class:`~weibull_monitor.store.RunStore` so ``report`` can draw them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from weibull_monitor import expectations
from weibull_monitor.loaders import Checkpoint, TensorInfo, open_checkpoints, release

__all__ = [
    "JSON_FIELDS",
    "ScanResult",
    "expectation_for",
    "format_tables",
    "rows_to_csv",
    "rows_to_json",
    "scan_checkpoint",
    "scan_path",
    "write_store",
]

#: Keys of every row, in the order ``--csv`` writes them (``--json`` writes the same keys).
JSON_FIELDS = (
    "name",
    "layer",
    "component",
    "klass",
    "k",
    "k_stderr",
    "scale",
    "scale_rel_stderr",
    "r2",
    "n",
    "n_zero",
    "n_nonfinite",
    "step",
    "method",
    "ok",
    "reason",
    "expert",
    "stack",
    "fused_parent",
    "q10",
    "q50",
    "q90",
    "q99",
    "q999",
    "shape",
    "dtype",
    "path",
)


@dataclass
class ScanResult:
    """The fits of one checkpoint: rows for output, fits and roles for the store, and what was skipped and why."""

    path: str
    step: int | None
    format: str
    attention_kind: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    fits: dict[str, Any] = field(default_factory=dict)
    roles: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_matrices: int = 0


def _clean(value: Any) -> Any:
    """JSON-safe: nan and inf become None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _row(key: str, info: TensorInfo, role: Any, fit: Any, step: int | None, path: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": key,
        "layer": role.layer,
        "component": role.component,
        "klass": role.klass,
        "step": step,
        "expert": role.expert,
        "stack": role.stack,
        "fused_parent": role.fused_parent,
        "shape": list(info.shape),
        "dtype": info.dtype,
        "path": path,
    }
    for name in ("k", "k_stderr", "scale", "scale_rel_stderr", "r2", "q10", "q50", "q90", "q99", "q999"):
        row[name] = _clean(float(getattr(fit, name))) if fit is not None else None
    for name in ("n", "n_zero", "n_nonfinite"):
        row[name] = int(getattr(fit, name)) if fit is not None else None
    row["method"] = fit.method if fit is not None else None
    row["ok"] = bool(fit.ok) if fit is not None else False
    row["reason"] = fit.reason if fit is not None else None
    return {name: row.get(name) for name in JSON_FIELDS}


def _skip_row(
    key: str, info: TensorInfo, role: Any, reason: str, step: int | None, path: str
) -> dict[str, Any]:
    row = _row(key, info, role, None, step, path)
    row["reason"] = reason
    return row


#: Matrices above this many elements are histogrammed in row blocks whose mapped pages are released one block at
#: a time, so a scan holds one block of a large matrix in memory, not the matrix (64 MB of fp32 per block).
CHUNK_ELEMENTS = 1 << 24


def fit_matrix(tensor: Any, method: str) -> Any:
    """``fit_weibull(tensor, method=method)``, reading a large memory-mapped matrix block by block.

    Histogram counts of row blocks add up to the histogram of the whole matrix, so the result is the same fit; the
    pages of each block go back to the kernel once it is counted (for tensors a loader mapped from a file).
    """
    from weibull_monitor.fit import fit_weibull, readable_tensor

    numel = tensor.numel()
    if method != "histogram" or numel <= CHUNK_ELEMENTS or tensor.dim() < 2 or not tensor.is_contiguous():
        return fit_weibull(tensor, method=method)
    readable, _ = readable_tensor(tensor)
    if readable is None:
        return fit_weibull(tensor, method=method)  # the fit engine words the reason
    from weibull_monitor.histogram import WeightHistogram

    try:
        rows = tensor.shape[0]
        block = max(1, CHUNK_ELEMENTS // max(1, numel // rows))
        total = None
        for start in range(0, rows, block):
            part = tensor[start : start + block]
            counts = WeightHistogram.from_tensor(part)
            total = counts if total is None else total.merge(counts)
            release(part)
        return total.fit()
    except Exception:  # any surprise in the block path: the plain fit decides (and never raises)
        return fit_weibull(tensor, method=method)


def matrix_roles(checkpoint: Checkpoint, infos: Sequence[TensorInfo] | None = None) -> dict[str, Any]:
    """Roles of the tensors of ``checkpoint`` that are weight matrices (keyed by the name in the file).

    Norms, biases and integer buffers (position ids) are left out; a tensor named by an index whose shard is missing
    (shape unknown) is kept as "other" so that it shows up as skipped.
    """
    from weibull_monitor.roles import Role, classify

    roles: dict[str, Any] = {}
    for info in checkpoint.infos() if infos is None else infos:
        role = classify(info.role_name, info.shape or None, checkpoint.config)
        if role is None and info.skip_reason is not None and not info.shape:
            role = Role(layer=None, component="other", klass="other")
        if role is not None and not info.is_float and info.skip_reason is None and role.component == "other":
            role = None  # an integer buffer (position ids, masks), not a weight
        if role is not None:
            roles[info.name] = role
    return roles


def scan_checkpoint(
    checkpoint: Checkpoint,
    *,
    method: str = "histogram",
    on_tensor: Callable[[str], None] | None = None,
) -> ScanResult:
    """Fit every weight matrix of ``checkpoint`` (and each part of a fused one), one tensor in memory at a time.

    ``on_tensor(name)`` is called after each tensor (a progress hook). Tensors that are no matrix (norms, biases)
    are counted in ``not_matrices``; matrices that cannot be read (meta, offloaded, non-float) become rows with
    ``ok=False`` and a reason, and are listed in ``skipped``.
    """
    from weibull_monitor.roles import attention_kind, split_fused, split_key, view_role

    config = checkpoint.config
    infos = checkpoint.infos()
    roles = matrix_roles(checkpoint, infos)
    try:
        kind = attention_kind(config, [i.role_name for i in infos if i.name in roles])
    except (ValueError, TypeError, KeyError, AttributeError):
        kind = None
    path = str(checkpoint.path)
    result = ScanResult(path, checkpoint.step, checkpoint.format, kind)
    result.not_matrices = sum(1 for i in infos if i.name not in roles)

    for info, tensor in checkpoint.tensors(list(roles)):
        role = roles[info.name]
        reason = info.skip_reason
        if reason is None and tensor is None:
            reason = "no data"
        if reason is None and not info.is_float:
            reason = f"dtype {info.dtype} is not a floating-point weight"
        if reason is None and tensor is not None and (tensor.is_meta or tensor.device.type == "meta"):
            reason = "meta tensor (no data stored)"
        if reason is not None:
            result.rows.append(_skip_row(info.name, info, role, reason, checkpoint.step, path))
            result.skipped.append((info.name, reason))
            if on_tensor:
                on_tensor(info.name)
            continue
        if not getattr(role, "stacked", False):
            fit = fit_matrix(tensor, method)
            result.fits[info.name] = fit
            result.roles[info.name] = role
            result.rows.append(_row(info.name, info, role, fit, checkpoint.step, path))
        if getattr(role, "parts", ()):
            try:
                parts = split_fused(info.role_name, tensor, config)
            except ValueError as exc:
                reason = f"not split: {exc}"
                result.skipped.append((info.name, reason))
                if role.stacked:
                    result.rows.append(_skip_row(info.name, info, role, reason, checkpoint.step, path))
                parts = {}
            for component, view in parts.items():
                key = split_key(info.name, component)
                part_role = view_role(info.name, role, component)
                fit = fit_matrix(view, method)
                result.fits[key] = fit
                result.roles[key] = part_role
                part_info = TensorInfo(key, tuple(view.shape), info.dtype, key)
                result.rows.append(_row(key, part_info, part_role, fit, checkpoint.step, path))
        del tensor
        if on_tensor:
            on_tensor(info.name)
    return result


class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (silent when piped or redirected)."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = max(total, 1)
        self.done = 0

    def advance(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 28
        filled = int(width * self.done / self.total)
        text = f"\rscan [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label[-48:]:<48}"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def scan_path(
    path: str | Path,
    *,
    method: str = "histogram",
    follow_symlinks: bool = False,
    progress: bool | None = None,
) -> list[ScanResult]:
    """Scan PATH (a file, a model directory or a series of checkpoints): one :class:`ScanResult` per checkpoint.

    ``progress``: draw a bar on stderr (None: only when stderr is a terminal).
    """
    checkpoints = open_checkpoints(path, follow_symlinks=follow_symlinks)
    total = sum(len(matrix_roles(c)) for c in checkpoints)
    bar = _Progress(total, enabled=progress)
    try:
        return [scan_checkpoint(c, method=method, on_tensor=bar.advance) for c in checkpoints]
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------------------------
# Rendering.


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
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return "\n".join(lines)


_KLASS_ORDER = ("selection", "value", "transmission", "mixed", "other")


def _component_order(components: Sequence[str]) -> list[str]:
    from weibull_monitor.roles import COMPONENTS

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
    header = f"{last.path}  ({last.format}"
    header += f", step {last.step}" if last.step is not None else ""
    header += f", attention: {kind or 'unknown'})"
    out.append(header)
    fitted = [r for r in last.rows if r["ok"]]
    out.append(
        f"{len(_whole_rows(last.rows))} matrices fitted, {len(fitted) - len(_whole_rows(last.rows))} split views, "
        f"{len(last.skipped)} skipped, {last.not_matrices} tensors that are no matrix (norms, biases) not fitted"
    )

    # Per class: whole matrices, plus the split views of fused ones (a fused qkv matrix is "mixed").
    by_klass: dict[str, list[dict[str, Any]]] = {}
    for r in fitted:
        if r["fused_parent"] is not None or r["component"] not in ("qkv", "ffn_gate_up"):
            by_klass.setdefault(r["klass"], []).append(r)
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
        _table(["class", "n", "k median", "k min", "k max", "R2 median", "scale med", "paper", ""], rows)
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
    out.append(_table(["component", "class", "n", "k median", "stderr", "k min", "k max", "paper", ""], rows))

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
            medians = []
            for klass in klasses:
                ks = [
                    r["k"]
                    for r in res.rows
                    if r["ok"]
                    and r["klass"] == klass
                    and r["k"] is not None
                    and (r["fused_parent"] is not None or r["component"] not in ("qkv", "ffn_gate_up"))
                ]
                medians.append(_fmt(_median(ks)))
            rows.append([str(res.step), *medians, Path(res.path).parent.name or res.path])
        out.append("\nk median per class over steps")
        out.append(_table(["step", *klasses, "checkpoint"], rows))

    skipped = [(res.step, name, reason) for res in results for name, reason in res.skipped]
    if skipped:
        out.append("\nSkipped")
        out.extend(
            f"  {name}{f' (step {step})' if step is not None else ''}: {reason}"
            for step, name, reason in skipped[:50]
        )
        if len(skipped) > 50:
            out.append(f"  ... and {len(skipped) - 50} more")
    return "\n".join(out)


def all_rows(results: Sequence[ScanResult]) -> list[dict[str, Any]]:
    return [row for res in results for row in res.rows]


def rows_to_json(results: Sequence[ScanResult]) -> str:
    """A JSON list of row objects (``JSON_FIELDS``); nan becomes null, ``step`` is null for a single checkpoint."""
    return json.dumps(all_rows(results), indent=1, allow_nan=False)


def rows_to_csv(results: Sequence[ScanResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(JSON_FIELDS), lineterminator="\n")
    writer.writeheader()
    for row in all_rows(results):
        writer.writerow(
            {k: ("" if v is None else "x".join(map(str, v)) if k == "shape" else v) for k, v in row.items()}
        )
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Store.


def write_store(
    results: Sequence[ScanResult], store_path: str | Path, source: str | Path, run_name: str | None = None
) -> int:
    """Record ``results`` in a RunStore: one run per scanned ``source`` path, one snapshot per step.

    A single checkpoint is stored as step 0. Returns the run id. A step already stored for that run is left as it
    was (the store refuses duplicates), so scanning the same path twice does not double it.
    """
    from weibull_monitor import dynamics
    from weibull_monitor.fit import K_GAUSSIAN
    from weibull_monitor.snapshot import Snapshot
    from weibull_monitor.store import RunStore

    if not results:
        raise ValueError("nothing to store")
    name = run_name or f"scan:{Path(source).resolve()}"
    store = RunStore(store_path)
    try:
        meta = {
            "source": "scan",
            "path": str(source),
            "format": results[0].format,
            "attention_kind": results[-1].attention_kind,
            "series": len(results) > 1 or results[0].step is not None,
        }
        run_id = store.open_run(name, meta)
        scale_first: dict[str, float] = {}
        budget = dynamics.TimescaleBudget()  # no optimizer in a checkpoint scan: T/tau stays undefined
        for result in results:
            for key, fit in result.fits.items():
                if fit.ok and key not in scale_first:
                    scale_first[key] = float(fit.scale)  # growth is measured from the first checkpoint
            fused_parents = {role.fused_parent for role in result.roles.values() if role.fused_parent}
            matrices = dynamics.matrix_stats(
                result.fits,
                result.roles,
                k_anchor=K_GAUSSIAN,
                scale_first=scale_first,
                group_of={},
                current_rates=[],
                budget=budget,
                aggregate_excluded=fused_parents,
            )
            snapshot = Snapshot(
                step=result.step if result.step is not None else 0,
                fits=result.fits,
                roles=result.roles,
                aggregates=dynamics.aggregates(result.fits, result.roles, matrices, k_anchor=K_GAUSSIAN),
                attention_kind=result.attention_kind,
                T_over_tau=None,
                expectation=expectations.selection_expectation(result.attention_kind),
                matrices=matrices,
                skipped=dict(result.skipped),
            )
            store.write_snapshot(run_id, snapshot)
        return run_id
    finally:
        store.close()
