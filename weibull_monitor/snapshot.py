"""One snapshot of a model: which matrices to read (entries), their fits, and the :class:`Snapshot` record.

``collect_entries`` walks the model once per snapshot: every matrix the role map names, plus the split views
(Q/K/V, gate/up, experts) of fused or stacked parameters. ``compute_fits`` fits them, collectively when
torch.distributed is active (``weibull_monitor.distributed``), locally otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from weibull_monitor.alerts import Alert
    from weibull_monitor.dynamics import MatrixStats
    from weibull_monitor.fit import WeibullFit
    from weibull_monitor.roles import Role

logger = logging.getLogger("weibull_monitor")


@dataclass(frozen=True)
class MatrixEntry:
    """One matrix to fit: a parameter, or a split view of a fused/stacked one (``component`` set)."""

    key: str  # parameter name, or "<name>[q]" for a split view of a fused parameter
    param_name: str  # the parameter it reads
    tensor: torch.Tensor  # the parameter (possibly a DTensor / ZeRO-3 parameter) or a view of it
    role: Role
    component: str | None = None  # the split component of a view, else None


@dataclass
class Snapshot:
    """Everything measured at one optimizer step.

    ``fits``/``roles``/``matrices`` share keys (parameter names and ``"<name>[q]"`` split views);
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
    wall_time: float = field(default_factory=time.time)  # seconds since the epoch
    duration_s: float = 0.0  # time the snapshot took on this rank


def _is_meta(tensor: torch.Tensor) -> bool:
    return getattr(tensor, "device", None) is not None and tensor.device.type == "meta"


def _split(name: str, param: torch.Tensor, config: Any) -> dict[str, torch.Tensor]:
    """Split views without copies and without gathering a sharded parameter."""
    from weibull_monitor import roles as roles_module

    try:
        from weibull_monitor import distributed
    except ImportError:  # the distributed module is optional
        distributed = None
    if distributed is not None and hasattr(distributed, "split_views") and distributed.is_active():
        return distributed.split_views(name, param, config)
    # as_matrix=False: interleaved layouts come back as strided views instead of 2-D copies; a fit only needs
    # the elements, not their arrangement.
    return roles_module.split_fused(name, param, config, as_matrix=False)


def collect_entries(
    model: torch.nn.Module,
    roles: Mapping[str, Role],
    config: Any = None,
    *,
    skipped: dict[str, str] | None = None,
) -> list[MatrixEntry]:
    """Entries for every matrix in ``roles``: the parameter itself (unless it is a 3-D expert stack, which is
    no matrix) and each split view of a fused or stacked parameter. Parameters that cannot be read (meta
    tensors, a split that fails) are recorded in ``skipped`` (key -> reason), never materialised."""
    from weibull_monitor import roles as roles_module

    params = dict(model.named_parameters(remove_duplicate=False))
    entries: list[MatrixEntry] = []
    for name, role in roles.items():
        param = params.get(name)
        if param is None:
            if skipped is not None:
                skipped[name] = "no such parameter in the model"
            continue
        # the parameter itself, not .detach(): a detached ZeRO-3 parameter loses its ds_tensor partition; fits
        # and splits run under no_grad, so nothing joins the autograd graph
        tensor = param
        if _is_meta(tensor):
            if skipped is not None:
                skipped[name] = "meta tensor (not materialised); skipped"
            continue
        if not getattr(role, "stacked", False):
            entries.append(MatrixEntry(name, name, tensor, role))
        components = roles_module.fused_components(role)
        if not components:
            continue
        try:
            with torch.no_grad():
                views = _split(name, tensor, config)
        except Exception as error:  # a layout the role map cannot split: keep the fused fit, record why
            if skipped is not None:
                skipped[roles_module.split_key(name, "*")] = f"split failed: {type(error).__name__}: {error}"
            continue
        for component, view in views.items():
            key = roles_module.split_key(name, component)
            entries.append(
                MatrixEntry(key, name, view, roles_module.view_role(name, role, component), component)
            )
    return entries


def compute_fits(entries: Sequence[MatrixEntry], method: str = "histogram") -> dict[str, WeibullFit]:
    """Fit every entry. Collective (identical on every rank) when ``weibull_monitor.distributed`` is active."""
    try:
        from weibull_monitor import distributed
    except ImportError:
        distributed = None
    with torch.no_grad():  # entries hold the parameters themselves
        if distributed is not None and distributed.is_active():
            return dict(distributed.compute_fits(entries, method))
        from weibull_monitor.fit import fit_many

        return dict(fit_many([(entry.key, entry.tensor) for entry in entries], method=method))
