"""What kind of tensor a parameter is under torch.distributed, and its full shape: no collective, no gather.

A sharded parameter (DTensor from FSDP2 or tensor parallel, a DeepSpeed ZeRO-3 partitioned parameter, an FSDP1
original parameter registered by :func:`weibull_monitor.distributed.register_fsdp1`) holds only this rank's slice:
its ``.shape`` may be the local slice (ZeRO-3: ``[0]``), so shapes are always taken from :func:`global_shape`.
"""

from __future__ import annotations

import torch

__all__ = [
    "FSDP1_ATTR",
    "fsdp1_slice",
    "global_shape",
    "is_dtensor",
    "is_fsdp1_shard",
    "is_sharded",
    "is_zero3",
    "storage_dtype",
]


def is_dtensor(tensor: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (imported lazily: plain installs never touch it)."""
    if not isinstance(tensor, torch.Tensor) or type(tensor) is torch.Tensor:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def is_zero3(tensor: object) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (it carries ``ds_tensor`` and ``ds_numel``)."""
    return getattr(tensor, "ds_tensor", None) is not None and hasattr(tensor, "ds_numel")


FSDP1_ATTR = "_weibull_fsdp1"
"""Set by ``distributed.register_fsdp1`` on FSDP1 (use_orig_params=True) parameters: (shape, start, stop, sharded)."""


def fsdp1_slice(tensor: object) -> tuple[torch.Size, int, int, bool] | None:
    return getattr(tensor, FSDP1_ATTR, None)


def is_fsdp1_shard(tensor: object) -> bool:
    """True for a registered FSDP1 original parameter whose data is this rank's flat slice of it."""
    tag = fsdp1_slice(tensor)
    return tag is not None and tag[3]


def is_sharded(tensor: object) -> bool:
    """True when the tensor's elements are spread over ranks (DTensor, ZeRO-3 partition, registered FSDP1 shard)."""
    return is_dtensor(tensor) or is_zero3(tensor) or is_fsdp1_shard(tensor)


def global_shape(tensor: torch.Tensor) -> torch.Size:
    """The full (unsharded) shape: ``ds_shape`` for ZeRO-3 and the recorded shape for FSDP1 (their ``.shape`` is
    the local flat slice), else ``.shape``."""
    if is_zero3(tensor):
        return torch.Size(tensor.ds_shape)
    tag = fsdp1_slice(tensor)
    if tag is not None:
        return torch.Size(tag[0])
    return tensor.shape


def storage_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype of the stored elements: a ZeRO-3 parameter's own dtype may differ from its partition's."""
    part = getattr(tensor, "ds_tensor", None)
    return part.dtype if part is not None else tensor.dtype
