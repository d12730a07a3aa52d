"""Sinks: where snapshots and alerts go (one small class per dashboard, one interface: :class:`Sink`).

``base`` (the interface) -> ``guard`` (every sink runs on a worker thread; a failing or hanging one never stops
training) -> one module per dashboard, found by name through ``registry`` (``report_to`` names, Lightning logger
classes; :func:`register_dashboard` adds one). ``heatmap`` is the layer x step renderer the W&B sink and the report
share. Dashboard modules are imported on first use, so ``import weibull_monitor.sinks`` never pulls in wandb,
tensorboard, lightning or mlflow.
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
    "Dashboard": "weibull_monitor.sinks.registry",
    "SinkContext": "weibull_monitor.sinks.registry",
    "register_dashboard": "weibull_monitor.sinks.registry",
}

__all__ = ["LoggingSink", "Sink", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weibull_monitor.sinks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
