"""Checkpoint readers for ``weibull-monitor scan``: one tensor at a time, without pickle, inside the checkpoint.

Every reader exposes the same two things: :meth:`Checkpoint.infos` (names, shapes and dtypes, known before any weight
is read) and :meth:`Checkpoint.tensors` (an iterator that hands out one tensor at a time). Weights are memory-mapped,
and the pages of a tensor are handed back to the kernel as soon as the caller asks for the next one, so the resident
memory of a scan stays near the largest tensor rather than growing with the file.

Formats: safetensors files, sharded ``*.index.json`` (safetensors or torch shards), Hugging Face model directories
(``config.json`` feeds the role map), directories of ``checkpoint-*`` / ``step*`` subdirectories (a time series ordered
by step), Lightning ``.ckpt`` and PyTorch ``.pt`` / ``.bin`` (``torch.load(weights_only=True)`` only: anything that
needs pickle is refused), and GGUF (optional ``gguf`` package; quantised tensors are dequantised one at a time).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import re
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Checkpoint",
    "LoaderError",
    "TensorInfo",
    "UnsafeCheckpointError",
    "open_checkpoints",
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
        return self.dtype in _FLOAT_DTYPE_NAMES

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


_FLOAT_DTYPE_NAMES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}

# ---------------------------------------------------------------------------------------------------------------------
# Memory: hand a tensor's pages back to the kernel once it has been used.

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc: Any = None


def _drop_pages(address: int, nbytes: int) -> None:
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


def _register_map(start: int, nbytes: int) -> int:
    global _next_token
    _next_token += 1
    _FILE_MAPS[_next_token] = (start, start + nbytes)
    return _next_token


def _unregister_map(token: int) -> None:
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
    _drop_pages(start, end - start)
    return True


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
# Tensor sources: one file each.


class _Source:
    """One weights file: metadata up front, tensors one at a time."""

    def infos(self) -> list[TensorInfo]:
        raise NotImplementedError

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        raise NotImplementedError


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


class _SafetensorsSource(_Source):
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
        token = _register_map(base, len(mapped))
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
                _drop_pages(base + begin, end - begin)
        finally:
            _unregister_map(token)
            # Views handed out keep the buffer exported; the map is closed once they are gone.
            with contextlib.suppress(BufferError):
                mapped.close()


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


class _TorchSource(_Source):
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
            token = _register_map(storage.data_ptr(), storage.nbytes()) if file_backed else None
            try:
                yield info, tensor
            finally:
                if token is not None:
                    _unregister_map(token)
                    _drop_pages(storage.data_ptr(), storage.nbytes())


# GGUF tensor names -> Hugging Face (LLaMA-style) names, so the role map sees names it knows.
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str:
    """The Hugging Face (LLaMA-layout) name of a GGUF tensor name, or the name unchanged when unknown."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    match = _GGUF_BLOCK.match(name)
    if match and match.group(2) in _GGUF_BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_GGUF_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"
    return name


class _GGUFSource(_Source):
    """A GGUF file (``pip install gguf``): quantised tensors dequantised one at a time with ``gguf.quants``."""

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError as exc:
            raise LoaderError(
                f"{path}: reading GGUF needs the optional package: pip install 'weibull-monitor[gguf]'"
            ) from exc
        self.path = path
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except (ValueError, OSError, KeyError) as exc:
            raise LoaderError(f"{path}: not a readable GGUF file ({exc})") from exc
        self.config = self._config()

    def _field(self, key: str) -> Any:
        entry = self.reader.fields.get(key)
        if entry is None:
            return None
        try:
            return entry.contents()
        except (AttributeError, IndexError, ValueError):  # pragma: no cover - older gguf
            return None

    def _config(self) -> dict[str, Any]:
        arch = self._field("general.architecture") or "llama"
        config: dict[str, Any] = {"model_type": arch, "source_format": "gguf"}
        for gguf_key, hf_key in (
            ("attention.head_count", "num_attention_heads"),
            ("attention.head_count_kv", "num_key_value_heads"),
            ("embedding_length", "hidden_size"),
            ("block_count", "num_hidden_layers"),
            ("feed_forward_length", "intermediate_size"),
        ):
            value = self._field(f"{arch}.{gguf_key}")
            if isinstance(value, int):
                config[hf_key] = value
        return config

    def infos(self) -> list[TensorInfo]:
        out = []
        for tensor in self.reader.tensors:
            shape = tuple(
                int(d) for d in reversed(tensor.shape.tolist())
            )  # GGUF stores the fastest axis first
            qtype = self._gguf.GGMLQuantizationType(tensor.tensor_type)
            dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(qtype.name)
            if dtype is None:
                dtype = "float32" if qtype.name not in ("I8", "I16", "I32", "I64") else qtype.name.lower()
            out.append(TensorInfo(tensor.name, shape, dtype, gguf_to_hf_name(tensor.name), None))
        return out

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        import numpy as np

        for info, tensor in zip(self.infos(), self.reader.tensors):
            if names is not None and info.name not in names:
                continue
            try:
                values = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except (NotImplementedError, ValueError, KeyError) as exc:
                skipped = TensorInfo(
                    info.name, info.shape, info.dtype, info.role_name, f"cannot dequantise: {exc}"
                )
                yield skipped, None
                continue
            array = np.ascontiguousarray(values).reshape(info.shape)
            if not array.flags.writeable:  # unquantised tensors come back as read-only views of the file map
                array = array.copy()
            yield info, torch.from_numpy(array)
            del values, array
            data = tensor.data
            _drop_pages(data.ctypes.data, data.nbytes)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: one or more sources, a config, a step.


@dataclass
class Checkpoint:
    """One model state: its tensors (from one or several files), its config (if any) and its step in a series."""

    path: Path
    format: str
    sources: list[_Source]
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
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf")
_PREFERRED_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _open_file(path: Path, root: Path, follow_symlinks: bool, config: dict | None) -> Checkpoint:
    real = _inside(root, path, follow_symlinks)
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _open_index(path, root, follow_symlinks, config)
    if name.endswith(".safetensors"):
        return Checkpoint(path, "safetensors", [_SafetensorsSource(real)], config)
    if name.endswith(".gguf"):
        source = _GGUFSource(real)
        return Checkpoint(path, "gguf", [source], config or source.config)
    if name.endswith((".pt", ".pth", ".bin", ".ckpt")):
        source = _TorchSource(real)
        return Checkpoint(path, "lightning" if name.endswith(".ckpt") else "torch", [source], config)
    raise LoaderError(
        f"{path}: unknown checkpoint format (expected .safetensors, *.index.json, .pt/.pth/.bin, .ckpt or .gguf)"
    )


def _open_index(path: Path, root: Path, follow_symlinks: bool, config: dict | None) -> Checkpoint:
    real = _inside(root, path, follow_symlinks)
    try:
        weight_map = json.loads(real.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{path}: not a sharded checkpoint index (no weight_map)") from exc
    shards: dict[str, list[str]] = {}
    for tensor_name, shard in weight_map.items():
        shards.setdefault(str(shard), []).append(str(tensor_name))
    sources: list[_Source] = []
    missing: dict[str, str] = {}
    for shard, tensor_names in shards.items():
        shard_path = path.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise LoaderError(f"{path}: shard {shard!r} points outside the checkpoint directory")
        if not shard_path.exists():
            for tensor_name in tensor_names:
                missing[tensor_name] = f"shard {shard} is missing (offloaded or not downloaded)"
            continue
        sources.extend(_open_file(shard_path, root, follow_symlinks, config).sources)
    fmt = "safetensors-index" if path.name.endswith(".safetensors.index.json") else "torch-index"
    return Checkpoint(path, fmt, sources, config, missing=missing)


def _read_config(directory: Path, root: Path, follow_symlinks: bool) -> dict[str, Any] | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(_inside(root, path, follow_symlinks).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{path}: not valid JSON ({exc})") from exc
    return config if isinstance(config, dict) else None


def _weights_in(directory: Path) -> Path | None:
    for name in _PREFERRED_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    indexes = sorted(directory.glob("*.index.json"))
    if indexes:
        return indexes[0]
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(_WEIGHT_SUFFIXES)
    )
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

    A trainer_state.json that links out of the checkpoint is not read (the name decides, with a warning).
    """
    state = directory / "trainer_state.json"
    if state.is_file():
        try:
            state = _inside(root, state, follow_symlinks)
        except LoaderError as exc:
            warnings.warn(f"{exc}; taking the step from the directory name", stacklevel=2)
            state = None
    if state is not None and state.is_file():
        try:
            step = json.loads(state.read_text()).get("global_step")
            if isinstance(step, int):
                return step
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    match = _SERIES_DIR.match(directory.name)
    return int(match.group(1)) if match else None


def _series_members(directory: Path, follow_symlinks: bool) -> list[tuple[int, Path]]:
    members: list[tuple[int, Path]] = []
    for child in directory.iterdir():
        if child.is_dir() and _SERIES_DIR.match(child.name):
            step = _step_of_dir(child, directory, follow_symlinks)
            if step is not None:
                members.append((step, child))
        elif child.is_file() and child.name.lower().endswith((".ckpt", ".pt", ".pth", ".safetensors")):
            match = _STEP_IN_NAME.search(child.stem)
            if match:
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
    if target.is_file():
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
            if member.is_dir():
                checkpoint = _open_model_dir(member, root, follow_symlinks)
            else:
                checkpoint = _open_file(member, root, follow_symlinks, parent_config)
            if checkpoint.config is None:
                checkpoint.config = parent_config
            checkpoint.step = step
            checkpoints.append(checkpoint)
        return checkpoints
    return [_open_model_dir(target, root, follow_symlinks)]
