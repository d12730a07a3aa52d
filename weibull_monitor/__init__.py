"""weibull-monitor: watch the Weibull shape k and scale lambda of every transformer weight matrix while it trains.

Heavy or optional pieces are imported on first use, so ``import weibull_monitor`` stays cheap and never pulls in
transformers, lightning, wandb or tensorboard.
"""

from __future__ import annotations

import importlib
from typing import Any

from weibull_monitor._version import __version__

_LAZY = {
    "fit_weibull": "weibull_monitor.estimator",
    "fit_many": "weibull_monitor.estimator",
    "WeibullFit": "weibull_monitor.estimator",
    "K_GAUSSIAN": "weibull_monitor.estimator",
    "LAMBDA_PER_SIGMA": "weibull_monitor.estimator",
    "WeightHistogram": "weibull_monitor.estimator.histogram",
    "WeibullMonitor": "weibull_monitor.monitor",
    "Snapshot": "weibull_monitor.snapshot",
    "RunStore": "weibull_monitor.store",
    "Alert": "weibull_monitor.alerts",
    "Rule": "weibull_monitor.alerts",
    "Breach": "weibull_monitor.alerts",
    "AlertEngine": "weibull_monitor.alerts",
    "default_rules": "weibull_monitor.alerts",
    "LoggingSink": "weibull_monitor.sinks",
    "Role": "weibull_monitor.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weibull_monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
