"""Lightning logger sink: weibull-monitor output through any ``lightning.pytorch`` logger.

Metrics go through the logger's own ``log_metrics`` (so CSV, TensorBoard, W&B, MLflow, Comet, Neptune loggers all
work). Loggers with a richer surface get more: a ``WandbLogger`` gets W&B alerts, the table of fits and the k
heatmap; a ``TensorBoardLogger`` gets the custom-scalars layout and its reference lines. Lightning is not imported
here: loggers are recognised by duck typing, so this module loads without it.

Rewinds: a ``TensorBoardLogger``'s points are hidden by the TensorBoard sink's purge event; a W&B logger's run
follows the W&B sink; any other logger that already holds the abandoned timeline's points (an ``MLFlowLogger``
resumed into the same run, or any logger in a rollback inside one process) gets the resumed steps after the last
abandoned one only. A new logger version, Lightning's default on ``fit(ckpt_path=...)``, needs nothing, and neither
does a ``CSVLogger`` pinned to an old version: Lightning deletes that version's ``metrics.csv`` when a new fit opens
it, so the file holds the resumed fit only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from weibull_monitor.sinks.base import Sink, StepHold
from weibull_monitor.sinks.registry import SinkContext, dashboard_for_logger, rich_sink_for_logger
from weibull_monitor.snapshot import keys

if TYPE_CHECKING:
    from weibull_monitor.alerts import Alert
    from weibull_monitor.snapshot import Snapshot

#: The history key Lightning's ``WandbLogger`` plots everything against.
LIGHTNING_WANDB_STEP = "trainer/global_step"


class LightningLoggerSink(Sink):
    """Wrap one Lightning logger as a sink.

    Args:
        logger: a ``lightning.pytorch.loggers.Logger`` (anything with ``log_metrics(metrics, step)``).
        rich: also send alerts, tables, heatmaps (W&B) and the custom-scalars layout (TensorBoard) where the
            logger supports them.
        heatmap_every: for a W&B logger, log the layer x step heatmap of k every this many snapshots.
        alert_wait_s: for a W&B logger, seconds before the same alert is sent again.
    """

    # Lightning calls its loggers from the training thread, and some (CSV's buffered rows) are not safe to share
    # with another thread: those are called inline. W&B runs and TensorBoard writers are thread-safe, so their
    # sinks run on the guard's worker thread and the table, heatmap and alert work stays off the training loop.
    run_in_thread = False

    def __init__(
        self, logger: Any, *, rich: bool = True, heatmap_every: int = 5, alert_wait_s: float = 300.0
    ) -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(
                f"LightningLoggerSink needs a logger with log_metrics(), got {type(logger).__name__}"
            )
        self.logger = logger
        self.rich = rich
        self.heatmap_every = heatmap_every
        self.alert_wait_s = alert_wait_s
        self._rich_sink: Sink | None = None
        self._rich_sink_made = False
        self._alert_counts: dict[str, int] = {}
        dashboard = dashboard_for_logger(logger)
        self.run_in_thread = dashboard is not None
        self.purges = dashboard is not None and dashboard.name == "tensorboard"  # its points can be hidden
        self.hold = StepHold(self.name)

    @property
    def name(self) -> str:
        return f"LightningLoggerSink({type(self.logger).__name__})"

    def _rich(self) -> Sink | None:
        """The sink for the logger's richer surface, made on first need (``experiment`` may start a W&B run)."""
        if not self._rich_sink_made:
            self._rich_sink_made = True
            if self.rich:
                context = SinkContext(
                    step_metric=LIGHTNING_WANDB_STEP,
                    heatmap_every=self.heatmap_every,
                    alert_wait_s=self.alert_wait_s,
                    logger=self.logger,
                )
                self._rich_sink = rich_sink_for_logger(self.logger, context)
                shared = getattr(self._rich_sink, "hold", None)
                if isinstance(
                    shared, StepHold
                ):  # one record of what the run holds, whichever path a point took
                    shared.sent = self.hold.sent
                    self.hold = shared
        return self._rich_sink

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics and self.rich and self.purges is False:
            self._rich()  # shares the W&B sink's record of the steps sent before any is sent
        if metrics and not self.hold.held(step):
            self.logger.log_metrics({key: float(value) for key, value in metrics.items()}, step=int(step))
            self.hold.note(step)

    def log_alert(self, alert: Alert) -> None:
        if self.hold.held(alert.step):
            return
        rich = self._rich()
        if rich is not None:
            rich.log_alert(alert)  # W&B: run.alert + counter; TensorBoard: counter + text
            return
        self._alert_counts[alert.level] = self._alert_counts.get(alert.level, 0) + 1
        self.logger.log_metrics(
            {keys.alert_count(alert.level): float(self._alert_counts[alert.level])}, step=alert.step
        )

    def log_snapshot(self, snapshot: Snapshot) -> None:
        if self.hold.held(snapshot.step):
            return
        rich = self._rich()
        if rich is not None:
            rich.log_snapshot(snapshot)

    def location(self) -> list[dict[str, Any]]:
        rich = self._rich()
        places = list(rich.location()) if rich is not None else []
        if not places:
            where = getattr(self.logger, "log_dir", None) or getattr(self.logger, "run_id", None)
            if where is not None:
                where = os.path.abspath(where) if isinstance(where, str) and os.path.sep in where else where
                places.append({"kind": f"lightning:{type(self.logger).__name__}", "id": str(where)})
        return places

    def rewind(self, step: int, superseded: Sequence[Mapping[str, Any]] = ()) -> None:
        rich = self._rich()
        if rich is not None:
            rich.rewind(
                step, superseded
            )  # TensorBoard: purge; W&B: its hold (shared with ours) and config note
            if self.purges or getattr(rich, "hold", None) is self.hold:
                return
        if not self.purges:
            # a new CSVLogger starts its metrics.csv afresh: only what this logger itself sent can be there
            fresh_file = "CSVLogger" in {cls.__name__ for cls in type(self.logger).__mro__}
            self.hold.rewind(step, () if fresh_file else superseded, self.location())

    def close(self) -> None:
        # The logger belongs to the Trainer; only our own helper is let go (it never closes a shared writer).
        if self._rich_sink is not None:
            self._rich_sink.close()
        self._rich_sink = None
