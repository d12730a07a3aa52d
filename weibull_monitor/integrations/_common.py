"""What the HF Trainer and Lightning callbacks share: settings, building the monitor, resume state as JSON.

The callbacks only decide *when* to observe and *where* to send; everything measured comes from
:class:`weibull_monitor.monitor.WeibullMonitor`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("weibull_monitor.integrations")

#: File name of the run store when the callback picks the place (under the Trainer's output or log directory).
DEFAULT_STORE_NAME = "weibull.sqlite"


@dataclass
class CallbackSettings:
    """The options both callbacks take, kept apart from framework objects so they can be exported as JSON.

    Units: ``every`` in optimizer steps; ``alert_wait_s`` in seconds; ``heatmap_every`` in snapshots.
    """

    every: int = 100
    store: str | os.PathLike | bool | None = None  # None: default place; False: no store
    run_name: str | None = None
    stop_on_critical: bool = False
    method: str = "histogram"
    include: Any = None
    exclude: Any = None
    heatmap_every: int = 5
    alert_wait_s: float = 300.0
    dashboards: bool = True
    rules: Sequence[Any] | None = None
    sinks: Sequence[Any] = ()
    on_alert: Callable[[Any], None] | None = None
    overrides: Mapping[str, Any] | None = None
    monitor_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"every must be a positive number of optimizer steps, got {self.every!r}")
        if self.heatmap_every < 0:
            raise ValueError(
                f"heatmap_every must be >= 0 snapshots (0: no heatmap), got {self.heatmap_every}"
            )
        if self.alert_wait_s < 0:
            raise ValueError(f"alert_wait_s must be >= 0 seconds, got {self.alert_wait_s}")

    def json_args(self) -> dict[str, Any]:
        """The plain-data options: what a framework may store in a checkpoint and pass back to the constructor."""
        args: dict[str, Any] = {
            "every": self.every,
            "run_name": self.run_name,
            "stop_on_critical": self.stop_on_critical,
            "method": self.method,
            "heatmap_every": self.heatmap_every,
            "alert_wait_s": self.alert_wait_s,
            "dashboards": self.dashboards,
        }
        if self.store is None or isinstance(self.store, bool):
            args["store"] = self.store
        else:
            args["store"] = os.fspath(self.store)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if (
                value is None
                or isinstance(value, str)
                or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
            ):
                args[name] = list(value) if isinstance(value, tuple) else value
        return args


def store_path(settings: CallbackSettings, default_dir: str | os.PathLike | None) -> str | None:
    """Where the run store goes: the user's path, else ``<default_dir>/weibull.sqlite``; None for no store."""
    if settings.store is False:
        return None
    if settings.store is not None and settings.store is not True:
        return os.fspath(settings.store)
    directory = os.fspath(default_dir) if default_dir else os.getcwd()
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, DEFAULT_STORE_NAME)


def build_monitor(
    settings: CallbackSettings,
    model: Any,
    optimizer: Any,
    *,
    store: str | None,
    sinks: Sequence[Any],
    writer: bool,
    run_name: str | None,
) -> Any:
    """A :class:`WeibullMonitor` for one training run (every rank builds one; only the writer writes)."""
    from weibull_monitor.monitor import WeibullMonitor

    kwargs: dict[str, Any] = {
        "every": settings.every,
        "store": store,
        "sinks": list(sinks) if writer else [],
        "method": settings.method,
        "run_name": run_name,
        "on_alert": settings.on_alert,
        "stop_on_critical": settings.stop_on_critical,
        "writer": writer,
    }
    for name in ("rules", "include", "exclude", "overrides"):
        value = getattr(settings, name)
        if value is not None:
            kwargs[name] = value
    kwargs.update(settings.monitor_kwargs)
    return WeibullMonitor(model, optimizer, **kwargs)


def json_safe(value: Any) -> Any:
    """Plain JSON data from a monitor state: tuples to lists, tensors and numpy scalars to numbers, non-finite
    floats to strings that :func:`from_json_safe` turns back (JSON itself has no nan/inf)."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    tolist = getattr(value, "tolist", None)  # torch tensors, numpy arrays and scalars
    if callable(tolist):
        return json_safe(tolist())
    raise TypeError(f"monitor state holds a {type(value).__name__}, which cannot be stored as JSON")


def from_json_safe(value: Any) -> Any:
    """Inverse of :func:`json_safe` for the non-finite floats (lists stay lists)."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {key: from_json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json_safe(item) for item in value]
    return value


def start_series(
    monitor: Any, saved_state: Mapping[str, Any] | None, global_step: int, stop_on_critical: bool
) -> bool:
    """Continue a resumed series or open a fresh one; True when training should stop already.

    Resumed (a saved state): λ_first, T/τ sums and alert counters come back, and a stop requested before is
    cleared (resuming is the user's decision to go on). Fresh (step 0): the initial weights are snapshotted,
    the reference of scale growth.
    """
    if saved_state is not None:
        monitor.load_state_dict(saved_state)
        monitor.stop_requested = False
        return False
    if int(global_step) == 0:
        return observe(monitor, 0, stop_on_critical)
    return False


def observe(monitor: Any, step: int, stop_on_critical: bool) -> bool:
    """Observe at an optimizer step; True when this snapshot brought a critical alert and the user opted in.

    ``stop_requested`` is agreed across ranks by the monitor, so every rank stops at the same step.
    """
    snapshot = monitor.observe(int(step))
    return bool(stop_on_critical and snapshot is not None and getattr(monitor, "stop_requested", False))
