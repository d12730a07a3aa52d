"""Dashboards by name: how the training integrations find the sink for ``report_to = ["wandb"]`` or for a Lightning
``WandbLogger``, without knowing any dashboard themselves.

A dashboard is one :class:`Dashboard` registration: its ``report_to`` name, a factory that makes its sink inside a
training framework (from a :class:`SinkContext`), and, for Lightning, the logger class whose richer surface it
serves (alerts, tables, images). Adding one is one file with the sink and one :func:`register_dashboard` call.
Factories are named as ``"module:function"`` strings so that no dashboard library is imported until it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from weibull_monitor.sinks.base import Sink

__all__ = [
    "Dashboard",
    "SinkContext",
    "dashboard_for_logger",
    "dashboards",
    "register_dashboard",
    "rich_sink_for_logger",
    "sinks_for",
]


@dataclass(frozen=True)
class SinkContext:
    """What a dashboard factory may use to find its run or writer inside a training framework.

    ``step_metric``: the history key the framework's own logger plots against (W&B); ``tensorboard_dir``: a
    callable giving the framework's TensorBoard directory; ``logger``: the Lightning logger being wrapped, if any.
    """

    step_metric: str = "train/global_step"
    heatmap_every: int = 5
    alert_wait_s: float = 300.0
    tensorboard_dir: Callable[[], str] | None = None
    logger: Any = None


Factory = Callable[[SinkContext], "Sink | None"]


@dataclass(frozen=True)
class Dashboard:
    """One dashboard. ``factory`` makes its sink for a trainer (None: the dashboard is not reachable, with a
    logged reason); ``logger_class`` names the Lightning logger class whose rich surface ``logger_factory`` serves."""

    name: str
    factory: str | Factory
    logger_class: str | None = None
    logger_factory: str | Factory | None = None


_DASHBOARDS: dict[str, Dashboard] = {}


def register_dashboard(dashboard: Dashboard) -> None:
    """Make ``dashboard.name`` usable in ``report_to`` (and its logger class in Lightning); replaces one of the
    same name."""
    _DASHBOARDS[dashboard.name.lower()] = dashboard


def dashboards() -> dict[str, Dashboard]:
    """The registered dashboards by name."""
    return dict(_DASHBOARDS)


def _resolve(factory: str | Factory) -> Factory:
    if callable(factory):
        return factory
    module, _, function = factory.partition(":")
    return getattr(importlib.import_module(module), function)


def sinks_for(names: Iterable[str], context: SinkContext) -> list[Sink]:
    """The sinks of the dashboards named (unknown names are not ours: the framework's other integrations)."""
    sinks = []
    for name in names:
        dashboard = _DASHBOARDS.get(str(name).lower())
        if dashboard is None:
            continue
        sink = _resolve(dashboard.factory)(context)
        if sink is not None:
            sinks.append(sink)
    return sinks


def dashboard_for_logger(logger: Any) -> Dashboard | None:
    """The dashboard whose ``logger_class`` is in the logger's class hierarchy (by name: no import needed)."""
    names = {cls.__name__ for cls in type(logger).__mro__}
    for dashboard in _DASHBOARDS.values():
        if dashboard.logger_class in names and dashboard.logger_factory is not None:
            return dashboard
    return None


def rich_sink_for_logger(logger: Any, context: SinkContext) -> Sink | None:
    """The sink serving a Lightning logger's richer surface, or None for a plain logger (CSV, ...)."""
    dashboard = dashboard_for_logger(logger)
    if dashboard is None or dashboard.logger_factory is None:
        return None
    return _resolve(dashboard.logger_factory)(context)


_BUILT_IN: Sequence[Dashboard] = (
    Dashboard(
        "wandb",
        "weibull_monitor.sinks.wandb_sink:for_trainer",
        "WandbLogger",
        "weibull_monitor.sinks.wandb_sink:for_logger",
    ),
    Dashboard(
        "tensorboard",
        "weibull_monitor.sinks.tensorboard_sink:for_trainer",
        "TensorBoardLogger",
        "weibull_monitor.sinks.tensorboard_sink:for_logger",
    ),
    Dashboard("mlflow", "weibull_monitor.sinks.mlflow_sink:for_trainer"),
)
for _dashboard in _BUILT_IN:
    register_dashboard(_dashboard)
