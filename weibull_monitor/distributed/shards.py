"""Which elements of a matrix this rank holds, as plain local tensor views (no collective, no gather).

The distributed collector (``weibull_monitor.distributed``) asks one question per matrix: "which local tensors, taken
together, are exactly my share of this matrix's elements?". Histogram counts add, so if every element of the matrix
sits in exactly one rank's share, an all-reduce SUM of the per-rank counts equals the counts of the full matrix.

Layouts understood here:

- ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel): the local shard ``to_local()``; a shard replicated over a
  mesh dimension counts only on coordinate 0 of that dimension, so replicas are not counted twice.
- FSDP1 (``use_orig_params=True``) original parameters registered by ``distributed.register_fsdp1``: each is a
  1-D view of this rank's slice ``[start, stop)`` of its flattened matrix (FSDP's padding lies outside it).
- DeepSpeed ZeRO-3 parameters: the flat partition ``ds_tensor`` (rank ``r`` of the parameter's ``ds_process_group``
  holds flat elements ``[r * p, (r + 1) * p)`` of the row-major flattened matrix, ``p = ds_tensor.ds_numel``, the last
  partition padded past ``ds_numel``); the padding is cut off. ``GatheredParameters`` is never used.
- Split views of such a sharded parameter (fused QKV): described by a *meta* view of the parent's global shape
  (a :class:`~weibull_monitor.distributed.matrix.ShardedView`), i.e. a shape, strides and offset over the row-major parent. When that view
  is a product of a row set and a column set (every fused split is: blocks of rows, per-head interleaved rows, or
  blocks of columns), the rows and columns falling into the local shard are found from index vectors of length
  ``rows`` and ``cols``, and the share is a list of slices of the local shard: nothing of matrix size is allocated.

Everything else (plain tensors) is replicated and assigned to one owner rank by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weibull_monitor.distributed.placement import (
    fsdp1_slice,
    global_shape,
    is_dtensor,
    is_fsdp1_shard,
    is_zero3,
)

# Skip codes: agreed across ranks with a MAX all-reduce, so every rank reports the same reason.
SKIP_NONE = 0
SKIP_PARTIAL = 1
SKIP_OFFLOADED = 2
SKIP_LAYOUT = 3
SKIP_UNREADABLE = 4
SKIP_DTYPE = 5
SKIP_GROUP = 6
SKIP_FAILED = 7
SKIP_REASONS = {
    SKIP_PARTIAL: "sharded tensor holds partial sums (Partial placement): its values are not weights yet",
    SKIP_OFFLOADED: "ZeRO-3 partition is not in memory (NVMe offload): not read to avoid swapping it in",
    SKIP_LAYOUT: "split view of a sharded parameter whose layout is not a row set x column set: skipped, never gathered",
    SKIP_UNREADABLE: "sharded tensor of an unknown kind: skipped, never gathered",
    SKIP_DTYPE: "not a real floating-point dtype (integer, quantized or complex weights): dequantize first",
    SKIP_GROUP: "ZeRO-3 partition group smaller than the world (MiCS / hpZ replicas): not supported yet",
    SKIP_FAILED: "could not be read or counted on some rank (its log says why): skipped on every rank",
}


@dataclass(frozen=True)
class Box:
    """A rectangular piece of a 2-D global matrix held locally: global rows [r0, r1) x cols [c0, c1) as ``local``."""

    r0: int
    r1: int
    c0: int
    c1: int
    local: torch.Tensor  # 2-D, shape [r1 - r0, c1 - c0]


class Skip(Exception):
    """This rank cannot read its share of a matrix; ``code`` is one of the ``SKIP_*`` constants."""

    def __init__(self, code: int):
        super().__init__(SKIP_REASONS.get(code, "skipped"))
        self.code = code


# --- whole matrices ---------------------------------------------------------------------------------------------


def _dtensor_counts_here(dt: torch.Tensor) -> bool:
    """A DTensor's local shard counts on this rank unless it is a replica (coordinate != 0 on a Replicate dim)."""
    from torch.distributed.tensor import Replicate, Shard

    coordinate = dt.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh
        return False
    for dim, placement in enumerate(dt.placements):
        if isinstance(placement, Replicate):
            if coordinate[dim] != 0:
                return False
        elif not isinstance(placement, Shard):
            raise Skip(SKIP_PARTIAL)
    return True


def _zero3_partition(param: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(global flat start, valid local flat elements) of a ZeRO-3 parameter's partition on this rank."""
    import torch.distributed as dist

    part = param.ds_tensor
    location = getattr(part, "final_location", None)
    if location is not None and "nvme" in str(location).lower():
        raise Skip(SKIP_OFFLOADED)
    group = getattr(param, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    if dist.is_initialized() and dist.get_world_size(group=group) != dist.get_world_size():
        raise Skip(SKIP_GROUP)  # partitions repeat across groups: a world-wide sum would count them twice
    size = int(getattr(part, "ds_numel", part.numel()))
    start = rank * size
    valid = max(0, min(size, int(param.ds_numel) - start))
    return start, part.detach().reshape(-1).narrow(0, 0, valid)


def local_share(tensor: torch.Tensor) -> list[torch.Tensor]:
    """This rank's share of a sharded matrix's elements (views; empty list when it holds none).

    Raises :class:`Skip` for layouts that cannot be read without gathering.
    """
    if is_dtensor(tensor):
        if not _dtensor_counts_here(tensor):
            return []
        local = tensor.to_local().detach()
        return [local] if local.numel() else []
    if is_zero3(tensor):
        _, flat = _zero3_partition(tensor)
        return [flat] if flat.numel() else []
    if is_fsdp1_shard(tensor):
        _, flat = _fsdp1_flat(tensor)
        return [flat] if flat.numel() else []
    raise Skip(SKIP_UNREADABLE)


def _fsdp1_flat(param: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(global flat start, local flat elements) of an FSDP1 original parameter's slice on this rank."""
    _, start, stop, _ = fsdp1_slice(param)
    flat = param.detach().reshape(-1)
    if flat.numel() != stop - start:
        raise Skip(
            SKIP_UNREADABLE
        )  # unsharded right now (inside forward/backward): never read a gathered view
    return start, flat


# --- boxes of the local shard in global coordinates --------------------------------------------------------------


def _as_rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """A matrix or stack seen as row-major rows x cols (leading dimensions folded into rows)."""
    if len(shape) < 2:
        raise Skip(SKIP_LAYOUT)
    return math.prod(int(s) for s in shape[:-1]), int(shape[-1])


def _dtensor_box(dt: torch.Tensor) -> list[Box]:
    from torch.distributed.tensor import Shard

    if not _dtensor_counts_here(dt):
        return []
    ndim = dt.dim()
    for placement in dt.placements:
        if _is_replicate(placement):
            continue
        # _StridedShard (FSDP2 over TP) or a shard of a middle dimension of a stack is not one box of rows x cols.
        if type(placement) is not Shard or placement.dim not in (0, ndim - 1):
            raise Skip(SKIP_LAYOUT)
    local = dt.to_local().detach()
    offset = _dtensor_offset(dt)
    if offset is None or local.dim() != ndim or ndim < 2:
        raise Skip(SKIP_LAYOUT)
    inner = math.prod(int(s) for s in dt.shape[1:-1])  # rows per index of dim 0
    r0, c0 = offset[0] * inner, offset[-1]
    local2d = local.reshape(-1, local.shape[-1]) if ndim > 2 else local
    if local2d.numel() == 0:
        return []
    return [Box(r0, r0 + local2d.shape[0], c0, c0 + local2d.shape[1], local2d)]


def _is_replicate(placement: object) -> bool:
    from torch.distributed.tensor import Replicate

    return isinstance(placement, Replicate)


def _dtensor_offset(dt: torch.Tensor) -> tuple[int, ...] | None:
    """Global offset of the local shard (torch's own helper; a 1-D mesh fallback mirrors ``torch.chunk``)."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
        return tuple(int(o) for o in offset)
    except ImportError:  # pragma: no cover - older or newer torch without the private helper
        if dt.device_mesh.ndim != 1:
            return None
        placement = dt.placements[0]
        offset = [0] * dt.dim()
        if not _is_replicate(placement):
            n, world = dt.shape[placement.dim], dt.device_mesh.size()
            chunk = -(-n // world)
            offset[placement.dim] = min(n, chunk * dt.device_mesh.get_coordinate()[0])
        return tuple(offset)


def flat_boxes(param: torch.Tensor, start: int, flat: torch.Tensor) -> list[Box]:
    """A flat slice [start, start + len) of the row-major matrix cut into at most three boxes: a partial first
    row, whole rows, a partial last row (ZeRO-3 partitions, FSDP1 flat shards)."""
    _, cols = _as_rows_cols(global_shape(param))
    end = start + flat.numel()
    boxes: list[Box] = []
    pos = start
    while pos < end:
        row, col = divmod(pos, cols)
        if col or end - pos < cols:  # partial row
            stop = min(end, (row + 1) * cols)
            piece = flat[pos - start : stop - start].view(1, -1)
            boxes.append(Box(row, row + 1, col, col + (stop - pos), piece))
            pos = stop
        else:  # as many whole rows as fit
            n_rows = (end - pos) // cols
            piece = flat[pos - start : pos - start + n_rows * cols].view(n_rows, cols)
            boxes.append(Box(row, row + n_rows, 0, cols, piece))
            pos += n_rows * cols
    return boxes


def local_boxes(parent: torch.Tensor) -> list[Box]:
    """This rank's share of a sharded 2-D parent as boxes in global coordinates (disjoint across ranks)."""
    if is_dtensor(parent):
        return _dtensor_box(parent)
    if is_zero3(parent):
        return flat_boxes(parent, *_zero3_partition(parent))
    if is_fsdp1_shard(parent):
        return flat_boxes(parent, *_fsdp1_flat(parent))
    raise Skip(SKIP_UNREADABLE)


# --- split views: which global rows and columns a view takes ----------------------------------------------------


def view_rows_cols(view: torch.Tensor, parent_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Global row and column indices of a strided view over a row-major ``parent_shape`` matrix (or stack).

    ``view`` (any device, typically ``meta``) must be a product set: each of its dimensions moves either whole rows
    (stride a multiple of the row length) or columns within one row. Returns two sorted int64 vectors (sizes at
    most rows and cols). Raises :class:`Skip` (``SKIP_LAYOUT``) otherwise.
    """
    rows, cols = _as_rows_cols(parent_shape)
    row0, col0 = divmod(int(view.storage_offset()), cols)
    row_idx = torch.tensor([row0], dtype=torch.int64)
    col_idx = torch.tensor([col0], dtype=torch.int64)
    col_reach = col0
    for size, stride in zip(view.shape, view.stride()):
        if size == 1:
            continue
        steps = torch.arange(size, dtype=torch.int64)
        if stride % cols == 0 and stride > 0:
            row_idx = (row_idx[:, None] + steps[None, :] * (stride // cols)).reshape(-1)
        elif stride > 0 and col_reach + (size - 1) * stride < cols:
            col_idx = (col_idx[:, None] + steps[None, :] * stride).reshape(-1)
            col_reach += (size - 1) * stride
        else:
            raise Skip(SKIP_LAYOUT)
    row_idx, _ = torch.sort(row_idx)
    col_idx, _ = torch.sort(col_idx)
    if row_idx[-1] >= rows or col_idx[-1] >= cols:
        raise Skip(SKIP_LAYOUT)
    if (
        row_idx.numel() * col_idx.numel() != view.numel()
    ):  # overlapping strides: not one element per index pair
        raise Skip(SKIP_LAYOUT)
    if torch.unique(row_idx).numel() != row_idx.numel() or torch.unique(col_idx).numel() != col_idx.numel():
        raise Skip(SKIP_LAYOUT)
    return row_idx, col_idx


def runs(sorted_idx: torch.Tensor, lo: int, hi: int) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive indices in ``sorted_idx`` that lie inside [lo, hi)."""
    inside = sorted_idx[(sorted_idx >= lo) & (sorted_idx < hi)]
    if inside.numel() == 0:
        return []
    breaks = torch.nonzero(inside[1:] != inside[:-1] + 1).reshape(-1) + 1
    starts = torch.cat([inside[:1], inside[breaks]]).tolist()
    ends = torch.cat([inside[breaks - 1] + 1, inside[-1:] + 1]).tolist()
    return list(zip(starts, ends))


def split_share(view: torch.Tensor, parent: torch.Tensor) -> list[torch.Tensor]:
    """This rank's share of a split view (``view`` over the global shape of the sharded ``parent``): slices only."""
    row_idx, col_idx = view_rows_cols(view, global_shape(parent))
    pieces: list[torch.Tensor] = []
    for box in local_boxes(parent):
        row_runs = runs(row_idx, box.r0, box.r1)
        col_runs = runs(col_idx, box.c0, box.c1)
        for a, b in row_runs:
            for c, d in col_runs:
                pieces.append(box.local[a - box.r0 : b - box.r0, c - box.c0 : d - box.c0])
    return pieces
