"""Which matrices a snapshot reads: every matrix the role map names, plus the split parts (Q/K/V, gate/up, experts)
of fused or stacked parameters, as :class:`~weibull_monitor.snapshot.record.MatrixEntry` records.

Parts are strided views (never copies: a fit needs the elements, not their arrangement); the parts of a sharded
parameter are views of its local shard, never a gather (:class:`~weibull_monitor.distributed.Matrix`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from weibull_monitor.distributed import Matrix, matrix_of
from weibull_monitor.models import Role, split_fused, split_key, view_role
from weibull_monitor.snapshot.record import MatrixEntry

__all__ = ["collect_entries", "entries_for"]


def entries_for(
    name: str, matrix: Matrix, role: Role, config: Any = None, *, skipped: dict[str, str] | None = None
) -> list[MatrixEntry]:
    """The entries of one parameter: itself (unless it is a 3-D expert stack, which is no matrix) and each split
    part of a fused or stacked one. A split that fails is recorded in ``skipped`` under ``"<name>[*]"``; the whole
    parameter is still fitted."""
    entries = [] if role.stacked else [MatrixEntry(name, name, matrix, role)]
    if not role.parts:
        return entries

    def layout(tensor: torch.Tensor) -> Mapping[str, torch.Tensor]:
        return split_fused(name, tensor, config, role=role, as_matrix=False)

    try:
        with torch.no_grad():
            parts = matrix.split(layout)
    except (
        Exception
    ) as error:  # a layout nobody registered, or a config that lacks what it needs: keep it whole
        if skipped is not None:
            skipped[split_key(name, "*")] = f"split failed: {type(error).__name__}: {error}"
        return entries
    for component, part in parts.items():
        key = split_key(name, component)
        entries.append(MatrixEntry(key, name, part, view_role(name, role, component), component))
    return entries


def collect_entries(
    model: torch.nn.Module,
    roles: Mapping[str, Role],
    config: Any = None,
    *,
    skipped: dict[str, str] | None = None,
) -> list[MatrixEntry]:
    """Entries for every matrix in ``roles``. Parameters that cannot be read (meta tensors) are recorded in
    ``skipped`` (key -> reason), never materialised."""
    params = dict(model.named_parameters(remove_duplicate=False))
    entries: list[MatrixEntry] = []
    for name, role in roles.items():
        param = params.get(name)
        if param is None:
            _skip(skipped, name, "no such parameter in the model")
            continue
        if param.device.type == "meta":
            _skip(skipped, name, "meta tensor (not materialised); skipped")
            continue
        entries += entries_for(name, matrix_of(param), role, config, skipped=skipped)
    return entries


def _skip(skipped: dict[str, str] | None, key: str, reason: str) -> None:
    if skipped is not None:
        skipped[key] = reason
