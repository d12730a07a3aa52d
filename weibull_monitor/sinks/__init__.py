"""Sinks: where snapshots and alerts go (one small class per dashboard, one interface: :class:`Sink`).

``LoggingSink`` ships here; dashboard sinks live in their own modules and are imported on first use so that
``import weibull_monitor.sinks`` never pulls in wandb, tensorboard, lightning or mlflow.
"""

from __future__ import annotations

import importlib
from typing import Any

from weibull_monitor.sinks.base import Sink
from weibull_monitor.sinks.logging_sink import LoggingSink

_LAZY = {
    "GuardedSink": "weibull_monitor.sinks.guard",
    "WandbSink": "weibull_monitor.sinks.wandb_sink",
    "TensorBoardSink": "weibull_monitor.sinks.tensorboard_sink",
    "LightningLoggerSink": "weibull_monitor.sinks.lightning_sink",
    "MLflowSink": "weibull_monitor.sinks.mlflow_sink",
}

__all__ = ["LoggingSink", "Sink", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weibull_monitor.sinks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
