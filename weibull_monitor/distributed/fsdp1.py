"""FSDP1 (``use_orig_params=True``): tell weibull-monitor which slice of each matrix this rank holds."""

from __future__ import annotations

import torch

from weibull_monitor.distributed.placement import FSDP1_ATTR

__all__ = ["register_fsdp1"]


def register_fsdp1(model: torch.nn.Module) -> int:
    """Record, on each original parameter of an FSDP1 model (``use_orig_params=True``), which flat slice of its
    matrix this rank holds, so that it is read as a shard. Returns how many parameters were registered.

    FSDP1 replaces every original parameter's data by a 1-D view of this rank's slice; nothing on the parameter
    itself says which slice, so this reads FSDP's own bookkeeping (the flat parameter's shard infos) once. Call
    it after wrapping, on every rank. The parameters keep their identity across steps, so once is enough.
    """
    count = 0
    for module in model.modules():
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        params = getattr(flat, "_params", None)
        if flat is None or params is None:  # not FSDP1, or use_orig_params=False (no original parameters)
            continue
        sharded = bool(getattr(handle, "uses_sharded_strategy", True))
        for param, shape, info in zip(params, flat._shapes, flat._shard_param_infos):
            if info.in_shard:
                start, stop = int(info.intra_param_start_idx), int(info.intra_param_end_idx) + 1
            else:
                start = stop = 0
            setattr(param, FSDP1_ATTR, (torch.Size(shape), start, stop, sharded))
            count += 1
    return count
