"""Weights & Biases sink: metrics against the training step, a table of fits, a k heatmap, and alerts.

W&B is imported lazily: this module loads without it, and the sink fails with a clear message only when used.
Metrics are logged with the step as a value of ``step_metric`` (``train/global_step`` for the HF Trainer,
``trainer/global_step`` for Lightning), never through ``wandb.log(step=...)``: the Trainer's own callback advances
W&B's internal step on its own schedule, and a smaller explicit step would be dropped by W&B.

Rewinds: W&B history cannot be edited from the client. A run started with ``wandb.init(resume_from=
"<id>?_step=<n>")`` is truncated by W&B's server (offline: the branch point is recorded in the run file and applied
when it is synced), and the sink sends the resumed timeline as it comes. Otherwise, when the run already holds
points of the abandoned timeline after the rewind step (the same run continued in place, ``resume="allow"``, or a
rollback inside one process), the resumed steps up to the last abandoned one are held back, so no step appears
twice in a chart (the run store has them all). A rewind is also noted in the run's config (``weibull_rewinds``).
"""

from __future__ import annotations

import datetime
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from weibull_monitor.estimator import K_GAUSSIAN
from weibull_monitor.models.naming import display_name
from weibull_monitor.plain_data import finite_or_nan
from weibull_monitor.sinks.base import Sink, StepHold, same_place
from weibull_monitor.sinks.heatmap import KHistory, render_k_heatmap
from weibull_monitor.sinks.registry import SinkContext
from weibull_monitor.snapshot import keys

if TYPE_CHECKING:
    from weibull_monitor.alerts import Alert
    from weibull_monitor.snapshot import Snapshot

logger = logging.getLogger("weibull_monitor.sinks")

#: Alert levels of weibull-monitor -> names of ``wandb.AlertLevel`` members.
WANDB_ALERT_LEVELS = {"info": "INFO", "warning": "WARN", "critical": "ERROR"}
#: Columns of the per-snapshot table of fits (one row per matrix or split view).
FIT_TABLE_COLUMNS = (
    "step",
    "name",  # without the prefixes wrappers add (torch.compile, PEFT, DDP, FSDP); param_name is the real one
    "param_name",
    "layer",
    "component",
    "klass",
    "k",
    "k_stderr",
    "scale",
    "r2",
    "n",
    "ok",
    "reason",
)


class WandbSink(Sink):
    """Send weibull-monitor output to a W&B run.

    Args:
        run: the ``wandb`` run to log to; ``None`` means the active ``wandb.run`` at the time of each call.
        step_metric: history key that carries the training step and that ``weibull/*`` is plotted against.
        table_every: log the table of fits every this many snapshots (0 turns tables off).
        heatmap_every: log the layer x step heatmap of k every this many snapshots (0 turns it off).
        alert_wait_s: W&B ``wait_duration`` of alerts, in seconds: the same alert title is not sent again sooner.
        define_metrics: declare ``weibull/*`` against ``step_metric`` on first use.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        step_metric: str = "train/global_step",
        table_every: int = 1,
        heatmap_every: int = 5,
        alert_wait_s: float = 300.0,
        define_metrics: bool = True,
    ) -> None:
        if table_every < 0 or heatmap_every < 0:
            raise ValueError("table_every and heatmap_every must be >= 0 (0 turns them off)")
        if alert_wait_s < 0:
            raise ValueError(f"alert_wait_s must be >= 0 seconds, got {alert_wait_s}")
        self._explicit_run = run
        self.step_metric = step_metric
        self.table_every = table_every
        self.heatmap_every = heatmap_every
        self.alert_wait_s = float(alert_wait_s)
        self.define_metrics = define_metrics
        self._defined_for: int | None = None
        self._snapshots_seen = 0
        self._alert_counts: dict[str, int] = defaultdict(int)
        self.history = KHistory()
        self.hold = StepHold("WandbSink")
        self._rewinds: list[dict[str, Any]] = []

    def _run(self) -> Any:
        if self._explicit_run is not None:
            return self._explicit_run
        import wandb

        if wandb.run is None:
            raise RuntimeError("WandbSink: no active W&B run; call wandb.init() first or pass run=")
        return wandb.run

    def _ready_run(self) -> Any:
        run = self._run()
        if self.define_metrics and self._defined_for != id(run):
            run.define_metric(self.step_metric)
            run.define_metric(keys.ALL, step_metric=self.step_metric)
            self._defined_for = id(run)
        return run

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not metrics or self.hold.held(step):
            return
        row = {key: finite_or_nan(value) for key, value in metrics.items()}
        row[self.step_metric] = int(step)
        self._ready_run().log(row)
        self.hold.note(step)

    def log_alert(self, alert: Alert) -> None:
        import wandb

        if self.hold.held(alert.step):
            return
        run = self._ready_run()
        level = getattr(wandb.AlertLevel, WANDB_ALERT_LEVELS.get(alert.level, "WARN"))
        where = ", ".join(alert.matrices[:4]) + (" ..." if len(alert.matrices) > 4 else "")
        text = f"step {alert.step}: {alert.message}" + (f" [{where}]" if where else "")
        run.alert(
            title=f"weibull-monitor {alert.level}: {alert.rule}",
            text=text,
            level=level,
            wait_duration=datetime.timedelta(seconds=self.alert_wait_s),
        )
        # A counter next to the curves shows when alerts fired, also after the notification is gone.
        self._alert_counts[alert.level] += 1
        run.log(
            {keys.alert_count(alert.level): self._alert_counts[alert.level], self.step_metric: alert.step}
        )

    def log_snapshot(self, snapshot: Snapshot) -> None:
        if self.hold.held(snapshot.step):
            return
        self._snapshots_seen += 1
        self.history.add(snapshot)
        row: dict[str, Any] = {}
        if self.table_every and self._snapshots_seen % self.table_every == 0:
            row[keys.FITS_TABLE] = self._fits_table(snapshot)
        if self.heatmap_every and self._snapshots_seen % self.heatmap_every == 0:
            image = self._heatmap_image(snapshot.step)
            if image is not None:
                row[keys.K_HEATMAP] = image
        if row:
            row[self.step_metric] = int(snapshot.step)
            self._ready_run().log(row)

    def _fits_table(self, snapshot: Snapshot) -> Any:
        import wandb

        rows = []
        for key in sorted(snapshot.fits):
            fit = snapshot.fits[key]
            role = snapshot.roles.get(key)
            rows.append(
                [
                    int(snapshot.step),
                    display_name(key),
                    key,
                    -1 if role is None or role.layer is None else int(role.layer),
                    None if role is None else role.component,
                    None if role is None else role.klass,
                    finite_or_nan(fit.k),
                    finite_or_nan(fit.k_stderr),
                    finite_or_nan(fit.scale),
                    finite_or_nan(fit.r2),
                    int(fit.n),
                    bool(fit.ok),
                    fit.reason or "",
                ]
            )
        return wandb.Table(columns=list(FIT_TABLE_COLUMNS), data=rows)

    def _heatmap_image(self, step: int) -> Any:
        import wandb

        try:
            pixels = render_k_heatmap(self.history, anchor=K_GAUSSIAN)
        except ImportError as error:  # matplotlib is optional (the `plot` extra): tables and scalars go on
            logger.warning(
                "WandbSink: no k heatmap without matplotlib (%s); install weibull-monitor[plot]", error
            )
            self.heatmap_every = 0
            return None
        return wandb.Image(pixels, caption=f"k per layer and step up to step {step} (centre: Gaussian k)")

    def location(self) -> list[dict[str, Any]]:
        try:
            run = self._run()
        except Exception:
            return []
        project, entity = getattr(run, "project", None), getattr(run, "entity", None)
        return [
            {
                "kind": "wandb",
                "id": f"{entity or ''}/{project or ''}/{run.id}",
                "run_id": run.id,
                "project": project,
                "offline": bool(getattr(run, "offline", False)),
                "step_metric": self.step_metric,
            }
        ]

    def rewind(self, step: int, superseded: Sequence[Mapping[str, Any]] = ()) -> None:
        run = self._run()
        here = self.location()
        rewound_by_wandb = getattr(getattr(run, "settings", None), "resume_from", None) is not None
        if not (rewound_by_wandb and self.hold.sent is None):  # W&B truncated the run when it started
            self.hold.rewind(step, superseded, here)
        # the heatmap redraws this run's history: the abandoned columns go
        self.history.steps = [s for s in self.history.steps if s <= step]
        for cells in self.history.cells.values():
            for cell in [c for c in cells if c[1] > step]:
                del cells[cell]
        elsewhere = sorted(
            {
                p.get("run_id")
                for e in superseded
                for p in e.get("dashboards") or ()
                if p.get("kind") == "wandb"
            }
            - {h.get("run_id") for h in here}
        )
        gone = [e for e in superseded if e.get("last_step") is not None and int(e["last_step"]) > step]
        if not gone and self.hold.through is None:
            return  # a resume that replaced nothing: nothing to note
        self._rewinds.append(
            {
                "step": int(step),
                "superseded_steps": (
                    [min(int(e["first_step"]) for e in gone), max(int(e["last_step"]) for e in gone)]
                    if gone
                    else []
                ),
                "superseded_runs": [r for r in elsewhere if r],
                "held_back_through": self.hold.through,
                "rewound_by_wandb": rewound_by_wandb,
            }
        )
        run.config.update({"weibull_rewinds": list(self._rewinds)}, allow_val_change=True)
        if any(same_place(p, h) for e in gone for p in e.get("dashboards") or () for h in here) and not (
            rewound_by_wandb
        ):
            logger.warning(
                "WandbSink: run %s continues in place after a rewind to step %d; W&B cannot drop the abandoned "
                'points from the client. Start the resumed run with wandb.init(resume_from="%s?_step=<W&B step of '
                'step %d>") to truncate it, or let it start a new run',
                run.id,
                step,
                run.id,
                step,
            )

    def close(self) -> None:
        # The run belongs to whoever started it (the Trainer's callback, the user): finishing it is theirs.
        self._explicit_run = None


def for_trainer(context: SinkContext) -> WandbSink | None:
    """The sink for ``report_to=["wandb"]``: the active W&B run (None, with a warning, when there is none)."""
    import wandb

    if wandb.run is None:
        logger.warning("report_to has wandb but no W&B run is active: Weibull metrics are not sent to W&B")
        return None
    return WandbSink(
        wandb.run,
        step_metric=context.step_metric,
        heatmap_every=context.heatmap_every,
        alert_wait_s=context.alert_wait_s,
    )


def for_logger(context: SinkContext) -> WandbSink:
    """The sink for a Lightning ``WandbLogger``'s run (alerts, tables, heatmaps)."""
    return WandbSink(
        context.logger.experiment,
        step_metric=context.step_metric,
        heatmap_every=context.heatmap_every,
        alert_wait_s=context.alert_wait_s,
    )
