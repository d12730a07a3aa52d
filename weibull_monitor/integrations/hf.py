"""Hugging Face ``transformers.Trainer`` callback.

Two lines::

    from weibull_monitor.integrations.hf import WeibullCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[WeibullCallback(every=100)])

It observes after optimizer steps (``state.global_step``, so gradient accumulation is handled), sends metrics to
the dashboards named in ``args.report_to`` (W&B, TensorBoard, MLflow), alerts to W&B, keeps its store under
``args.output_dir`` and exports its state into checkpoints so ``resume_from_checkpoint`` continues the series:
resuming from an earlier checkpoint rewinds it (the store starts a new branch of the run at that step, keeping what
the abandoned timeline wrote after it as superseded rows; see docs/integrations.md, "Resume and rewind").
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from weibull_monitor.integrations.options import (
    CallbackOptions,
    build_monitor,
    callback_signature,
    observe,
    start_series,
    store_path,
)
from weibull_monitor.plain_data import from_json_safe, json_safe
from weibull_monitor.sinks.registry import SinkContext, sinks_for

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

    Takes ``every`` and the keyword options of :class:`~weibull_monitor.integrations.options.CallbackOptions`
    (store, run_name, stop_on_critical, rules, include, exclude, method, sinks, dashboards, heatmap_every,
    alert_wait_s, on_alert, overrides, monitor_kwargs); ``resume_state`` is the monitor state transformers hands
    back when it rebuilds the callback from a checkpoint. Dashboards come from ``args.report_to`` (any name in
    :func:`weibull_monitor.sinks.registry.dashboards`); the store defaults to ``<args.output_dir>/weibull.sqlite``.
    """

    def __init__(
        self, every: int = 100, *, resume_state: dict[str, Any] | None = None, **options: Any
    ) -> None:
        self.settings = CallbackOptions(every=every, **options)
        self.monitor: Any = None
        self.resume_state = resume_state
        self.dashboard_sinks: list[Any] = []

    __init__.__signature__ = callback_signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("every", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=100),
            inspect.Parameter("resume_state", inspect.Parameter.KEYWORD_ONLY, default=None),
        ]
    )

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
        context = SinkContext(
            step_metric=HF_WANDB_STEP,
            heatmap_every=self.settings.heatmap_every,
            alert_wait_s=self.settings.alert_wait_s,
            tensorboard_dir=lambda: tensorboard_log_dir(args, callbacks),
        )
        return sinks_for(_report_to(args), context)

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
        exported = getattr(state, "stateful_callbacks", None)
        if isinstance(exported, dict) and type(self).__name__ not in exported:
            # resumed from a checkpoint saved without this callback: transformers looks the callback up there
            # when it saves the next checkpoint and would fail with a KeyError
            exported[type(self).__name__] = self.state()
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
