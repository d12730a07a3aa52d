"""What a report reads from a run store, once per run."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ReportError", "RunData", "load_run"]


class ReportError(ValueError):
    """The store holds nothing to draw (no such run, no snapshots yet)."""


class RunData:
    """Everything the figures of one run need, read once from the store."""

    def __init__(
        self,
        run: dict[str, Any],
        snapshots: list[dict],
        fits: list[dict],
        aggregates: list[dict],
        alerts,
        rewinds: list[dict] | None = None,
        abandoned: dict[int, list[dict]] | None = None,
    ):
        self.run = run
        self.run_id = int(run["run_id"])
        self.name = str(run["name"])
        self.snapshots = snapshots
        self.steps = [int(s["step"]) for s in snapshots]
        self.fits = [f for f in fits if f.get("ok")]
        self.all_fits = fits
        self.alerts = alerts
        self.metrics: dict[str, dict[int, float]] = {}
        for row in aggregates:
            if row["value"] is not None:
                self.metrics.setdefault(row["metric"], {})[int(row["step"])] = float(row["value"])
        kinds = [s.get("attention_kind") for s in snapshots if s.get("attention_kind")]
        self.attention_kind = kinds[-1] if kinds else run.get("attention_kind")
        self.t_over_tau = {
            int(s["step"]): s["T_over_tau"] for s in snapshots if s.get("T_over_tau") is not None
        }
        # rewinds that replaced part of the timeline (their step, time, the steps they superseded), and per
        # abandoned branch its aggregates from the rewind step on (drawn faintly beside the live series)
        self.rewinds = list(rewinds or [])
        self.abandoned: dict[int, dict[str, dict[int, float]]] = {}
        for branch, rows in (abandoned or {}).items():
            series = self.abandoned.setdefault(branch, {})
            for row in rows:
                if row["value"] is not None:
                    series.setdefault(row["metric"], {})[int(row["step"])] = float(row["value"])

    @property
    def single(self) -> bool:
        return len(self.steps) <= 1

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        values = self.metrics.get(metric, {})
        steps = [s for s in self.steps if s in values and math.isfinite(values[s])]
        return steps, [values[s] for s in steps]

    @property
    def slug(self) -> str:
        return f"run{self.run_id}"

    @property
    def title(self) -> str:
        """The run name, shortened from the left for figure titles (scan runs are named by their full path)."""
        return self.name if len(self.name) <= 48 else "…" + self.name[-47:]


def load_run(store: Any, run: dict[str, Any], *, branches: bool = True) -> RunData:
    """One run's live timeline; with ``branches``, also its rewinds and the abandoned branches' aggregates."""
    run_id = run["run_id"]
    rewinds = store.rewinds(run_id) if hasattr(store, "rewinds") else []
    abandoned: dict[int, list[dict]] = {}
    if branches and rewinds:
        for row in store.aggregates(run_id, branch="all"):
            if row.get("superseded_by") is not None:
                abandoned.setdefault(int(row["branch"]), []).append(row)
        for branch, rows in abandoned.items():  # each starts at the live point it forked from
            start = min(int(r["rewind_step"]) for r in rows)
            rows += [r for r in store.aggregates(run_id, step=start) if r["value"] is not None]
            abandoned[branch] = rows
    return RunData(
        run,
        store.snapshots(run_id),
        store.fits(run_id=run_id),
        store.aggregates(run_id=run_id),
        store.alerts(run_id),
        rewinds,
        abandoned,
    )
