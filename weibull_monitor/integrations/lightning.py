"""Lightning (``lightning.pytorch``) callback.

Two lines::

    from weibull_monitor.integrations.lightning import WeibullCallback
    trainer = lightning.pytorch.Trainer(..., callbacks=[WeibullCallback(every=100)])

It acts once per new ``trainer.global_step`` (``on_train_batch_end`` fires per micro-batch under gradient
accumulation), logs through every logger in ``trainer.loggers``, sends W&B alerts when a ``WandbLogger`` is
attached, keeps its store under the trainer's log directory and saves its state in ``.ckpt`` files.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from lightning.pytorch.callbacks import Callback

from weibull_monitor.integrations.options import (
    CallbackOptions,
    build_monitor,
    callback_signature,
    observe,
    start_series,
    store_path,
)
from weibull_monitor.sinks.lightning_sink import LightningLoggerSink

logger = logging.getLogger("weibull_monitor.integrations.lightning")


class WeibullCallback(Callback):
    """Weibull monitoring for the Lightning Trainer.

    Takes ``every`` (optimizer steps, ``trainer.global_step``) and the keyword options of
    :class:`~weibull_monitor.integrations.options.CallbackOptions`. Logs through every logger in
    ``trainer.loggers`` (one ``LightningLoggerSink`` each; W&B and TensorBoard loggers get their richer surface);
    the store defaults to ``<trainer.log_dir>/weibull.sqlite``.
    """

    def __init__(self, every: int = 100, **options: Any) -> None:
        self.settings = CallbackOptions(every=every, **options)
        self.monitor: Any = None
        self._pending_state: dict[str, Any] | None = None
        self._last_step: int | None = None
        # Where the series lives. Saved in checkpoints: a resumed fit gets a new logger version (a new log_dir),
        # but its snapshots belong to the same series, so it keeps appending to the same store and run.
        self.store_path: str | None = None

    __init__.__signature__ = callback_signature(  # type: ignore[attr-defined]
        [inspect.Parameter("every", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=100)]
    )

    @property
    def state_key(self) -> str:
        # Unique per configuration, so two monitors (say, every=10 on attention, every=100 on all) keep apart.
        return self._generate_state_key(every=self.settings.every, run_name=self.settings.run_name)

    # ---- checkpoint state ----

    def state_dict(self) -> dict[str, Any]:
        monitor = self.monitor.state_dict() if self.monitor is not None else self._pending_state
        return {"monitor": monitor, "store": self.store_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before the fit loop starts; the monitor is built in on_train_start.
        self._pending_state = state_dict.get("monitor")
        saved_store = state_dict.get("store")
        if self.settings.store is None and saved_store and os.path.exists(saved_store):
            self.store_path = saved_store
        if self.monitor is not None and self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    # ---- where things go ----

    @staticmethod
    def _log_dir(trainer: Any) -> str:
        return trainer.log_dir or trainer.default_root_dir

    def _sinks(self, trainer: Any) -> list[Any]:
        sinks: list[Any] = []
        if self.settings.dashboards:
            sinks = [
                LightningLoggerSink(
                    lg, heatmap_every=self.settings.heatmap_every, alert_wait_s=self.settings.alert_wait_s
                )
                for lg in trainer.loggers
            ]
        return [*sinks, *self.settings.sinks]

    # ---- Trainer hooks ----

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Built here, not in setup: optimizers exist and a resumed global_step is restored by now.
        writer = bool(trainer.is_global_zero)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if len(trainer.optimizers) > 1:
            logger.warning("several optimizers: learning rates and weight decay are read from the first only")
        if self.monitor is not None:
            self.monitor.close()
        # trainer.log_dir broadcasts from rank 0: a collective, so every rank asks, unconditionally.
        log_dir = self._log_dir(trainer)
        if writer and self.store_path is None:
            self.store_path = store_path(self.settings, log_dir)
        self.monitor = build_monitor(
            self.settings,
            pl_module,
            optimizer,
            store=self.store_path if writer else None,
            sinks=self._sinks(trainer) if writer else [],
            writer=writer,
            # None: a fresh, unique run in the store; a resumed run takes its name back from the checkpoint.
            run_name=self.settings.run_name,
        )
        saved, self._pending_state = self._pending_state, None
        self._last_step = int(trainer.global_step)
        if start_series(self.monitor, saved, trainer.global_step, self.settings.stop_on_critical):
            trainer.should_stop = True

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if self.monitor is None or step == self._last_step:
            return  # a micro-batch inside gradient accumulation: no optimizer step yet
        self._last_step = step
        if observe(self.monitor, step, self.settings.stop_on_critical):
            logger.warning("critical Weibull alert at step %d: stopping training (stop_on_critical)", step)
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self._pending_state = self.monitor.state_dict()  # a later fit() on this trainer continues
            self.monitor.close()
            self.monitor = None
