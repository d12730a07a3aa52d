"""Reading W&B offline run files (``run-*.wandb``) back, for the tests that check what the sinks sent to W&B.

Every reader takes the run file or its run directory (``wandb/offline-run-*/``, which holds exactly one
``run-*.wandb``); anything else is refused with an error that says what was expected.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def run_file(path: str | Path) -> Path:
    """The ``run-*.wandb`` file of ``path``: the file itself, or the one inside a run directory."""
    given = Path(path)
    if given.is_dir():
        found = sorted(given.glob("run-*.wandb"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise FileNotFoundError(
                f"{given}: no run-*.wandb file in this directory; pass a W&B run directory "
                "(wandb/offline-run-*/) or its run-*.wandb file"
            )
        raise ValueError(f"{given}: several run files ({', '.join(f.name for f in found)}); pass one of them")
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such W&B run file or run directory")
    if given.suffix != ".wandb":
        raise ValueError(f"{given} is not a W&B run file (run-*.wandb) or a run directory (wandb/offline-run-*/)")
    return given


def iter_run_records(path: str | Path) -> Iterator[Any]:
    """Yield the ``wandb_internal_pb2.Record`` messages of a W&B run file (``run-*.wandb``).

    The file is a LevelDB-style log: a 7-byte ``:W&B`` header, then 32 KiB blocks of records, each with a
    7-byte header (checksum u32, length u16, type u8) and records split across blocks as FIRST/MIDDLE/LAST.
    A truncated tail (a run still writing) ends the iteration quietly.
    """
    from wandb.proto import wandb_internal_pb2

    path = run_file(path)
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (missing ':W&B' header)")
    position = _HEADER
    pending = b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        position += _HEADER
        if kind == 0 and length == 0:  # zero padding up to the block end
            position += left_in_block - _HEADER
            continue
        chunk = data[position : position + length]
        if len(chunk) < length:
            return
        position += length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {position - length - _HEADER}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def run_file_complete(path: str | Path) -> bool:
    """True once the run file holds its ``exit`` record (the run finished and everything before it is on disk)."""
    try:
        return any(record.WhichOneof("record_type") == "exit" for record in iter_run_records(path))
    except (OSError, ValueError):
        return False


def wait_for_run_file(path: str | Path, timeout_s: float = 30.0, poll_s: float = 0.05) -> Path:
    """Wait until an offline run file is complete and return its path.

    ``wandb.finish()`` returns before W&B's service process has flushed the run file (measured here: 2 of 8
    offline runs still held only the 7-byte header right after it), so readers wait for the ``exit`` record.
    """
    path = run_file(path)
    deadline = time.monotonic() + timeout_s
    while not run_file_complete(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout_s:.0f} s (run not finished?)")
        time.sleep(poll_s)
    return Path(path)


def read_run_history(path: str | Path) -> list[dict[str, Any]]:
    """History rows of a W&B run file as plain dicts (nested keys joined by '/'; JSON values decoded)."""
    rows = []
    for record in iter_run_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The run's config as the run file records it (the initial config, then every update), JSON values decoded."""
    config: dict[str, Any] = {}
    for record in iter_run_records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else ()
        for item in items:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            config[key] = json.loads(item.value_json)
    return config


def read_run_alerts(path: str | Path) -> list[dict[str, Any]]:
    """Alerts recorded in a W&B run file: title, text, level (``INFO``/``WARN``/``ERROR``), wait_duration_s."""
    alerts = []
    for record in iter_run_records(path):
        if record.WhichOneof("record_type") == "alert":
            alerts.append(
                {
                    "title": record.alert.title,
                    "text": record.alert.text,
                    "level": record.alert.level,
                    "wait_duration_s": record.alert.wait_duration / 1000.0,
                }
            )
    return alerts
