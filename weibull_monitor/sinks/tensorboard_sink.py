"""TensorBoard sink: scalars, reference lines and a custom-scalars layout registered once per writer.

The writer is anything with ``add_scalar`` and ``add_custom_scalars`` (``torch.utils.tensorboard.SummaryWriter``,
tensorboardX, Lightning's ``TensorBoardLogger.experiment``); it is imported lazily, only when the sink has to make one.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
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

    def log_alert(self, alert: Alert) -> None:
        self._alert_counts[alert.level] = self._alert_counts.get(alert.level, 0) + 1
        with self._writing() as writer:
            self._write_alert(writer, alert)

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

    def close(self) -> None:
        if self._owns_writer and self._writer is not None:
            self._writer.close()
        self._writer = None
        self._closed = True


def for_trainer(context: SinkContext) -> TensorBoardSink | None:
    """The sink for ``report_to=["tensorboard"]``: a writer of our own in the framework's TensorBoard directory."""
    if context.tensorboard_dir is None:
        return None
    return TensorBoardSink(log_dir=context.tensorboard_dir())


def for_logger(context: SinkContext) -> TensorBoardSink:
    """The sink for a Lightning ``TensorBoardLogger``: its writer (kept open), the layout and reference lines."""
    return TensorBoardSink(context.logger.experiment)
