"""The records of one snapshot: :class:`MatrixEntry` (what is read) and :class:`Snapshot` (what was measured)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from weibull_monitor.distributed import Matrix
from weibull_monitor.estimator import WeibullFit
from weibull_monitor.models import Role

if TYPE_CHECKING:  # alerts sit above this package; a snapshot only carries them
    from weibull_monitor.alerts import Alert
    from weibull_monitor.snapshot.dynamics import MatrixStats

__all__ = ["MatrixEntry", "Snapshot"]


@dataclass(frozen=True)
class MatrixEntry:
    """One matrix to fit: a parameter, or a split part of a fused or stacked one (``component`` set)."""

    key: str  # parameter name, or "<name>[q]" for a split part of a fused parameter
    param_name: str  # the parameter it reads
    matrix: Matrix  # where its elements are (local, sharded, or a part of a sharded parameter)
    role: Role
    component: str | None = None  # the split component of a part, else None


@dataclass
class Snapshot:
    """Everything measured at one optimizer step.

    ``fits``/``roles``/``matrices`` share keys (parameter names and ``"<name>[q]"`` split parts);
    ``aggregates`` holds the dashboard metrics (``weibull/...``; undefined ones absent, never inf);
    ``skipped`` names the matrices that could not be read, with the reason.
    """

    step: int
    fits: dict[str, WeibullFit]
    roles: dict[str, Role]
    aggregates: dict[str, float]
    alerts: list[Alert] = field(default_factory=list)
    attention_kind: str | None = None
    T_over_tau: float | None = None
    expectation: str | None = None  # Selection expectation for the attention kind: deep | mild | transitional
    matrices: dict[str, MatrixStats] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)  # keys fitted once and reused: frozen and not adapted
    adapted: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> adapters in its effective weight
    adapter_fits: dict[str, WeibullFit] = field(default_factory=dict)  # LoRA factor -> fit (in no class)
    wall_time: float = field(default_factory=time.time)  # seconds since the epoch
    duration_s: float = 0.0  # time the snapshot took on this rank
    # weights-only attention-logit bounds (snapshot/logit_bound.py): layer -> one value per query head, now and at
    # the layer's first snapshot; layers without a bound, with the reason; whether the attention has qk-norm
    logit_bounds: dict[int, tuple[float, ...]] = field(default_factory=dict)
    logit_bounds_first: dict[int, tuple[float, ...]] = field(default_factory=dict)
    logit_bounds_skipped: dict[int, str] = field(default_factory=dict)
    attention_qk_norm: bool | None = None
