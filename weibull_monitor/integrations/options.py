"""What the HF Trainer and Lightning callbacks share: their options (defined once, here), where the store goes,
building the monitor, continuing a series.

The callbacks only decide *when* to observe and *where* to send; everything measured comes from
:class:`weibull_monitor.monitor.WeibullMonitor`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from weibull_monitor.estimator.protocol import check_method
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.monitor.monitor import check_every

logger = logging.getLogger("weibull_monitor.integrations")

#: File name of the run store when the callback picks the place (under the Trainer's output or log directory).
DEFAULT_STORE_NAME = "weibull.sqlite"


@dataclass
class CallbackOptions:
    """The options both callbacks take, defined and validated here once (the callbacks' keyword arguments).

    Args:
        every: snapshot every this many optimizer steps.
        store: SQLite run store path; ``None``: ``<output or log dir>/weibull.sqlite``; ``False``: no store.
        run_name: name of the run in the store; default a fresh unique name (a resumed run takes the name saved
            in its checkpoint, so it appends to the same series).
        stop_on_critical: stop training when a critical alert fires.
        method: ``"histogram"`` (fast, default) or ``"exact"``.
        include, exclude: which matrices to watch (glob patterns, a regex or a callable on parameter names).
        heatmap_every: W&B layer x step heatmap of k every this many snapshots (0: never).
        alert_wait_s: seconds W&B waits before sending the same alert again.
        dashboards: send to the framework's dashboards (HF ``args.report_to``, Lightning ``trainer.loggers``).
        rules: alert rules (default: the built-in rules).
        sinks: extra sinks besides the dashboards'.
        on_alert: called with every fired alert (on the main process).
        overrides: role-map overrides (regex -> component).
        monitor_kwargs: any other ``WeibullMonitor`` keyword.
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
        self.sinks = tuple(self.sinks)
        self.monitor_kwargs = dict(self.monitor_kwargs or {})
        check_every(self.every)
        check_method(self.method)
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


def callback_signature(first: Sequence[inspect.Parameter] = ()) -> inspect.Signature:
    """The signature a callback's ``__init__`` shows: ``self``, ``first``, then every option as a keyword."""
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *first]
    taken = {p.name for p in parameters}
    for option in fields(CallbackOptions):
        if option.name in taken:
            continue
        default = (
            option.default if option.default_factory is field().default_factory else option.default_factory()
        )
        parameters.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(parameters)


def store_path(settings: CallbackOptions, default_dir: str | os.PathLike | None) -> str | None:
    """Where the run store goes: the user's path, else ``<default_dir>/weibull.sqlite``; None for no store."""
    if settings.store is False:
        return None
    if settings.store is not None and settings.store is not True:
        return os.fspath(settings.store)
    directory = os.fspath(default_dir) if default_dir else os.getcwd()
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, DEFAULT_STORE_NAME)


def build_monitor(
    settings: CallbackOptions,
    model: Any,
    optimizer: Any,
    *,
    store: str | None,
    sinks: Sequence[Any],
    writer: bool,
    run_name: str | None,
) -> WeibullMonitor:
    """A :class:`WeibullMonitor` for one training run (every rank builds one; only the writer writes)."""
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


def start_series(
    monitor: Any, saved_state: Mapping[str, Any] | None, global_step: int, stop_on_critical: bool
) -> bool:
    """Continue a resumed series or open a fresh one; True when training should stop already.

    - Resumed with a saved state (the checkpoint's): the monitor goes back to its state at ``global_step`` (λ_first,
      T/τ sums, alert counters), a stop requested before is cleared (resuming is the user's decision to go on),
      and the store starts a new branch of the run there: what an abandoned timeline wrote after that step is kept,
      marked superseded, outside the run's series.
    - Fresh (step 0): the initial weights are snapshotted, the reference of scale growth (a run name that already
      has a timeline in the store restarts it, with a warning: the old timeline is kept as a superseded branch).
    - Resumed without a saved state (a checkpoint written without this callback): the state comes from the store's
      last snapshot at or before that step when the run name has one, else the series starts fresh there (a
      warning says so).
    """
    step = int(global_step)
    if saved_state is not None:
        monitor.resume(step, saved_state)
        monitor.stop_requested = False
        return False
    if step == 0:
        others = monitor.other_runs() if hasattr(monitor, "other_runs") else []
        if others:
            logger.info(
                "weibull-monitor: the store %s already holds %d other run(s) (last: %r); this training is the new "
                "run %r (resume from a checkpoint to continue one, or pass its run_name to restart it)",
                getattr(monitor.store, "path", "?"),
                len(others),
                others[-1],
                monitor.run_name,
            )
        return observe(monitor, 0, stop_on_critical)
    logger.warning(
        "weibull-monitor: training resumed at step %d from a checkpoint that holds no weibull-monitor state "
        "(saved before the callback was added?)",
        step,
    )
    monitor.resume(step, reason="resume without state")
    monitor.stop_requested = False
    return False


def observe(monitor: Any, step: int, stop_on_critical: bool) -> bool:
    """Observe at an optimizer step; True when this snapshot brought a critical alert and the user opted in.

    ``stop_requested`` is agreed across ranks by the monitor, so every rank stops at the same step.
    """
    snapshot = monitor.observe(int(step))
    return bool(stop_on_critical and snapshot is not None and getattr(monitor, "stop_requested", False))
