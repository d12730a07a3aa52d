"""PyTorch ``.pt`` / ``.bin`` and Lightning ``.ckpt`` files: ``torch.load(weights_only=True)`` only, mapped when
possible. Anything that needs pickle code is refused, never unpickled."""

from __future__ import annotations

import pickletools
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from weibull_monitor.offline.memory import drop_pages, register_map, unregister_map
from weibull_monitor.offline.sources.base import (
    MAX_NESTING,
    MAX_TENSORS,
    CheckpointFormat,
    LoaderError,
    Source,
    TensorInfo,
    UnsafeCheckpointError,
    register_format,
)
from weibull_monitor.offline.sources.torch_records import RecordError, check_records

__all__ = ["TorchSource"]


def _flatten_tensors(root: Any, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor reachable through nested dicts, named by its dotted key path.

    Iterative, and each dict is walked once however many times it is referenced: a file whose dicts share their
    children 40 levels deep (2**40 paths) or refer to themselves costs one visit per dict. LoaderError past
    MAX_NESTING levels or MAX_TENSORS tensors.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    visited = 0
    while stack:
        obj, prefix, depth = stack.pop()
        if isinstance(obj, torch.Tensor):
            if prefix in out:  # {"a": {"b": x}, "a.b": y}: one name for two tensors, neither may vanish
                raise LoaderError(f"{path}: two tensors are both named {prefix!r}")
            out[prefix] = obj
            if len(out) > MAX_TENSORS:
                raise LoaderError(f"{path}: more than {MAX_TENSORS} tensors, the limit per checkpoint")
            continue
        if not isinstance(obj, dict) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if depth >= MAX_NESTING:
            raise LoaderError(f"{path}: dicts nested more than {MAX_NESTING} levels deep; not a state dict")
        visited += len(obj)
        if visited > 10 * MAX_TENSORS:
            raise LoaderError(f"{path}: more than {10 * MAX_TENSORS} entries in its dicts; not a state dict")
        for key, value in reversed(list(obj.items())):  # reversed: the stack pops them in file order
            stack.append((value, f"{prefix}.{key}" if prefix else str(key), depth + 1))
    return out


_OPCODES = {op.code.encode("latin-1")[0] for op in pickletools.opcodes}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _needs_pickle_code(message: str) -> bool:
    """Whether torch's weights-only refusal says the stream wants code run (a global, or a real pickle opcode the
    safe unpickler does not allow), as opposed to bytes that are no pickle at all."""
    operand = re.search(r"Unsupported operand (\d+)", message)
    if operand:
        return int(operand.group(1)) in _OPCODES
    return any(
        word in message for word in ("GLOBAL", "global", "not allowed", "blocked", "Unsupported class")
    )


def _pickle_detail(exc: Exception) -> str:
    """The line of torch's weights-only refusal that names what the file wanted to run."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if any(word in line for word in ("GLOBAL", "Unsupported", "unsupported", "not allowed", "blocked")):
            return line
    return lines[-1] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _records_checked(path: Path) -> bool:
    """Whether the zip checkpoint can be mapped: its records checked against what its pickle declares (RecordError
    when they disagree). False (torch then reads, and checks, the records itself) when they are compressed or this
    torch lacks the unpickler the check uses."""
    try:
        return check_records(path)
    except (ImportError, AttributeError):  # pragma: no cover - a torch without torch._weights_only_unpickler
        return False


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "state")
_SKIPPED_TOP_KEYS = ("optimizer", "optimizer_states", "lr_schedulers", "scheduler", "callbacks", "loops")


def _skip_reason(tensor: torch.Tensor) -> str | None:
    """Why a loaded tensor is not read (never touching its storage when it has none), or None."""
    if tensor.is_meta:
        return "meta tensor (no data stored: offloaded or saved from an empty model)"
    if tensor.layout != torch.strided:
        return f"{str(tensor.layout).removeprefix('torch.')} tensor: only dense tensors are read"
    if tensor.is_quantized:
        return f"quantized tensor ({tensor.dtype}): dequantize it first"
    try:
        stored = tensor.untyped_storage().nbytes() // max(1, tensor.element_size())
    except Exception as exc:  # a storage torch cannot hand out
        return f"its storage cannot be read ({_first_line(exc)})"
    if tensor.numel() > stored:
        return (
            f"a broadcast or overlapping view: {tensor.numel()} elements over {stored} stored ones "
            "(strides that repeat elements); not a weight as saved by a model"
        )
    return None


class TorchSource(Source):
    """A PyTorch ``.pt`` / ``.bin`` or Lightning ``.ckpt``: ``torch.load(weights_only=True)``, mapped when possible."""

    def __init__(self, path: Path):
        self.path = path
        payload, self.mapped = self._load(path)
        self.step: int | None = None
        state: Any = payload
        if isinstance(payload, dict):
            for key in ("global_step", "step"):
                value = payload.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
                    self.step = value
                    break
            for key in _STATE_KEYS:
                candidate = payload.get(key)
                if isinstance(candidate, dict) and any(
                    isinstance(v, torch.Tensor) for v in candidate.values()
                ):
                    state = candidate
                    break
            else:
                state = {k: v for k, v in payload.items() if str(k) not in _SKIPPED_TOP_KEYS}
        tensors = _flatten_tensors(state, path)
        if not tensors:
            raise LoaderError(f"{path}: no tensors found (expected a state dict or a checkpoint holding one)")
        self._tensors = tensors
        self._infos = [self._info(name, tensor) for name, tensor in tensors.items()]

    @staticmethod
    def _load(path: Path) -> tuple[Any, bool]:
        """The loaded object and whether its storages are file maps (legacy non-zip files cannot be mapped).

        Only a torch zip archive or a pickle stream (protocol 2 and up) is handed to ``torch.load``; anything
        else is not a PyTorch checkpoint. ``torch.load(weights_only=True)`` runs no code whatever the bytes, so
        every way it can fail on a malformed file is a LoaderError (one line), never a traceback.
        """
        import pickle

        try:
            with open(path, "rb") as handle:
                head = handle.read(4)
        except OSError as exc:
            raise LoaderError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        is_zip = head.startswith(_ZIP_MAGIC)
        if not is_zip and not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
            raise LoaderError(
                f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle stream)"
            )
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols it then reads fine
                warnings.simplefilter("ignore")
                mapped = is_zip and _records_checked(path)
                payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
            return payload, mapped
        except RecordError as exc:
            raise LoaderError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
        except pickle.UnpicklingError as exc:
            if _needs_pickle_code(str(exc)):
                raise UnsafeCheckpointError(
                    f"refusing {path}: it can only be loaded by running pickle code, which weibull-monitor never "
                    f"does with checkpoint files ({_pickle_detail(exc)}). If you trust the file, convert it to "
                    "safetensors in a trusted environment and scan that."
                ) from None
            raise LoaderError(
                f"{path}: not a PyTorch checkpoint (malformed pickle stream: {_first_line(exc)})"
            ) from None
        except MemoryError:
            raise LoaderError(
                f"{path}: not a readable PyTorch checkpoint (it asks for more memory than there is)"
            ) from None
        except RecursionError:
            raise LoaderError(f"{path}: not a readable PyTorch checkpoint (nested too deeply)") from None
        except Exception as exc:  # a truncated archive, a record missing, a view outside its storage, ...
            detail = _first_line(exc)
            if "data.pkl" in detail:
                detail = "a zip archive without data.pkl"
            raise LoaderError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None

    @staticmethod
    def _info(name: str, tensor: torch.Tensor) -> TensorInfo:
        dtype = str(tensor.dtype).removeprefix("torch.")
        return TensorInfo(name, tuple(tensor.shape), dtype, name, _skip_reason(tensor))

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        for info in self._infos:
            if names is not None and info.name not in names:
                continue
            if info.skip_reason is not None:
                yield info, None
                continue
            tensor = self._tensors[info.name]
            storage = tensor.untyped_storage()
            # Only storages that torch.load mapped from the file (private, unmodified) may be released.
            file_backed = self.mapped and tensor.device.type == "cpu" and storage.nbytes() > 0
            token = register_map(storage.data_ptr(), storage.nbytes()) if file_backed else None
            try:
                yield info, tensor
            finally:
                if token is not None:
                    unregister_map(token)
                    drop_pages(storage.data_ptr(), storage.nbytes())


register_format(CheckpointFormat("torch", (".pt", ".pth", ".bin"), TorchSource))
register_format(CheckpointFormat("lightning", (".ckpt",), TorchSource))
