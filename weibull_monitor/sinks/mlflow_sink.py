"""MLflow sink: metrics in batches against the training step, alerts as tags and counters, fits as JSON artifacts.

MLflow is imported lazily. The sink logs to one run, by id, through ``MlflowClient`` so it never depends on
(or changes) which run is "active" in the calling thread.

Rewinds: MLflow cannot remove metric points. A resumed training that logs to a new MLflow run (the HF Trainer's
default) needs nothing; one that continues the same run (``MLFLOW_RUN_ID``, or a rollback inside one process)
holds back the resumed steps up to the last abandoned one, so no step is logged twice (the run store has them),
and tags the run ``weibull.rewind``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from weibull_monitor.models.naming import display_name
from weibull_monitor.plain_data import finite_or_none
from weibull_monitor.sinks.base import Sink, StepHold
from weibull_monitor.sinks.registry import SinkContext
from weibull_monitor.snapshot import keys

if TYPE_CHECKING:
    from weibull_monitor.alerts import Alert
    from weibull_monitor.snapshot import Snapshot

logger = logging.getLogger("weibull_monitor.sinks")

#: MLflow accepts at most this many metrics in one ``log_batch`` call.
MLFLOW_BATCH_LIMIT = 1000


class MLflowSink(Sink):
    """Send weibull-monitor output to an MLflow run.

    Args:
        run_id: the run to log to; ``None`` means the active run (``mlflow.active_run()``) at first use.
        tracking_uri: tracking server or store for the client; ``None`` uses MLflow's configured one.
        log_fits: write each snapshot's fits as ``weibull/fits/step_<step>.json`` into the run's artifacts.
    """

    def __init__(
        self, run_id: str | None = None, *, tracking_uri: str | None = None, log_fits: bool = True
    ) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.log_fits = log_fits
        self._client: Any = None
        self._alert_counts: dict[str, int] = {}
        self.hold = StepHold("MLflowSink")

    def _target(self) -> tuple[Any, str]:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is None:
            import mlflow

            active = mlflow.active_run()
            if active is None:
                raise RuntimeError(
                    "MLflowSink: no active MLflow run; call mlflow.start_run() first or pass run_id="
                )
            self.run_id = active.info.run_id
        return self._client, self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.hold.held(step):
            return
        client, run_id = self._target()
        now_ms = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            batch.append(Metric(key=key, value=number, timestamp=now_ms, step=int(step)))
        for start in range(0, len(batch), MLFLOW_BATCH_LIMIT):
            client.log_batch(run_id, metrics=batch[start : start + MLFLOW_BATCH_LIMIT])
        self.hold.note(step)

    def log_alert(self, alert: Alert) -> None:
        if self.hold.held(alert.step):
            return
        client, run_id = self._target()
        self._alert_counts[alert.level] = self._alert_counts.get(alert.level, 0) + 1
        self.log_metrics({keys.alert_count(alert.level): self._alert_counts[alert.level]}, alert.step)
        client.set_tag(
            run_id,
            "weibull.last_alert",
            f"{alert.level} {alert.rule} at step {alert.step}: {alert.message}"[:5000],
        )

    def log_snapshot(self, snapshot: Snapshot) -> None:
        if not self.log_fits or self.hold.held(snapshot.step):
            return
        client, run_id = self._target()
        rows = []
        for key in sorted(snapshot.fits):
            fit = snapshot.fits[key]
            role = snapshot.roles.get(key)
            rows.append(
                {
                    "name": display_name(key),
                    "param_name": key,
                    "layer": None if role is None else role.layer,
                    "component": None if role is None else role.component,
                    "klass": None if role is None else role.klass,
                    "k": finite_or_none(fit.k),
                    "k_stderr": finite_or_none(fit.k_stderr),
                    "scale": finite_or_none(fit.scale),
                    "r2": finite_or_none(fit.r2),
                    "n": int(fit.n),
                    "ok": bool(fit.ok),
                    "reason": fit.reason,
                }
            )
        client.log_dict(
            run_id,
            {"step": int(snapshot.step), "fits": rows},
            keys.fits_artifact(snapshot.step),
        )

    def location(self) -> list[dict[str, Any]]:
        try:
            client, run_id = self._target()
        except Exception:
            return []
        uri = (
            self.tracking_uri
            or getattr(client, "tracking_uri", None)
            or getattr(client, "_tracking_uri", None)
        )
        return [{"kind": "mlflow", "id": f"{uri}#{run_id}", "run_id": run_id}]

    def rewind(self, step: int, superseded: Sequence[Mapping[str, Any]] = ()) -> None:
        last = self.hold.rewind(step, superseded, self.location())
        if last is not None:
            client, run_id = self._target()
            client.set_tag(
                run_id, "weibull.rewind", f"rewound to step {step}; steps {step + 1}-{last} not re-logged"
            )

    def close(self) -> None:
        # The run belongs to whoever started it; ending it is theirs.
        self._client = None


def for_trainer(context: SinkContext) -> MLflowSink | None:
    """The sink for ``report_to=["mlflow"]``: the active MLflow run (None, with a warning, when there is none)."""
    import mlflow

    active = mlflow.active_run()
    if active is None:
        logger.warning("report_to has mlflow but no MLflow run is active: Weibull metrics are not sent there")
        return None
    return MLflowSink(active.info.run_id)
