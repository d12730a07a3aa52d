"""The safetensors format, parsed and mapped here (no pickle, no copy: tensors are views of a private file map)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from weibull_monitor.offline.memory import drop_pages, register_map, unregister_map
from weibull_monitor.offline.sources.base import (
    CheckpointFormat,
    LoaderError,
    Source,
    TensorInfo,
    register_format,
)

__all__ = ["SafetensorsSource"]


_SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class SafetensorsSource(Source):
    """A ``.safetensors`` file, parsed and mapped here rather than through ``safetensors.safe_open``.

    ``safe_open`` copies each tensor out of a map of the whole file and keeps that map open, so every page it touches
    stays resident until the file is closed: a scan would end holding the whole file. Mapping the file here lets the
    tensor be a view of the map (no copy) and lets its pages go back to the kernel right after its fit.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as handle:
                head = handle.read(8)
                if len(head) < 8:
                    raise LoaderError(f"{path}: too short to be a safetensors file")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > _MAX_SAFETENSORS_HEADER:
                    raise LoaderError(
                        f"{path}: not a safetensors file (header length {header_len} is implausible)"
                    )
                header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoaderError(f"{path}: not a safetensors file ({exc})") from exc
        if not isinstance(header, dict):
            raise LoaderError(f"{path}: not a safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.file_size = path.stat().st_size
        self._entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, spec in header.items():
            try:
                code, shape, (begin, end) = (
                    spec["dtype"],
                    tuple(int(d) for d in spec["shape"]),
                    spec["data_offsets"],
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise LoaderError(f"{path}: malformed safetensors entry for {name!r}") from exc
            dtype_name, itemsize = _SAFETENSORS_DTYPES.get(code, (code.lower(), 0))
            reason = None
            if itemsize == 0:
                reason = f"dtype {code} is not supported"
            else:
                numel = 1
                for d in shape:
                    numel *= d
                if end - begin != numel * itemsize or self.data_start + end > self.file_size:
                    raise LoaderError(
                        f"{path}: entry {name!r} points outside the file or has the wrong length"
                    )
            info = TensorInfo(name, shape, dtype_name, name, reason)
            self._entries[name] = (info, self.data_start + begin, self.data_start + end)

    def infos(self) -> list[TensorInfo]:
        return [entry[0] for entry in self._entries.values()]

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        wanted = [e for n, e in self._entries.items() if names is None or n in names]
        if not wanted:
            return
        with open(self.path, "rb") as handle:
            # ACCESS_COPY (a private map): a stray in-place op on a view can never write the file or fault.
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        token = register_map(base, len(mapped))
        try:
            for info, begin, end in sorted(wanted, key=lambda e: e[1]):
                if info.skip_reason is not None:
                    yield info, None
                    continue
                dtype = getattr(torch, info.dtype)
                count = info.numel
                if count == 0:
                    yield info, torch.empty(info.shape, dtype=dtype)
                    continue
                itemsize = torch.empty((), dtype=dtype).element_size()
                if begin % itemsize == 0:
                    tensor = torch.frombuffer(mapped, dtype=dtype, count=count, offset=begin).view(info.shape)
                else:  # misaligned (legal in safetensors): copy this one tensor to an aligned buffer
                    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin)
                    tensor = raw.clone().view(dtype).view(info.shape)
                yield info, tensor
                del tensor
                drop_pages(base + begin, end - begin)
        finally:
            unregister_map(token)
            # Views handed out keep the buffer exported; the map is closed once they are gone.
            with contextlib.suppress(BufferError):
                mapped.close()


register_format(CheckpointFormat("safetensors", (".safetensors",), SafetensorsSource))
