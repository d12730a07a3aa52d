"""What every checkpoint format provides, and the registry of formats by file name ending.

A format is one :class:`CheckpointFormat` registration: the endings it reads and a function that opens one file
as a :class:`Source` (metadata up front, tensors one at a time). Adding a format is one module with its source and
one :func:`register_format` call.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    "parse_json",
    "read_json",
    "register_format",
    "regular_file",
]

#: Budgets that keep a small hostile file from costing minutes or gigabytes: tensors per checkpoint (a scan fits
#: ~100,000 small matrices in seconds), container nesting in a PyTorch file, and the size of a JSON side file
#: (index, config, trainer state).
MAX_TENSORS = 1_000_000
MAX_NESTING = 64
MAX_JSON_BYTES = 64 * 1024 * 1024


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
        """A real floating-point dtype torch knows (every float8 variant included)."""
        return self.dtype in FLOAT_DTYPE_NAMES

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


#: Names of every real floating-point dtype of this torch (fp64 ... bf16 and every float8 variant, fnuz included;
#: not the packed float4 pairs, which hold two values per element).
FLOAT_DTYPE_NAMES = frozenset(
    name
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype)
    and getattr(torch, name).is_floating_point
    and "float4" not in name
)


def regular_file(path: Path) -> None:
    """LoaderError unless ``path`` (symlinks followed) is a regular file: a FIFO would block ``open`` forever, a
    device never end, a directory fail deep inside a loader."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise LoaderError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise LoaderError(f"{path}: is {kind}, not a regular file; only regular files are read")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {duplicate!r}")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses what strict parsers refuse (duplicate keys, NaN/Infinity) and turns every way a
    document can be malformed (too deep, a number too long) into ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from None


def read_json(path: Path, what: str) -> Any:
    """The JSON document in a regular file of at most MAX_JSON_BYTES; LoaderError saying ``what`` it should be."""
    regular_file(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise LoaderError(f"{path}: {size} bytes is too large for {what} (limit {MAX_JSON_BYTES})")
    try:
        return parse_json(path.read_bytes())
    except ValueError as exc:
        raise LoaderError(f"{path}: not valid JSON for {what} ({exc})") from None
    except OSError as exc:
        raise LoaderError(f"{path}: cannot be read ({exc.strerror or exc})") from None


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
