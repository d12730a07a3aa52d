"""What every checkpoint format provides, and the registry of formats by file name ending.

A format is one :class:`CheckpointFormat` registration: the endings it reads and a function that opens one file
as a :class:`Source` (metadata up front, tensors one at a time). Adding a format is one module with its source and
one :func:`register_format` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointFormat",
    "LoaderError",
    "Source",
    "TensorInfo",
    "UnsafeCheckpointError",
    "format_for",
    "formats",
    "register_format",
]


class LoaderError(ValueError):
    """A path that cannot be read as a checkpoint (the message says why and what to do)."""


class UnsafeCheckpointError(LoaderError):
    """A checkpoint that can only be loaded by running pickle code; refused, never unpickled."""


@dataclass(frozen=True)
class TensorInfo:
    """What is known about one stored tensor before its data is read.

    ``name`` is the name in the file; ``role_name`` is the name the role map should see (the same, except for formats
    such as GGUF whose names are translated to Hugging Face names). ``skip_reason`` is set for tensors that cannot be
    read at all (meta or offloaded tensors, missing shards, non-numeric dtypes).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    role_name: str
    skip_reason: str | None = None

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPE_NAMES

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


FLOAT_DTYPE_NAMES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


class Source:
    """One weights file: metadata up front, tensors one at a time. ``config`` is a model config the file itself
    carries (GGUF metadata), else None."""

    config: dict[str, Any] | None = None
    step: int | None = None

    def infos(self) -> list[TensorInfo]:
        raise NotImplementedError

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        raise NotImplementedError


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint format: its name (as ``scan`` reports it), the file name endings it reads (lower case) and
    ``open(path) -> Source``."""

    name: str
    suffixes: tuple[str, ...]
    open: Callable[[Path], Source]


_FORMATS: list[CheckpointFormat] = []


def register_format(fmt: CheckpointFormat) -> None:
    """Read files ending in ``fmt.suffixes`` with ``fmt.open`` (a later registration for an ending wins)."""
    _FORMATS[:] = [known for known in _FORMATS if known.name != fmt.name]
    _FORMATS.insert(0, fmt)


def formats() -> tuple[CheckpointFormat, ...]:
    """The registered formats, the most recently registered first."""
    return tuple(_FORMATS)


def format_for(path: Path) -> CheckpointFormat | None:
    """The format that reads ``path`` (by its name's ending), or None."""
    name = path.name.lower()
    return next((fmt for fmt in _FORMATS if name.endswith(fmt.suffixes)), None)
