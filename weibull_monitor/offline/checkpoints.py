"""Checkpoints: one model state from one or more files (a file, a sharded index, a Hugging Face model directory),
or a series of them ordered by step (``checkpoint-*`` / ``step*`` subdirectories, Lightning ``...step=N.ckpt``).

Nothing is read through a symlink or an index entry that leaves the directory named by the user, unless asked.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weibull_monitor.offline.sources import (
    LoaderError,
    Source,
    TensorInfo,
    UnsafeCheckpointError,
    format_for,
    formats,
    read_json,
    regular_file,
)

__all__ = ["Checkpoint", "open_checkpoints"]


# ---------------------------------------------------------------------------------------------------------------------
# Paths: never leave the checkpoint directory through a symlink or a "../" in an index.


def _inside(root: Path, path: Path, follow_symlinks: bool) -> Path:
    """``path`` if it resolves inside ``root`` (or ``follow_symlinks``); LoaderError otherwise."""
    resolved = path.resolve()
    if follow_symlinks:
        return resolved
    root_resolved = root.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise LoaderError(
            f"refusing {path}: it resolves to {resolved}, outside the checkpoint directory {root_resolved} "
            "(pass --follow-symlinks to allow links that leave the checkpoint, e.g. a Hugging Face cache snapshot)"
        )
    return resolved


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: one or more sources, a config, a step.


@dataclass
class Checkpoint:
    """One model state: its tensors (from one or several files), its config (if any) and its step in a series."""

    path: Path
    format: str
    sources: list[Source]
    config: dict[str, Any] | None = None
    step: int | None = None
    # Tensors named by an index whose shard is missing: known by name only.
    missing: dict[str, str] = field(default_factory=dict)

    def infos(self) -> list[TensorInfo]:
        out: list[TensorInfo] = []
        for source in self.sources:
            out.extend(source.infos())
        for name, reason in self.missing.items():
            out.append(TensorInfo(name, (), "unknown", name, reason))
        return out

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        """Yield ``(info, tensor)`` one at a time (``tensor`` is None for a skipped entry).

        Use each tensor before asking for the next: its memory-mapped pages are released when the iterator resumes.
        """
        wanted = set(names) if names is not None else None
        for source in self.sources:
            yield from source.tensors(wanted)
        for name, reason in self.missing.items():
            if wanted is None or name in wanted:
                yield TensorInfo(name, (), "unknown", name, reason), None


_SERIES_DIR = re.compile(r"^(?:checkpoint|step|global_step|iter|ckpt)[-_=]?(\d+)$", re.IGNORECASE)
_STEP_IN_NAME = re.compile(r"(?:^|[-_])step[=_-]?(\d+)", re.IGNORECASE)
_PREFERRED_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _open_file(path: Path, root: Path, follow_symlinks: bool, config: dict | None) -> Checkpoint:
    real = _inside(root, path, follow_symlinks)
    regular_file(real)
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _open_index(path, root, follow_symlinks, config)
    fmt = format_for(path)
    if fmt is None:
        endings = ", ".join(sorted({s for f in formats() for s in f.suffixes}))
        raise LoaderError(
            f"{path}: unknown checkpoint format (expected *.index.json or a file ending in {endings})"
        )
    source = fmt.open(real)
    return Checkpoint(path, fmt.name, [source], config or source.config)


class _Shard(Source):
    """The tensors an index assigns to one shard file: nothing else the file holds, so a tensor stored in two
    shards is read once, from the shard the index names."""

    def __init__(self, source: Source, names: Iterable[str]) -> None:
        self.source = source
        self.names = set(names)
        self.config = source.config
        self.step = source.step

    def infos(self) -> list[TensorInfo]:
        return [info for info in self.source.infos() if info.name in self.names]

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        yield from self.source.tensors(self.names if names is None else self.names & names)


def _open_index(path: Path, root: Path, follow_symlinks: bool, config: dict | None) -> Checkpoint:
    real = _inside(root, path, follow_symlinks)
    index = read_json(real, "a sharded checkpoint index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LoaderError(
            f"{path}: not a sharded checkpoint index (no weight_map of tensor name -> shard file)"
        )
    shards: dict[str, list[str]] = {}
    for tensor_name, shard in weight_map.items():
        shards.setdefault(shard, []).append(tensor_name)
    sources: list[Source] = []
    missing: dict[str, str] = {}
    opened: dict[Path, Source] = {}
    for shard, tensor_names in shards.items():
        shard_path = path.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise LoaderError(f"{path}: shard {shard!r} points outside the checkpoint directory")
        if shard.lower().endswith(".index.json") or format_for(shard_path) is None:
            raise LoaderError(
                f"{path}: shard {shard!r} is not a weights file (an index may only name weights)"
            )
        if not shard_path.exists():
            for tensor_name in tensor_names:
                missing[tensor_name] = f"shard {shard} is missing (offloaded or not downloaded)"
            continue
        real = _inside(root, shard_path, follow_symlinks)
        if real not in opened:  # "a.safetensors" and "./a.safetensors" are one file, read once
            opened[real] = _open_file(shard_path, root, follow_symlinks, config).sources[0]
        source = opened[real]
        present = {info.name for info in source.infos()}
        for tensor_name in tensor_names:
            if tensor_name not in present:
                missing[tensor_name] = f"not found in shard {shard}, where the index says it is"
        sources.append(_Shard(source, [n for n in tensor_names if n in present]))
    fmt = "safetensors-index" if path.name.endswith(".safetensors.index.json") else "torch-index"
    return Checkpoint(path, fmt, sources, config, missing=missing)


def _read_config(directory: Path, root: Path, follow_symlinks: bool) -> dict[str, Any] | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    config = read_json(_inside(root, path, follow_symlinks), "a model config")
    return config if isinstance(config, dict) else None


def _weights_in(directory: Path) -> Path | None:
    for name in _PREFERRED_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    indexes = sorted(directory.glob("*.index.json"))
    if indexes:
        return indexes[0]
    files = sorted(p for p in directory.iterdir() if p.is_file() and format_for(p) is not None)
    if len(files) == 1:
        return files[0]
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    if safetensors:
        return safetensors[0] if len(safetensors) == 1 else None
    return None


def _open_model_dir(directory: Path, root: Path, follow_symlinks: bool) -> Checkpoint:
    config = _read_config(directory, root, follow_symlinks)
    weights = _weights_in(directory)
    if weights is None:
        safetensors = sorted(p.name for p in directory.glob("*.safetensors"))
        if len(safetensors) > 1:
            raise LoaderError(
                f"{directory}: several safetensors files and no index ({', '.join(safetensors[:4])}...); "
                "scan the files one by one"
            )
        raise LoaderError(
            f"{directory}: no weights found (expected model.safetensors, an *.index.json, pytorch_model.bin, "
            ".pt/.ckpt/.gguf files, or checkpoint-*/step* subdirectories)"
        )
    return _open_file(weights, root, follow_symlinks, config)


def _step_of_dir(directory: Path, root: Path, follow_symlinks: bool) -> int | None:
    """The step of a series member: ``global_step`` of its trainer_state.json, else the number in its name.

    A trainer_state.json that links out of the checkpoint is not read (the name decides, with a warning); one that
    cannot be read, or whose ``global_step`` is no whole number of steps (``true``, ``-3``, ``12.5``), neither.
    """
    state = directory / "trainer_state.json"
    if state.is_file():
        try:
            document = read_json(_inside(root, state, follow_symlinks), "a trainer state")
            step = document.get("global_step") if isinstance(document, dict) else None
            if _is_step(step):
                return step
        except LoaderError as exc:
            warnings.warn(f"{exc}; taking the step from the directory name", stacklevel=2)
    match = _SERIES_DIR.match(directory.name)
    return int(match.group(1)) if match and _is_step(int(match.group(1))) else None


def _is_step(value: object) -> bool:
    """A step a store can hold: a whole number 0 <= step < 2**63 (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _series_members(directory: Path, follow_symlinks: bool) -> list[tuple[int, Path]]:
    members: list[tuple[int, Path]] = []
    for child in directory.iterdir():
        if child.is_dir() and _SERIES_DIR.match(child.name):
            step = _step_of_dir(child, directory, follow_symlinks)
            if step is not None:
                members.append((step, child))
        elif child.is_file() and child.name.lower().endswith((".ckpt", ".pt", ".pth", ".safetensors")):
            match = _STEP_IN_NAME.search(child.stem)
            if match and _is_step(int(match.group(1))):
                members.append((int(match.group(1)), child))
    members.sort(key=lambda m: (m[0], m[1].name))
    return members


def open_checkpoints(path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> list[Checkpoint]:
    """Open PATH as a list of checkpoints: one for a single model, several (ordered by step) for a series.

    A directory holding ``checkpoint-N`` / ``stepN`` subdirectories (or Lightning files named ``...step=N.ckpt``) is a
    series; the step comes from each subdirectory's ``trainer_state.json`` when present, else from the name. Nothing
    is read through a symlink that leaves the directory named by PATH unless ``follow_symlinks``.
    Raises :class:`LoaderError` (or :class:`UnsafeCheckpointError`) with a message meant for the user.
    """
    target = Path(path)
    if not target.exists():
        raise LoaderError(f"{target}: no such file or directory")
    if not target.is_dir():
        regular_file(target)
        return [
            _open_file(
                target,
                target.parent,
                follow_symlinks,
                _read_config(target.parent, target.parent, follow_symlinks),
            )
        ]
    root = target
    members = _series_members(target, follow_symlinks)
    if len(members) >= 1 and (_weights_in(target) is None or len(members) > 1):
        steps = [s for s, _ in members]
        if len(set(steps)) != len(steps):
            raise LoaderError(f"{target}: two checkpoints claim the same step ({sorted(steps)})")
        checkpoints = []
        parent_config = _read_config(target, root, follow_symlinks)
        for step, member in members:
            _inside(root, member, follow_symlinks)
            try:
                if member.is_dir():
                    checkpoint = _open_model_dir(member, root, follow_symlinks)
                else:
                    checkpoint = _open_file(member, root, follow_symlinks, parent_config)
            except UnsafeCheckpointError:
                raise
            except LoaderError as exc:  # a checkpoint still being written must not cost the whole series
                warnings.warn(f"skipping step {step} of the series: {exc}", stacklevel=2)
                continue
            if checkpoint.config is None:
                checkpoint.config = parent_config
            checkpoint.step = step
            checkpoints.append(checkpoint)
        if not checkpoints:
            raise LoaderError(f"{target}: none of the {len(members)} checkpoints of the series could be read")
        return checkpoints
    return [_open_model_dir(target, root, follow_symlinks)]
