"""Weights & Biases sink: metrics against the training step, a table of fits, a k heatmap, and alerts.

W&B is imported lazily: this module loads without it, and the sink fails with a clear message only when used.
Metrics are logged with the step as a value of ``step_metric`` (``train/global_step`` for the HF Trainer,
``trainer/global_step`` for Lightning), never through ``wandb.log(step=...)``: the Trainer's own callback advances
W&B's internal step on its own schedule, and a smaller explicit step would be dropped by W&B.
"""

from __future__ import annotations

import datetime
import logging
import math
import statistics
import struct
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weibull_monitor.sinks.base import Sink

if TYPE_CHECKING:
    from weibull_monitor.alerts import Alert
    from weibull_monitor.monitor import Snapshot

logger = logging.getLogger("weibull_monitor.sinks")

#: Alert levels of weibull-monitor -> names of ``wandb.AlertLevel`` members.
WANDB_ALERT_LEVELS = {"info": "INFO", "warning": "WARN", "critical": "ERROR"}
#: Columns of the per-snapshot table of fits (one row per matrix or split view).
FIT_TABLE_COLUMNS = (
    "step",
    "name",
    "layer",
    "component",
    "klass",
    "k",
    "k_stderr",
    "scale",
    "r2",
    "n",
    "ok",
    "reason",
)
#: Heatmap panels: label -> components whose per-layer median k fills that panel.
HEATMAP_GROUPS = {
    "Q": ("q",),
    "K": ("k",),
    "FFN": ("ffn_up", "ffn_gate", "ffn_down", "ffn_gate_up"),
}


def _finite_or_nan(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


class KHistory:
    """Per-layer median k of the heatmap groups (Q, K, FFN) over the snapshots seen so far.

    Kept by the sink, not read back from W&B, so drawing a heatmap costs no network round trip.
    """

    def __init__(self, groups: Mapping[str, tuple[str, ...]] = HEATMAP_GROUPS) -> None:
        self.groups = dict(groups)
        self.steps: list[int] = []
        # group -> layer -> step -> k
        self.values: dict[str, dict[int, dict[int, float]]] = {g: defaultdict(dict) for g in self.groups}

    def add(self, snapshot: Snapshot) -> None:
        per_cell: dict[tuple[str, int], list[float]] = defaultdict(list)
        for key, fit in snapshot.fits.items():
            role = snapshot.roles.get(key)
            if role is None or role.layer is None or not fit.ok or not math.isfinite(fit.k):
                continue
            for group, components in self.groups.items():
                if role.component in components:
                    per_cell[(group, role.layer)].append(fit.k)
        if snapshot.step not in self.steps:
            self.steps.append(snapshot.step)
        for (group, layer), ks in per_cell.items():
            self.values[group][layer][snapshot.step] = statistics.median(ks)

    def matrix(self, group: str) -> tuple[list[int], list[int], list[list[float]]]:
        """(layers, steps, rows of k with nan where a layer had no fit at a step) for one group."""
        layers = sorted(self.values[group])
        steps = sorted(self.steps)
        rows = [[self.values[group][layer].get(step, math.nan) for step in steps] for layer in layers]
        return layers, steps, rows


def render_k_heatmap(history: KHistory, anchor: float | None = None) -> Any:
    """An RGB uint8 array (H, W, 3) of layer x step heatmaps of k, one panel per group.

    Uses matplotlib's object API (no pyplot state), so it is safe outside the main thread. The colour scale is
    centred on ``anchor`` (the Gaussian k) so collapse below it and drift above it read at a glance.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [g for g in history.groups if history.values[g]]
    figure = Figure(figsize=(4.2 * max(1, len(groups)), 3.2), dpi=90)
    FigureCanvasAgg(figure)
    all_k = [k for g in groups for row in history.matrix(g)[2] for k in row if math.isfinite(k)]
    centre = anchor if anchor is not None else (statistics.median(all_k) if all_k else 1.2)
    spread = max([abs(k - centre) for k in all_k] + [0.02])
    for index, group in enumerate(groups or ["(no layered fits)"]):
        axes = figure.add_subplot(1, max(1, len(groups)), index + 1)
        if group not in history.values:
            axes.set_axis_off()
            axes.set_title(group)
            continue
        layers, steps, rows = history.matrix(group)
        image = axes.imshow(
            np.array(rows, dtype=float),
            aspect="auto",
            origin="lower",
            cmap="coolwarm",
            vmin=centre - spread,
            vmax=centre + spread,
            interpolation="nearest",
        )
        axes.set_title(f"k of {group} (layer x step)")
        axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        tick_every = max(1, len(steps) // 6)
        axes.set_xticks(
            range(0, len(steps), tick_every), [str(s) for s in steps[::tick_every]], rotation=45, fontsize=7
        )
        axes.set_xlabel("step")
        axes.set_ylabel("layer")
        figure.colorbar(image, ax=axes, fraction=0.05)
    # Fixed margins: tight_layout measured a third of the render time (~0.5 s of ~1 s here).
    figure.subplots_adjust(left=0.05, right=0.97, bottom=0.22, top=0.88, wspace=0.3)
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())
    return rgba[..., :3].copy()


class WandbSink(Sink):
    """Send weibull-monitor output to a W&B run.

    Args:
        run: the ``wandb`` run to log to; ``None`` means the active ``wandb.run`` at the time of each call.
        step_metric: history key that carries the training step and that ``weibull/*`` is plotted against.
        table_every: log the table of fits every this many snapshots (0 turns tables off).
        heatmap_every: log the layer x step heatmap of k every this many snapshots (0 turns it off).
        alert_wait_s: W&B ``wait_duration`` of alerts, in seconds: the same alert title is not sent again sooner.
        define_metrics: declare ``weibull/*`` against ``step_metric`` on first use.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        step_metric: str = "train/global_step",
        table_every: int = 1,
        heatmap_every: int = 5,
        alert_wait_s: float = 300.0,
        define_metrics: bool = True,
    ) -> None:
        if table_every < 0 or heatmap_every < 0:
            raise ValueError("table_every and heatmap_every must be >= 0 (0 turns them off)")
        if alert_wait_s < 0:
            raise ValueError(f"alert_wait_s must be >= 0 seconds, got {alert_wait_s}")
        self._explicit_run = run
        self.step_metric = step_metric
        self.table_every = table_every
        self.heatmap_every = heatmap_every
        self.alert_wait_s = float(alert_wait_s)
        self.define_metrics = define_metrics
        self._defined_for: int | None = None
        self._snapshots_seen = 0
        self._alert_counts: dict[str, int] = defaultdict(int)
        self.history = KHistory()

    def _run(self) -> Any:
        if self._explicit_run is not None:
            return self._explicit_run
        import wandb

        if wandb.run is None:
            raise RuntimeError("WandbSink: no active W&B run; call wandb.init() first or pass run=")
        return wandb.run

    def _ready_run(self) -> Any:
        run = self._run()
        if self.define_metrics and self._defined_for != id(run):
            run.define_metric(self.step_metric)
            run.define_metric("weibull/*", step_metric=self.step_metric)
            self._defined_for = id(run)
        return run

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        row = {key: _finite_or_nan(value) for key, value in metrics.items()}
        row[self.step_metric] = int(step)
        self._ready_run().log(row)

    def log_alert(self, alert: Alert) -> None:
        import wandb

        run = self._ready_run()
        level = getattr(wandb.AlertLevel, WANDB_ALERT_LEVELS.get(alert.level, "WARN"))
        where = ", ".join(alert.matrices[:4]) + (" ..." if len(alert.matrices) > 4 else "")
        text = f"step {alert.step}: {alert.message}" + (f" [{where}]" if where else "")
        run.alert(
            title=f"weibull-monitor {alert.level}: {alert.rule}",
            text=text,
            level=level,
            wait_duration=datetime.timedelta(seconds=self.alert_wait_s),
        )
        # A counter next to the curves shows when alerts fired, also after the notification is gone.
        self._alert_counts[alert.level] += 1
        run.log(
            {f"weibull/alerts/{alert.level}": self._alert_counts[alert.level], self.step_metric: alert.step}
        )

    def log_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshots_seen += 1
        self.history.add(snapshot)
        row: dict[str, Any] = {}
        if self.table_every and self._snapshots_seen % self.table_every == 0:
            row["weibull/fits"] = self._fits_table(snapshot)
        if self.heatmap_every and self._snapshots_seen % self.heatmap_every == 0:
            image = self._heatmap_image(snapshot.step)
            if image is not None:
                row["weibull/k_heatmap"] = image
        if row:
            row[self.step_metric] = int(snapshot.step)
            self._ready_run().log(row)

    def _fits_table(self, snapshot: Snapshot) -> Any:
        import wandb

        rows = []
        for key in sorted(snapshot.fits):
            fit = snapshot.fits[key]
            role = snapshot.roles.get(key)
            rows.append(
                [
                    int(snapshot.step),
                    key,
                    -1 if role is None or role.layer is None else int(role.layer),
                    None if role is None else role.component,
                    None if role is None else role.klass,
                    _finite_or_nan(fit.k),
                    _finite_or_nan(fit.k_stderr),
                    _finite_or_nan(fit.scale),
                    _finite_or_nan(fit.r2),
                    int(fit.n),
                    bool(fit.ok),
                    fit.reason or "",
                ]
            )
        return wandb.Table(columns=list(FIT_TABLE_COLUMNS), data=rows)

    def _heatmap_image(self, step: int) -> Any:
        import wandb

        from weibull_monitor.fit import K_GAUSSIAN

        try:
            pixels = render_k_heatmap(self.history, anchor=K_GAUSSIAN)
        except ImportError as error:  # matplotlib is optional (the `plot` extra): tables and scalars go on
            logger.warning(
                "WandbSink: no k heatmap without matplotlib (%s); install weibull-monitor[plot]", error
            )
            self.heatmap_every = 0
            return None
        return wandb.Image(pixels, caption=f"k per layer and step up to step {step} (centre: Gaussian k)")

    def close(self) -> None:
        # The run belongs to whoever started it (the Trainer's callback, the user): finishing it is theirs.
        self._explicit_run = None


# ---- reading an offline run file back (tests, the report, users checking an offline run before syncing) ----

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_run_records(path: str | Path) -> Iterator[Any]:
    """Yield the ``wandb_internal_pb2.Record`` messages of a W&B run file (``run-*.wandb``).

    The file is a LevelDB-style log: a 7-byte ``:W&B`` header, then 32 KiB blocks of records, each with a
    7-byte header (checksum u32, length u16, type u8) and records split across blocks as FIRST/MIDDLE/LAST.
    A truncated tail (a run still writing) ends the iteration quietly.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (missing ':W&B' header)")
    position = _HEADER
    pending = b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        position += _HEADER
        if kind == 0 and length == 0:  # zero padding up to the block end
            position += left_in_block - _HEADER
            continue
        chunk = data[position : position + length]
        if len(chunk) < length:
            return
        position += length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {position - length - _HEADER}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def run_file_complete(path: str | Path) -> bool:
    """True once the run file holds its ``exit`` record (the run finished and everything before it is on disk)."""
    try:
        return any(record.WhichOneof("record_type") == "exit" for record in iter_run_records(path))
    except (OSError, ValueError):
        return False


def wait_for_run_file(path: str | Path, timeout_s: float = 30.0, poll_s: float = 0.05) -> Path:
    """Wait until an offline run file is complete and return its path.

    ``wandb.finish()`` returns before W&B's service process has flushed the run file (measured here: 2 of 8
    offline runs still held only the 7-byte header right after it), so readers wait for the ``exit`` record.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while not run_file_complete(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout_s:.0f} s (run not finished?)")
        time.sleep(poll_s)
    return Path(path)


def read_run_history(path: str | Path) -> list[dict[str, Any]]:
    """History rows of a W&B run file as plain dicts (nested keys joined by '/'; JSON values decoded)."""
    import json

    rows = []
    for record in iter_run_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def read_run_alerts(path: str | Path) -> list[dict[str, Any]]:
    """Alerts recorded in a W&B run file: title, text, level (``INFO``/``WARN``/``ERROR``), wait_duration_s."""
    alerts = []
    for record in iter_run_records(path):
        if record.WhichOneof("record_type") == "alert":
            alerts.append(
                {
                    "title": record.alert.title,
                    "text": record.alert.text,
                    "level": record.alert.level,
                    "wait_duration_s": record.alert.wait_duration / 1000.0,
                }
            )
    return alerts
