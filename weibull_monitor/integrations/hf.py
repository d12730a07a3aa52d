"""Hugging Face ``transformers.Trainer`` callback.

Two lines::

    from weibull_monitor.integrations.hf import WeibullCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[WeibullCallback(every=100)])

It observes after optimizer steps (``state.global_step``, so gradient accumulation is handled), sends metrics to
the dashboards named in ``args.report_to`` (W&B, TensorBoard, MLflow), alerts to W&B, keeps its store under
``args.output_dir`` and exports its state into checkpoints so ``resume_from_checkpoint`` continues the series.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from weibull_monitor.integrations._common import (
    CallbackSettings,
    build_monitor,
    from_json_safe,
    json_safe,
    observe,
    start_series,
    store_path,
)

logger = logging.getLogger("weibull_monitor.integrations.hf")

#: The history key the Trainer's W&B callback plots everything against.
HF_WANDB_STEP = "train/global_step"


def _report_to(args: Any) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return [str(name).lower() for name in report_to]


def _trainer_callbacks() -> list[Any]:
    """The Trainer's callbacks, read from the ``CallbackHandler`` that is calling us (it passes no handle).

    Best effort: an unusual caller gives an empty list and the callers below fall back to the documented
    defaults.
    """
    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        if type(handler).__name__ == "CallbackHandler" and isinstance(
            getattr(handler, "callbacks", None), list
        ):
            return list(handler.callbacks)
        frame = frame.f_back
    return []


def tensorboard_log_dir(args: Any, callbacks: Sequence[Any] = ()) -> str:
    """The directory the Trainer's TensorBoard callback writes to.

    transformers 5: ``TENSORBOARD_LOGGING_DIR`` if set, else the callback's ``logging_dir`` (set in its
    ``on_train_begin``, which runs before user callbacks), else ``<output_dir>/runs/<newest>``.
    """
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    for callback in callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            directory = getattr(callback, "logging_dir", None)
            writer = getattr(callback, "tb_writer", None)
            directory = directory or getattr(writer, "log_dir", None)
            if directory:
                return os.fspath(directory)
    runs = os.path.join(args.output_dir, "runs")
    if os.path.isdir(runs):
        candidates = [os.path.join(runs, name) for name in os.listdir(runs)]
        candidates = [path for path in candidates if os.path.isdir(path)]
        if candidates:
            return max(candidates, key=os.path.getmtime)
    from transformers.integrations.integration_utils import default_logdir

    return os.path.join(args.output_dir, default_logdir())


class WeibullCallback(TrainerCallback, ExportableState):
    """Weibull monitoring for the HF Trainer.

    Args:
        every: snapshot every this many optimizer steps.
        store: SQLite run store path; ``None``: ``<args.output_dir>/weibull.sqlite``; ``False``: no store.
        run_name: name of the run in the store; default a fresh unique name (a resumed run takes the name
            saved in its checkpoint, so it appends to the same series).
        stop_on_critical: set ``control.should_training_stop`` when a critical alert fires.
        rules: alert rules (default: the built-in rules).
        include, exclude: which matrices to watch (passed to the monitor).
        method: ``"histogram"`` (fast, default) or ``"exact"``.
        sinks: extra sinks besides those picked from ``args.report_to``.
        dashboards: pick sinks from ``args.report_to`` (``wandb``, ``tensorboard``, ``mlflow``).
        heatmap_every: W&B layer x step heatmap of k every this many snapshots (0: never).
        alert_wait_s: seconds W&B waits before sending the same alert again.
        on_alert: called with every fired alert (on the main process).
        monitor_kwargs: any other ``WeibullMonitor`` keyword.
        resume_state: monitor state to restore (set by transformers when it rebuilds the callback).
    """

    def __init__(
        self,
        every: int = 100,
        *,
        store: str | os.PathLike | bool | None = None,
        run_name: str | None = None,
        stop_on_critical: bool = False,
        rules: Sequence[Any] | None = None,
        include: Any = None,
        exclude: Any = None,
        method: str = "histogram",
        sinks: Sequence[Any] = (),
        dashboards: bool = True,
        heatmap_every: int = 5,
        alert_wait_s: float = 300.0,
        on_alert: Callable[[Any], None] | None = None,
        overrides: Mapping[str, Any] | None = None,
        monitor_kwargs: dict[str, Any] | None = None,
        resume_state: dict[str, Any] | None = None,
    ) -> None:
        self.settings = CallbackSettings(
            every=every,
            store=store,
            run_name=run_name,
            stop_on_critical=stop_on_critical,
            method=method,
            include=include,
            exclude=exclude,
            heatmap_every=heatmap_every,
            alert_wait_s=alert_wait_s,
            dashboards=dashboards,
            rules=rules,
            sinks=tuple(sinks),
            on_alert=on_alert,
            overrides=overrides,
            monitor_kwargs=dict(monitor_kwargs or {}),
        )
        self.monitor: Any = None
        self.resume_state = resume_state
        self.dashboard_sinks: list[Any] = []

    # ---- transformers' stateful-callback export (trainer_state.json inside each checkpoint) ----

    def state(self) -> dict[str, Any]:
        current = self.monitor.state_dict() if self.monitor is not None else self.resume_state
        return {
            "args": self.settings.json_args(),
            "attributes": {"resume_state": None if current is None else json_safe(current)},
        }

    def _saved_state(self, state: Any) -> dict[str, Any] | None:
        """Monitor state to restore: one handed to us by transformers, else the one in the resumed checkpoint.

        transformers restores callbacks itself only with ``restore_callback_states_from_checkpoint=True``; a
        resumed TrainerState still carries our export, so we read it there in the other case.
        """
        if self.resume_state is not None:
            return from_json_safe(self.resume_state)
        if not state.global_step:
            return None
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several instances: ours is the one with the same settings
            saved = next((s for s in saved if s.get("args", {}).get("every") == self.settings.every), None)
        if not isinstance(saved, dict):
            return None
        resume = saved.get("attributes", {}).get("resume_state")
        return None if resume is None else from_json_safe(resume)

    # ---- sinks from report_to ----

    def _dashboard_sinks(self, args: Any, callbacks: Sequence[Any]) -> list[Any]:
        sinks: list[Any] = []
        report_to = _report_to(args)
        if "wandb" in report_to:
            import wandb

            from weibull_monitor.sinks.wandb_sink import WandbSink

            if wandb.run is None:
                logger.warning(
                    "report_to has wandb but no W&B run is active: Weibull metrics are not sent to W&B"
                )
            else:
                sinks.append(
                    WandbSink(
                        wandb.run,
                        step_metric=HF_WANDB_STEP,
                        heatmap_every=self.settings.heatmap_every,
                        alert_wait_s=self.settings.alert_wait_s,
                    )
                )
        if "tensorboard" in report_to:
            from weibull_monitor.sinks.tensorboard_sink import TensorBoardSink

            sinks.append(TensorBoardSink(log_dir=tensorboard_log_dir(args, callbacks)))
        if "mlflow" in report_to:
            import mlflow

            from weibull_monitor.sinks.mlflow_sink import MLflowSink

            active = mlflow.active_run()
            if active is None:
                logger.warning(
                    "report_to has mlflow but no MLflow run is active: Weibull metrics are not sent there"
                )
            else:
                sinks.append(MLflowSink(active.info.run_id))
        return sinks

    # ---- Trainer events ----

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("WeibullCallback needs the model; the Trainer passes it to callbacks")
        writer = bool(state.is_world_process_zero)
        callbacks = _trainer_callbacks()
        self.dashboard_sinks = (
            self._dashboard_sinks(args, callbacks) if writer and self.settings.dashboards else []
        )
        if self.monitor is not None:  # a second train() on the same Trainer: start clean
            self.monitor.close()
        self.monitor = build_monitor(
            self.settings,
            model,
            optimizer,
            store=store_path(self.settings, args.output_dir) if writer else None,
            sinks=[*self.dashboard_sinks, *self.settings.sinks],
            writer=writer,
            # None: a fresh, unique run in the store; a resumed run takes its name back from the checkpoint.
            run_name=self.settings.run_name,
        )
        saved = self._saved_state(state)
        if start_series(self.monitor, saved, state.global_step, self.settings.stop_on_critical):
            control.should_training_stop = True
        self.resume_state = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return control
        if observe(self.monitor, state.global_step, self.settings.stop_on_critical):
            logger.warning(
                "critical Weibull alert at step %d: stopping training (stop_on_critical)", state.global_step
            )
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            # Closing flushes the sinks, so the W&B run (still open: the Trainer does not finish it) and the
            # TensorBoard files hold everything once train() returns.
            self.monitor.close()
            self.monitor = None
        return control
