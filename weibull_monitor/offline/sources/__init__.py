"""Checkpoint formats: safetensors, PyTorch / Lightning files (weights only, never pickle code) and GGUF, each a
:class:`~weibull_monitor.offline.sources.base.Source` registered by the endings it reads."""

from weibull_monitor.offline.sources import gguf, safetensors, torch_file
from weibull_monitor.offline.sources.base import (
    CheckpointFormat,
    LoaderError,
    Source,
    TensorInfo,
    UnsafeCheckpointError,
    format_for,
    formats,
    register_format,
)

__all__ = [
    "CheckpointFormat",
    "LoaderError",
    "Source",
    "TensorInfo",
    "UnsafeCheckpointError",
    "format_for",
    "formats",
    "gguf",
    "register_format",
    "safetensors",
    "torch_file",
]
