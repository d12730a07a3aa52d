"""What ``torch.load`` checks when it reads a zip checkpoint's records but not when it maps them (``mmap=True``):
every storage the pickle declares has a record of exactly its size, behind an intact local header.

Mapped, a storage declared larger than its record silently reads the records after it (another tensor's bytes: a
wrong fit, no error), and a damaged local header goes unnoticed; read, the same file is refused ("record size
(767 bytes) does not match expected size (4096 bytes)"). So before mapping, the pickle is walked once by torch's
own weights-only unpickler with storages replaced by empty meta storages (no data read, no code run), collecting
what each storage declares, and the archive's records are measured.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["RecordError", "check_records"]


class RecordError(ValueError):
    """The archive's records do not hold what its pickle declares."""


def _declared(pickled: bytes) -> list[tuple[str, int]]:
    """(storage key, declared bytes) of every storage the pickle refers to, through torch's weights-only unpickler
    (UnpicklingError as torch.load raises it for anything that needs code)."""
    from torch import _weights_only_unpickler

    declared: list[tuple[str, int]] = []

    def persistent_load(pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise RecordError(f"an unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if not isinstance(numel, int) or numel < 0:
            raise RecordError(f"storage {key!r} declares {numel!r} elements")
        nbytes = numel * torch._utils._element_size(dtype)
        declared.append((str(key), nbytes))
        storage = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    unpickler.load()
    return declared


def check_records(path: Path) -> bool:
    """RecordError unless every storage of the zip checkpoint at ``path`` has a record of exactly the size its
    pickle declares, with an intact local header; then whether the records can be mapped (all stored, none
    compressed). UnpicklingError (from torch's weights-only unpickler) when the pickle needs code;
    ImportError/AttributeError when this torch lacks the unpickler (the caller then lets torch read the records)."""
    with open(path, "rb") as handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
            raise RecordError(f"not a readable zip archive ({exc})") from None
        with archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise RecordError(
                    "a zip archive without data.pkl" if not pickles else "several data.pkl records"
                )
            prefix = pickles[0].filename[: -len("data.pkl")]
            records: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                handle.seek(info.header_offset)
                local = handle.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise RecordError(f"record {info.filename!r} has a damaged local header")
                records[info.filename] = info
            try:
                pickled = archive.read(pickles[0])
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise RecordError(f"data.pkl cannot be read ({exc})") from None
    mappable = True
    for key, nbytes in _declared(pickled):
        record = records.get(f"{prefix}data/{key}")
        if record is None:
            raise RecordError(f"storage {key!r} has no record")
        mappable = mappable and record.compress_type == zipfile.ZIP_STORED
        if record.file_size != nbytes:
            raise RecordError(
                f"storage {key!r} declares {nbytes} bytes but its record holds {record.file_size}"
            )
    return mappable
