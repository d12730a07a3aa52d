"""PyTorch ``.pt`` / ``.bin`` and Lightning ``.ckpt`` files: ``torch.load(weights_only=True)`` only, mapped when
possible. Anything that needs pickle code is refused, never unpickled."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from weibull_monitor.offline.memory import drop_pages, register_map, unregister_map
from weibull_monitor.offline.sources.base import (
    CheckpointFormat,
    LoaderError,
    Source,
    TensorInfo,
    UnsafeCheckpointError,
    register_format,
)

__all__ = ["TorchSource"]


def _flatten_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key), out)


def _pickle_detail(exc: Exception) -> str:
    """The line of torch's weights-only refusal that names what the file wanted to run."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if any(word in line for word in ("GLOBAL", "Unsupported", "unsupported", "not allowed", "blocked")):
            return line
    return lines[-1] if lines else type(exc).__name__


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "state")
_SKIPPED_TOP_KEYS = ("optimizer", "optimizer_states", "lr_schedulers", "scheduler", "callbacks", "loops")


class TorchSource(Source):
    """A PyTorch ``.pt`` / ``.bin`` or Lightning ``.ckpt``: ``torch.load(weights_only=True)``, mapped when possible."""

    def __init__(self, path: Path):
        self.path = path
        payload, self.mapped = self._load(path)
        self.step: int | None = None
        state: Any = payload
        if isinstance(payload, dict):
            for key in ("global_step", "step"):
                if isinstance(payload.get(key), int) and not isinstance(payload.get(key), bool):
                    self.step = int(payload[key])
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
        tensors: dict[str, torch.Tensor] = {}
        _flatten_tensors(state, "", tensors)
        if not tensors:
            raise LoaderError(f"{path}: no tensors found (expected a state dict or a checkpoint holding one)")
        self._tensors = tensors

    @staticmethod
    def _load(path: Path) -> tuple[Any, bool]:
        """The loaded object and whether its storages are file maps (legacy non-zip files cannot be mapped)."""
        import pickle

        def load(mmap_flag: bool) -> Any:
            with warnings.catch_warnings():  # torch warns about pickle protocols it then reads fine
                warnings.simplefilter("ignore", UserWarning)
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_flag)

        try:
            try:
                return load(True), True
            except RuntimeError as exc:  # legacy (non-zip) files cannot be mapped
                if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                    raise
                return load(False), False
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing {path}: it can only be loaded by running pickle code, which weibull-monitor never does "
                f"with checkpoint files ({_pickle_detail(exc)}). If you trust the file, convert it to safetensors "
                "in a trusted environment and scan that."
            ) from None
        except (EOFError, ValueError, OSError) as exc:
            raise LoaderError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc

    def infos(self) -> list[TensorInfo]:
        out = []
        for name, tensor in self._tensors.items():
            reason = None
            if tensor.is_meta:
                reason = "meta tensor (no data stored: offloaded or saved from an empty model)"
            dtype = str(tensor.dtype).removeprefix("torch.")
            out.append(TensorInfo(name, tuple(tensor.shape), dtype, name, reason))
        return out

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        for info in self.infos():
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
