"""What a snapshot reads: a matrix as a type that knows where its elements are.

Three kinds, one interface (``shape``, ``dtype``, :meth:`Matrix.split`, :meth:`Matrix.local_pieces`):

- :class:`LocalMatrix`: a plain tensor (or a view of one), whole on every rank that has it (DDP replicas, a
  single process);
- :class:`ShardedMatrix`: a sharded parameter (DTensor, ZeRO-3 partition, registered FSDP1 slice). It holds the
  parameter itself: ``.detach()`` would drop ZeRO-3's partition attributes, and slicing a DTensor would gather it;
- :class:`ShardedView`: one part of a sharded fused parameter (Q of a QKV), described by a *meta* view over the
  parent's global shape, read from the local shard only.

These types carry the rules that code running under torch.distributed must follow (never detach a sharded
parameter, take shapes from the global shape, split without gathering), so callers cannot break them by accident.
:func:`matrix_of` picks the type for a parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from weibull_monitor.distributed import shards
from weibull_monitor.distributed.placement import global_shape, is_sharded, storage_dtype

__all__ = ["LocalMatrix", "Matrix", "ShardedMatrix", "ShardedView", "matrix_of"]

#: A function that splits a fused matrix into named parts: views of the tensor it is given (a real tensor or a
#: meta proxy of the global shape), in nn.Linear orientation.
Layout = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


class Matrix:
    """Base of the three kinds. ``shape`` is always the full (global) shape."""

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def numel(self) -> int:
        return int(self.shape.numel())

    def split(self, layout: Layout) -> dict[str, Matrix]:
        """The parts ``layout`` cuts this matrix into, without copying or gathering anything."""
        raise NotImplementedError

    def local_pieces(self, owner: int, rank: int) -> list[torch.Tensor]:
        """The tensors on this rank that, taken together over all ranks, hold each element exactly once.

        ``owner`` is the rank that reads a replicated matrix. Raises :class:`shards.Skip` where the share cannot
        be read without a gather.
        """
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class LocalMatrix(Matrix):
    """A plain tensor (a parameter, or a strided view of one), replicated wherever it exists."""

    tensor: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def split(self, layout: Layout) -> dict[str, Matrix]:
        return {part: LocalMatrix(view) for part, view in layout(self.tensor).items()}

    def local_pieces(self, owner: int, rank: int) -> list[torch.Tensor]:
        data = self.tensor.detach()
        return [data] if owner == rank and data.numel() else []


@dataclass(frozen=True, eq=False)
class ShardedMatrix(Matrix):
    """A parameter whose elements are spread over ranks; ``param`` is the parameter itself, never detached."""

    param: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return global_shape(self.param)

    @property
    def dtype(self) -> torch.dtype:
        return storage_dtype(self.param)

    def split(self, layout: Layout) -> dict[str, Matrix]:
        # The layout is applied to a meta tensor of the global shape: the views hold no data, only which elements
        # each part takes (shape, strides, offset), and the local shard is read through them.
        proxy = torch.empty(self.shape, dtype=self.dtype, device="meta")
        parts: dict[str, Matrix] = {}
        for part, view in layout(proxy).items():
            # a copy (not a view of the proxy) has lost the geometry that says which elements it holds
            parts[part] = ShardedView(self.param, view, view._base is proxy or view is proxy)
        return parts

    def local_pieces(self, owner: int, rank: int) -> list[torch.Tensor]:
        return shards.local_share(self.param)


@dataclass(frozen=True, eq=False)
class ShardedView(Matrix):
    """One part of a sharded fused parameter: ``view`` is a meta view over ``parent``'s global shape."""

    parent: torch.Tensor
    view: torch.Tensor
    layout_ok: bool = True

    @property
    def shape(self) -> torch.Size:
        return self.view.shape

    @property
    def dtype(self) -> torch.dtype:
        return storage_dtype(self.parent)

    def split(self, layout: Layout) -> dict[str, Matrix]:
        raise ValueError("a part of a fused parameter is not split again")

    def local_pieces(self, owner: int, rank: int) -> list[torch.Tensor]:
        if not self.layout_ok:
            raise shards.Skip(shards.SKIP_LAYOUT)
        return shards.split_share(self.view, self.parent)


def matrix_of(param: torch.Tensor) -> Matrix:
    """The matrix type of a parameter: sharded (DTensor, ZeRO-3, registered FSDP1) or local."""
    return ShardedMatrix(param) if is_sharded(param) else LocalMatrix(param)
