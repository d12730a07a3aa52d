"""Checkpoint formats: safetensors, PyTorch / Lightning files (weights only, never pickle code) and GGUF, each a
:class:`~weibull_monitor.offline.sources.base.Source` registered by the endings it reads."""

from weibull_monitor.offline.sources import gguf, safetensors, torch_file
from weibull_monitor.offline.sources.base import (
    MAX_JSON_BYTES,
    MAX_NESTING,
    MAX_TENSORS,
    CheckpointFormat,
    LoaderError,
    Source,
    TensorInfo,
    UnsafeCheckpointError,
    format_for,
    formats,
    parse_json,
    read_json,
    register_format,
    regular_file,
)

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_NESTING",
    "MAX_TENSORS",
    "CheckpointFormat",
    "LoaderError",
    "Source",
    "TensorInfo",
    "UnsafeCheckpointError",
    "format_for",
    "formats",
    "gguf",
    "parse_json",
    "read_json",
    "register_format",
    "regular_file",
    "safetensors",
    "torch_file",
]
