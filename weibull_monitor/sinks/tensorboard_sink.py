"""TensorBoard sink: scalars, reference lines and a custom-scalars layout registered once per writer.

The writer is anything with ``add_scalar`` and ``add_custom_scalars`` (``torch.utils.tensorboard.SummaryWriter``,
tensorboardX, Lightning's ``TensorBoardLogger.experiment``); it is imported lazily, only when the sink has to make one.

Rewinds use TensorBoard's own mechanism, the one behind ``SummaryWriter(purge_step=...)``: a ``SessionLog.START``
event at step s + 1 makes TensorBoard's loader drop every point of that directory with a step >= s + 1 that it read
before the event. In a directory the abandoned timeline's process wrote, the event goes into a small file named
after that process's last event file plus ``.weibull-purge-<step>``, so it sorts right after the abandoned points and
before anything a later process writes there; in the sink's own, still open writer (a rewind inside one process) it
is written inline, before the resumed points. Nothing is deleted: remove the ``*.weibull-purge-*`` file to see the
abandoned timeline again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from weibull_monitor.estimator import K_GAUSSIAN
from weibull_monitor.models.expectations import TRANSMISSION_TERMINAL, expected_band
from weibull_monitor.sinks.base import Sink
from weibull_monitor.sinks.registry import SinkContext
from weibull_monitor.snapshot import keys

if TYPE_CHECKING:
    from weibull_monitor.alerts import Alert
    from weibull_monitor.snapshot import Snapshot

#: Components that get a per-layer k chart (``weibull/k/L<layer>/<component>``).
LAYERED_COMPONENTS = ("q", "k", "v", "o", "qkv", "ffn_up", "ffn_gate", "ffn_down", "ffn_gate_up")

REF_K_GAUSSIAN = keys.REF_K_GAUSSIAN
REF_TRANSMISSION_LOW = keys.REF_TRANSMISSION_LOW
REF_TRANSMISSION_HIGH = keys.REF_TRANSMISSION_HIGH
REF_SELECTION_LOW = keys.REF_SELECTION_LOW
REF_SELECTION_HIGH = keys.REF_SELECTION_HIGH

logger = logging.getLogger("weibull_monitor.sinks")

#: Marks the file that hides an abandoned timeline's points in a TensorBoard directory.
PURGE_SUFFIX = ".weibull-purge-"

# Writers that already carry the layout. Weak, so a closed writer is forgotten; ids as a fallback for writers
# that do not accept weak references.
_LAYOUT_WRITERS: weakref.WeakSet = weakref.WeakSet()
_LAYOUT_WRITER_IDS: set[int] = set()


def custom_scalars_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout (the format of ``SummaryWriter.add_custom_scalars``).

    Class medians of k with the Gaussian anchor and the Transmission (and, when known, Selection) band; the
    Transmission median as a margin chart inside its band; scale growth and T/tau; one chart per component with
    every layer's k (regular expressions, so layers need not be known in advance).
    """
    medians = [
        keys.class_metric("selection", "k_median"),
        keys.class_metric("transmission", "k_median"),
        keys.class_metric("value", "k_median"),
        REF_K_GAUSSIAN,
        REF_TRANSMISSION_LOW,
        REF_TRANSMISSION_HIGH,
        REF_SELECTION_LOW,
        REF_SELECTION_HIGH,
    ]
    return {
        "weibull: classes": {
            "k median of Selection and Transmission, Gaussian anchor and bands": ["Multiline", medians],
            "Transmission k median inside its band": [
                "Margin",
                [keys.class_metric("transmission", "k_median"), REF_TRANSMISSION_LOW, REF_TRANSMISSION_HIGH],
            ],
            "Selection k median inside its expected band": [
                "Margin",
                [keys.class_metric("selection", "k_median"), REF_SELECTION_LOW, REF_SELECTION_HIGH],
            ],
            "k drift from the anchor": ["Multiline", [keys.class_metric(r"^\w+", "k_drift$")]],
            "scale growth (lambda / lambda_first)": [
                "Multiline",
                [keys.class_metric(r"^\w+", "scale_growth$")],
            ],
            "T / tau": ["Multiline", [keys.T_OVER_TAU]],
            "alerts": ["Multiline", ["^" + keys.alert_count(r"\w+$")]],
        },
        "weibull: per-layer k": {
            f"k per layer: {component}": ["Multiline", [rf"^{keys.MATRIX_K_PREFIX}L\d+/{component}$"]]
            for component in LAYERED_COMPONENTS
        },
    }


def register_layout(writer: Any) -> bool:
    """Add the custom-scalars layout to ``writer`` unless it already has it; True when it was added now."""
    try:
        if writer in _LAYOUT_WRITERS:
            return False
    except TypeError:
        if id(writer) in _LAYOUT_WRITER_IDS:
            return False
    writer.add_custom_scalars(custom_scalars_layout())
    try:
        _LAYOUT_WRITERS.add(writer)
    except TypeError:
        _LAYOUT_WRITER_IDS.add(id(writer))
    return True


def reference_scalars(snapshot: Snapshot) -> dict[str, float]:
    """Reference lines for the layout at a snapshot: Gaussian k, the paper's terminal Transmission band (the band
    the report shades too), the expected Selection band."""
    refs = {
        REF_K_GAUSSIAN: float(K_GAUSSIAN),
        REF_TRANSMISSION_LOW: float(TRANSMISSION_TERMINAL.low),
        REF_TRANSMISSION_HIGH: float(TRANSMISSION_TERMINAL.high),
    }
    selection = expected_band("selection", getattr(snapshot, "attention_kind", None))
    if selection is not None:
        refs[REF_SELECTION_LOW] = float(selection.low)
        refs[REF_SELECTION_HIGH] = float(selection.high)
    return refs


class TensorBoardSink(Sink):
    """Write weibull-monitor output to TensorBoard event files.

    Args:
        writer: an existing summary writer to share (the HF Trainer's or Lightning's); it stays open on ``close``.
        log_dir: where to create a writer of our own when ``writer`` is None (closed on ``close``).
        layout: register the custom-scalars layout (once per writer, however many sinks share it).
    """

    def __init__(self, writer: Any = None, *, log_dir: str | None = None, layout: bool = True) -> None:
        if writer is None and log_dir is None:
            raise ValueError("TensorBoardSink needs a writer or a log_dir")
        self._writer = writer
        self._owns_writer = writer is None
        self.log_dir = log_dir if writer is None else getattr(writer, "log_dir", None) or log_dir
        self.layout = layout
        self._alert_counts: dict[str, int] = {}
        self._closed = False
        self._max_step: int | None = None  # the highest step the current writer holds

    @property
    def writer(self) -> Any:
        if self._closed:
            raise RuntimeError("TensorBoardSink is closed")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        if self.layout:
            register_layout(self._writer)
        return self._writer

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """The writer for one call. An owned writer that fails with an OSError (a full disk: its event thread
        dies and re-raises the stored error on every later call) is dropped, so the next call opens a fresh
        event file in ``log_dir`` and TensorBoard recovers once there is space again. The error still
        propagates: the guard reports it."""
        try:
            yield self.writer  # the layout is written on first use, so it is inside the guarded part too
        except OSError:
            broken, self._writer = (self._writer, None) if self._owns_writer else (None, self._writer)
            if broken is not None:
                with contextlib.suppress(Exception):
                    broken.close()
            raise

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        with self._writing() as writer:
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                writer.add_scalar(key, number, int(step))
            writer.flush()
        self._wrote(step)

    def _wrote(self, step: int) -> None:
        self._max_step = int(step) if self._max_step is None else max(self._max_step, int(step))

    def log_alert(self, alert: Alert) -> None:
        self._alert_counts[alert.level] = self._alert_counts.get(alert.level, 0) + 1
        with self._writing() as writer:
            self._write_alert(writer, alert)
        self._wrote(alert.step)

    def _write_alert(self, writer: Any, alert: Alert) -> None:
        writer.add_scalar(keys.alert_count(alert.level), self._alert_counts[alert.level], int(alert.step))
        writer.add_text(
            keys.alert_text(alert.rule),
            f"**{alert.level}** (step {alert.step}): {alert.message}",
            int(alert.step),
        )
        writer.flush()

    def log_snapshot(self, snapshot: Snapshot) -> None:
        with self._writing() as writer:
            for key, value in reference_scalars(snapshot).items():
                if math.isfinite(value):
                    writer.add_scalar(key, value, int(snapshot.step))
            writer.flush()
        self._wrote(snapshot.step)

    # ------------------------------------------------------------------------------------------ rewinds

    def _directory(self) -> str | None:
        writer = self._writer
        directory = self.log_dir or getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
        return os.path.abspath(os.fspath(directory)) if directory else None

    def location(self) -> list[dict[str, Any]]:
        directory = self._directory()
        return [{"kind": "tensorboard", "id": directory}] if directory else []

    def rewind(self, step: int, superseded: Sequence[Mapping[str, Any]] = ()) -> None:
        """Hide the abandoned timeline's points after ``step`` (see the module docstring)."""
        purge = int(step) + 1
        own = self._directory()
        inline = False
        if self._writer is not None and self._max_step is not None and self._max_step >= purge:
            inline = write_session_start(self._writer, purge)
            self._max_step = int(step)
        for entry in superseded:
            if entry.get("last_step") is None or int(entry["last_step"]) < purge:
                continue
            for place in entry.get("dashboards") or ():
                if place.get("kind") != "tensorboard" or not place.get("id"):
                    continue
                if inline and entry.get("this_process") and place["id"] == own:
                    continue  # the START in our own writer already covers it
                purge_directory(place["id"], purge, pid=entry.get("pid"), host=entry.get("host"))

    def close(self) -> None:
        if self._owns_writer and self._writer is not None:
            self._writer.close()
        self._writer = None
        self._closed = True


def _session_start(step: int) -> Any:
    from tensorboard.compat.proto import event_pb2

    return event_pb2.Event(
        step=int(step),
        wall_time=time.time(),
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
    )


def write_session_start(writer: Any, step: int) -> bool:
    """Write a ``SessionLog.START`` at ``step`` through an open summary writer (what ``purge_step`` writes).
    False when the writer has no event-file access (then nothing is written)."""
    get = getattr(writer, "_get_file_writer", None)
    file_writer = get() if callable(get) else getattr(writer, "file_writer", None)
    if file_writer is None or not callable(getattr(file_writer, "add_event", None)):
        logger.warning(
            "TensorBoardSink: this writer cannot take a purge event; the abandoned points stay visible"
        )
        return False
    file_writer.add_event(_session_start(step))
    file_writer.flush()
    return True


def purge_directory(directory: str, step: int, *, pid: Any = None, host: Any = None) -> str | None:
    """Hide the points with a step >= ``step`` that the process ``pid`` on ``host`` wrote in ``directory``: a
    ``SessionLog.START`` in a file that sorts right after that process's last event file. Returns its path (None
    when that process left no event file there). Idempotent."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    mark = f".{host}.{pid}." if pid is not None and host else None
    theirs = [n for n in names if "tfevents" in n and PURGE_SUFFIX not in n and (mark is None or mark in n)]
    if not theirs:
        return None
    path = os.path.join(directory, f"{theirs[-1]}{PURGE_SUFFIX}{int(step)}")
    if os.path.exists(path):
        return path
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    tmp = os.path.join(directory, f".weibull-purge-{os.getpid()}.tmp")  # not an event file name while written
    with open(tmp, "wb") as handle:
        records = RecordWriter(handle)
        records.write(
            event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
        )
        records.write(_session_start(step).SerializeToString())
        records.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    logger.info("TensorBoard: points of %s from step %d on are hidden by %s", directory, step, path)
    return path


def for_trainer(context: SinkContext) -> TensorBoardSink | None:
    """The sink for ``report_to=["tensorboard"]``: a writer of our own in the framework's TensorBoard directory."""
    if context.tensorboard_dir is None:
        return None
    return TensorBoardSink(log_dir=context.tensorboard_dir())


def for_logger(context: SinkContext) -> TensorBoardSink:
    """The sink for a Lightning ``TensorBoardLogger``: its writer (kept open), the layout and reference lines."""
    return TensorBoardSink(context.logger.experiment)
