"""Snapshots under torch.distributed (DDP, FSDP2 / tensor parallel DTensors, FSDP1, DeepSpeed ZeRO-3), no gather.

Pipeline inside: ``placement`` (what kind of tensor a parameter is, its global shape) -> ``shards`` (which local
tensors hold this rank's share of a matrix) -> ``matrix`` (the types a snapshot reads: local, sharded, a view of a
sharded fused parameter) -> ``collective`` (:func:`fit_matrices`, :func:`agree`). docs/distributed.md.
"""

from weibull_monitor.distributed.collective import agree, fit_matrices, is_active
from weibull_monitor.distributed.fsdp1 import register_fsdp1
from weibull_monitor.distributed.matrix import LocalMatrix, Matrix, ShardedMatrix, ShardedView, matrix_of
from weibull_monitor.distributed.placement import global_shape, is_sharded

__all__ = [
    "LocalMatrix",
    "Matrix",
    "ShardedMatrix",
    "ShardedView",
    "agree",
    "fit_matrices",
    "global_shape",
    "is_active",
    "is_sharded",
    "matrix_of",
    "register_fsdp1",
]
