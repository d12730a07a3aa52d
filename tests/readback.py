"""Reading back what a run wrote, for tests: TensorBoard event folders and a store's live (or branch) series."""

from __future__ import annotations

from typing import Any

from weibull_monitor.store import RunStore


def tensorboard_events(directory: str) -> Any:
    """An ``EventAccumulator`` over ``directory`` with every scalar and tensor kept (no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def stored_series(store: RunStore, run: int, branch: int | None = None) -> dict[int, tuple[dict, dict]]:
    """Per stored step: (aggregate metric -> value, matrix name -> k) of ``run``'s live timeline, or of ``branch``."""
    aggregates: dict[int, dict] = {}
    for row in store.aggregates(run, branch=branch):
        if row["value"] is not None:
            aggregates.setdefault(row["step"], {})[row["metric"]] = row["value"]
    ks: dict[int, dict] = {}
    for row in store.fits(run_id=run, branch=branch):
        ks.setdefault(row["step"], {})[row["name"]] = row["k"]
    return {step: (aggregates[step], ks[step]) for step in store.steps(run, branch=branch)}
