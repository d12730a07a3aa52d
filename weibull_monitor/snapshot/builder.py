"""One snapshot builder for every caller: the training monitor and the offline scan turn fits into a
:class:`~weibull_monitor.snapshot.record.Snapshot` the same way, so they report the same class medians on the
same weights.

The builder keeps what a run's later snapshots are measured against: λ and k at each matrix's first ok fit (scale
growth, drift from the matrix's own start: initialisations need not be Gaussian) and the T/τ budget of each
optimizer group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from weibull_monitor.estimator import K_GAUSSIAN, WeibullFit
from weibull_monitor.snapshot import dynamics
from weibull_monitor.snapshot.budget import TimescaleBudget
from weibull_monitor.snapshot.logit_bound import LogitBounds
from weibull_monitor.snapshot.record import MatrixEntry, Snapshot

__all__ = ["SnapshotBuilder"]


class SnapshotBuilder:
    """Fits of one step -> a Snapshot with per-matrix dynamics and the dashboard aggregates."""

    def __init__(self) -> None:
        self.scale_first: dict[str, float] = {}
        self.k_first: dict[str, tuple[float, float]] = {}  # key -> (k, k_stderr) at the first ok fit
        self.scale_prev: dict[str, tuple[int, float]] = {}  # key -> (step, λ) at its last snapshot
        self.scale_rate_history: dict[str, tuple[float, int]] = {}  # key -> (largest rate, number of rates)
        self.logit_bounds_first: dict[int, list[float]] = {}  # layer -> per-head bound at its first snapshot
        self.budget = TimescaleBudget()

    def build(
        self,
        step: int,
        entries: Sequence[MatrixEntry],
        fits: Mapping[str, WeibullFit],
        *,
        skipped: Mapping[str, str] | None = None,
        group_of_param: Mapping[str, int | None] | None = None,
        rates: Sequence[tuple[Any, Any]] = (),
        attention_kind: str | None = None,
        expectation: str | None = None,
        logit_bounds: LogitBounds | None = None,
    ) -> Snapshot:
        """The snapshot of ``fits`` (keyed like ``entries``) at ``step``.

        ``group_of_param``: parameter name -> index of the optimizer group holding it (None or absent: not
        optimised); ``rates``: every group's current (η, λ_wd). Without them (a checkpoint scan) η, λ_wd and T/τ
        are undefined. ``logit_bounds``: the weights-only attention-logit bounds of this step (snapshot.logit_bound).
        """
        group_of_param = group_of_param or {}
        group_of = {e.key: group_of_param.get(e.param_name) for e in entries}
        roles = {e.key: e.role for e in entries if e.key in fits}
        for key, fit in fits.items():
            if fit.ok and key not in self.scale_first:
                self.scale_first[key] = float(fit.scale)
            if fit.ok and key not in self.k_first:
                self.k_first[key] = (float(fit.k), float(fit.k_stderr))
        scale_rates = {}
        for key, fit in fits.items():
            if fit.ok:
                scale_rates[key], prev, history = dynamics.scale_rate_update(
                    self.scale_prev.get(key), self.scale_rate_history.get(key), int(step), float(fit.scale)
                )
                if prev is not None:
                    self.scale_prev[key] = prev
                if history[1] > 0:  # kept once there is a rate (no NaN in the JSON state)
                    self.scale_rate_history[key] = history
        fused_parents = {e.param_name for e in entries if e.component is not None}
        matrices = dynamics.matrix_stats(
            fits,
            roles,
            k_anchor=K_GAUSSIAN,
            scale_first=self.scale_first,
            k_first=self.k_first,
            scale_rates=scale_rates,
            group_of=group_of,
            current_rates=list(rates),
            budget=self.budget,
            aggregate_excluded=fused_parents,
        )
        # sharded matrices hold a local slice: each matrix is weighed by its full size
        sizes = {e.key: e.matrix.numel for e in entries if e.component is None}
        t_over_tau = dynamics.representative_budget(sizes, group_of, self.budget)
        bounds = logit_bounds or LogitBounds()
        for layer, values in bounds.bounds.items():
            if layer not in self.logit_bounds_first and all(math.isfinite(v) for v in values):
                self.logit_bounds_first[layer] = list(values)
        return Snapshot(
            logit_bounds={layer: tuple(values) for layer, values in bounds.bounds.items()},
            logit_bounds_first={  # copies: what a sink does to a snapshot never reaches the builder's state
                layer: tuple(self.logit_bounds_first[layer])
                for layer in bounds.bounds
                if layer in self.logit_bounds_first
            },
            logit_bounds_skipped=dict(bounds.skipped),
            attention_qk_norm=bounds.qk_norm,
            step=int(step),
            fits=dict(fits),
            roles=roles,
            aggregates=dynamics.aggregates(fits, roles, matrices, k_anchor=K_GAUSSIAN, T_over_tau=t_over_tau),
            attention_kind=attention_kind,
            T_over_tau=t_over_tau,
            expectation=expectation,
            matrices=matrices,
            skipped=dict(skipped or {}),
        )

    def state_dict(self) -> dict[str, Any]:
        """What later snapshots of the run are measured against, as plain JSON data."""
        return {
            "scale_first": dict(self.scale_first),
            "k_first": {key: list(value) for key, value in self.k_first.items()},
            "scale_prev": {key: list(value) for key, value in self.scale_prev.items()},
            "scale_rate_history": {key: list(value) for key, value in self.scale_rate_history.items()},
            "logit_bounds_first": {str(layer): list(v) for layer, v in self.logit_bounds_first.items()},
            "budget": self.budget.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale_first = {str(k): float(v) for k, v in state["scale_first"].items()}
        # states written before k_first existed start it again at the next fit of each matrix
        self.k_first = {str(k): (float(v[0]), float(v[1])) for k, v in state.get("k_first", {}).items()}
        # states written before these existed start them again at the next snapshot
        self.scale_prev = {str(k): (int(v[0]), float(v[1])) for k, v in state.get("scale_prev", {}).items()}
        self.scale_rate_history = {
            str(k): (float(v[0]), int(v[1])) for k, v in state.get("scale_rate_history", {}).items()
        }
        self.logit_bounds_first = {
            int(layer): [float(x) for x in v] for layer, v in state.get("logit_bounds_first", {}).items()
        }
        self.budget.load_state_dict(state["budget"])
