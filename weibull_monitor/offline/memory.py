"""Memory of a scan: hand a tensor's pages back to the kernel once it has been used, so the resident memory of a
scan stays near the largest tensor rather than growing with the file."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["drop_pages", "no_cyclic_gc", "register_map", "release", "unregister_map"]

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc: Any = None


def drop_pages(address: int, nbytes: int) -> None:
    """``madvise(DONTNEED)`` over the pages of a *file-backed, unmodified* mapping range.

    Only ever called on ranges of read-only or private file mappings: their pages come back from the file if touched
    again, so this frees resident memory without changing any value. Never call it on anonymous memory.
    """
    global _libc
    if nbytes <= 0 or os.name != "posix":
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = address - address % _PAGE
        length = address + nbytes - start
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED)
    except (OSError, AttributeError):  # pragma: no cover - a libc without madvise: memory just stays cached
        pass


# Address ranges [start, end) of the live file maps this module made: only pages inside them are ever released.
_FILE_MAPS: dict[int, tuple[int, int]] = {}
_next_token = 0


def register_map(start: int, nbytes: int) -> int:
    global _next_token
    _next_token += 1
    _FILE_MAPS[_next_token] = (start, start + nbytes)
    return _next_token


def unregister_map(token: int) -> None:
    _FILE_MAPS.pop(token, None)


def release(tensor: torch.Tensor) -> bool:
    """Give the resident pages under ``tensor`` back to the kernel if they belong to a checkpoint file map.

    For a tensor this module handed out from a memory map: the values stay readable (they come back from the file
    when touched again), only the resident memory goes. Any other tensor (anonymous memory, a GPU tensor, a
    non-contiguous view) is left alone. Returns True when pages were released.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in _FILE_MAPS.values()):
        return False
    drop_pages(start, end - start)
    return True


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block, collect once at its end.

    A scan makes a few records per matrix and no reference cycles; with 100,000 matrices the collector's repeated
    passes over the growing heap took 3 of 8 s of CPU (measured). Reference counting still frees everything as it
    goes; only cycles wait for the collection at the end.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()
