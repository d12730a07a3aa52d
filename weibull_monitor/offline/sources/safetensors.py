"""The safetensors format, parsed and mapped here (no pickle, no copy: tensors are views of a private file map)."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from weibull_monitor.offline.memory import drop_pages, register_map, unregister_map
from weibull_monitor.offline.sources.base import (
    MAX_TENSORS,
    CheckpointFormat,
    LoaderError,
    Source,
    TensorInfo,
    parse_json,
    register_format,
)

__all__ = ["SafetensorsSource", "parse_header"]


#: Every dtype the safetensors format defines: (torch dtype name or None when torch has none, bits per element).
_SAFETENSORS_DTYPES: dict[str, tuple[str | None, int]] = {
    "F64": ("float64", 64),
    "F32": ("float32", 32),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
    "F4": (None, 4),
    "C64": ("complex64", 64),
    "I64": ("int64", 64),
    "I32": ("int32", 32),
    "I16": ("int16", 16),
    "I8": ("int8", 8),
    "U64": ("uint64", 64),
    "U32": ("uint32", 32),
    "U16": ("uint16", 16),
    "U8": ("uint8", 8),
    "BOOL": ("bool", 8),
}

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit
_DROP_BYTES = 1 << 20
_ITEMSIZE: dict[torch.dtype, int] = {}
_USIZE = 1 << 64


def _usize(value: object) -> bool:
    return type(value) is int and 0 <= value < _USIZE  # not bool, not float


def _entry(name: str, spec: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, begin, end) of one header entry, checked as the format's own library checks it."""
    if type(spec) is not dict:
        raise ValueError(f"entry {name!r} is not an object")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if type(code) is not str or code not in _SAFETENSORS_DTYPES:
        raise ValueError(f"entry {name!r} has dtype {code!r}, not one of the format's dtypes")
    if type(shape) is not list:
        raise ValueError(f"entry {name!r} has shape {shape!r}, not a list of non-negative integers")
    for d in shape:
        if not _usize(d):
            raise ValueError(f"entry {name!r} has shape {shape!r}, not a list of non-negative integers")
    if type(offsets) is not list or len(offsets) != 2 or not (_usize(offsets[0]) and _usize(offsets[1])):
        raise ValueError(f"entry {name!r} has data_offsets {offsets!r}, not two non-negative integers")
    return code, tuple(shape), offsets[0], offsets[1]


def parse_header(header: object, data_size: int) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """The entries of a parsed header as (name, dtype code, shape, begin, end), data offsets relative to the data
    section. ValueError unless every entry is well formed and, sorted by offset, the entries tile the data section
    exactly: no gap, no overlap, nothing outside it, each exactly as long as its shape and dtype say (what
    ``safetensors.safe_open`` requires)."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise ValueError("__metadata__ is not an object of strings")
    entries = [(name, *_entry(name, spec)) for name, spec in header.items() if name != "__metadata__"]
    entries.sort(key=lambda e: (e[3], e[4]))
    position = 0
    for name, code, shape, begin, end in entries:
        if begin != position or end < begin:
            raise ValueError(
                f"entry {name!r} has data_offsets [{begin}, {end}], expected to start at {position} "
                "(entries must tile the data section without gap or overlap)"
            )
        bits = _SAFETENSORS_DTYPES[code][1]
        numel = math.prod(shape)
        if (numel * bits) % 8 or end - begin != numel * bits // 8:
            raise ValueError(
                f"entry {name!r} holds {end - begin} bytes, but shape {list(shape)} of {code} needs "
                f"{numel * bits / 8:g}"
            )
        position = end
    if position != data_size:
        raise ValueError(f"the entries cover {position} bytes of a {data_size}-byte data section")
    return entries


class SafetensorsSource(Source):
    """A ``.safetensors`` file, parsed and mapped here rather than through ``safetensors.safe_open``.

    ``safe_open`` copies each tensor out of a map of the whole file and keeps that map open, so every page it touches
    stays resident until the file is closed: a scan would end holding the whole file. Mapping the file here lets the
    tensor be a view of the map (no copy) and lets its pages go back to the kernel right after its fit. The header
    is checked at least as strictly as ``safe_open`` checks it (:func:`parse_header`).
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as handle:
                self.file_size = os.fstat(handle.fileno()).st_size
                head = handle.read(8)
                if len(head) < 8:
                    raise LoaderError(f"{path}: too short to be a safetensors file")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > self.file_size:
                    raise LoaderError(
                        f"{path}: not a safetensors file (header length {header_len} does not fit the "
                        f"{self.file_size}-byte file)"
                    )
                raw = handle.read(header_len)
        except OSError as exc:
            raise LoaderError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        self.data_start = 8 + header_len
        entries_seen = raw.count(b'"data_offsets"')
        if entries_seen > MAX_TENSORS:  # counted before parsing: 100 MB of entries would be ~1 GB of objects
            raise LoaderError(
                f"{path}: {entries_seen} tensors, more than the limit of {MAX_TENSORS} per file"
            )
        try:
            if not raw.lstrip(b" ").startswith(b"{"):
                raise ValueError("the header does not start with '{'")
            header = parse_json(raw)
            entries = parse_header(header, self.file_size - self.data_start)
        except ValueError as exc:
            raise LoaderError(f"{path}: not a valid safetensors file ({exc})") from None
        if len(entries) > MAX_TENSORS:
            raise LoaderError(
                f"{path}: {len(entries)} tensors, more than the limit of {MAX_TENSORS} per file"
            )
        self.metadata = header.get("__metadata__") or {}
        self._entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, code, shape, begin, end in entries:
            dtype_name = _SAFETENSORS_DTYPES[code][0]
            reason = None
            if dtype_name is None or getattr(torch, dtype_name, None) is None:
                reason = f"dtype {code} is not supported by this torch"
                dtype_name = code.lower()
            elif any(d >= 1 << 63 for d in shape):
                reason = f"shape {list(shape)} does not fit a torch tensor"
            info = TensorInfo(name, shape, dtype_name, name, reason)
            self._entries[name] = (info, self.data_start + begin, self.data_start + end)

    def infos(self) -> list[TensorInfo]:
        return [entry[0] for entry in self._entries.values()]

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        wanted = [e for n, e in self._entries.items() if names is None or n in names]
        if not wanted:
            return
        wanted_end = max(end for _, _, end in wanted)
        try:
            with open(self.path, "rb") as handle:
                # ACCESS_COPY (a private map): a stray in-place op on a view can never write the file or fault.
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise LoaderError(f"{self.path}: cannot be mapped ({exc})") from None
        if len(mapped) != self.file_size:
            mapped.close()
            raise LoaderError(f"{self.path}: the file changed size while it was read (still being written?)")
        base = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        token = register_map(base, len(mapped))
        # Pages are handed back once at least _DROP_BYTES of tensors have been read since the last time (a large
        # tensor at once): one madvise per small tensor would cost more than the tensor.
        dropped = None
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
                itemsize = _ITEMSIZE.get(dtype) or _ITEMSIZE.setdefault(
                    dtype, torch.empty((), dtype=dtype).element_size()
                )
                if begin % itemsize == 0:
                    tensor = torch.frombuffer(mapped, dtype=dtype, count=count, offset=begin).view(info.shape)
                else:  # misaligned (legal in safetensors): copy this one tensor to an aligned buffer
                    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin)
                    tensor = raw.clone().view(dtype).view(info.shape)
                yield info, tensor
                del tensor
                dropped = begin if dropped is None else dropped
                if end - dropped >= _DROP_BYTES:
                    drop_pages(base + dropped, end - dropped)
                    dropped = None
            if dropped is not None:
                drop_pages(base + dropped, wanted_end - dropped)
        finally:
            unregister_map(token)
            # Never mapped.close(): it succeeds even while tensors handed out still view the map (torch.frombuffer
            # holds a reference, not a buffer export), and they would then read unmapped memory. The map is
            # unmapped when the last of them and this generator let go of it.
            del mapped


register_format(CheckpointFormat("safetensors", (".safetensors",), SafetensorsSource))
