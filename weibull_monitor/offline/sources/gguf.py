"""GGUF files (the optional ``gguf`` package): quantised tensors dequantised one at a time; names translated to
Hugging Face (LLaMA-layout) names so the role map knows them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from weibull_monitor.offline.memory import drop_pages
from weibull_monitor.offline.sources.base import (
    MAX_TENSORS,
    CheckpointFormat,
    LoaderError,
    Source,
    TensorInfo,
    register_format,
)

__all__ = ["GGUFSource", "gguf_to_hf_name"]


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


class GGUFSource(Source):
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
        except (
            Exception
        ) as exc:  # the reader parses untrusted counts, lengths and types: any failure is the file's
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise LoaderError(
                f"{path}: not a readable GGUF file ({type(exc).__name__}{': ' + detail if detail else ''})"
            ) from None
        # A file written for the other byte order: the reader swaps the header, not the tensor data.
        self.swapped = getattr(self.reader, "byte_order", "I") == "S"
        if len(self.reader.tensors) > MAX_TENSORS:
            raise LoaderError(
                f"{path}: {len(self.reader.tensors)} tensors, more than the limit of {MAX_TENSORS}"
            )
        self.config = self._config()
        try:
            self._infos = [self._info(tensor) for tensor in self.reader.tensors]
        except Exception as exc:
            raise LoaderError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def _field(self, key: str) -> Any:
        entry = self.reader.fields.get(key)
        if entry is None:
            return None
        try:
            return entry.contents()
        except Exception:  # an older gguf, or a value of a type the reader cannot decode: no such field
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
            if isinstance(value, int) and not isinstance(value, bool):
                config[hf_key] = value
        return config

    def _info(self, tensor: Any) -> TensorInfo:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF stores the fastest axis first
        qtype = self._gguf.GGMLQuantizationType(tensor.tensor_type)
        dtype = _PLAIN_TYPES.get(qtype.name)
        reason = None
        if dtype is None:
            dtype = "float32" if qtype.name not in ("I8", "I16", "I32", "I64") else qtype.name.lower()
            if self.swapped and dtype == "float32":
                reason = f"{qtype.name} blocks of a big-endian GGUF file are not read (only F32/F16/BF16/F64)"
        return TensorInfo(tensor.name, shape, dtype, gguf_to_hf_name(tensor.name), reason)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def _values(self, tensor: Any, info: TensorInfo) -> Any:
        """The tensor's values as a native-order numpy array of ``info.shape`` (a copy: never a view of the map)."""
        import numpy as np

        qtype = self._gguf.GGMLQuantizationType(tensor.tensor_type).name
        data = tensor.data
        if qtype in ("F32", "F16", "F64"):
            # the reader types the map in the file's byte order; astype to the native order swaps when needed
            values = np.asarray(data).astype(data.dtype.newbyteorder("="))
        elif qtype == "BF16":
            words = np.asarray(data).view(np.uint16)
            values = (words.byteswap() if self.swapped else words.copy()).view(np.int16)
        else:
            values = self._gguf.quants.dequantize(data, tensor.tensor_type)
        return np.ascontiguousarray(values).reshape(info.shape)

    def tensors(self, names: set[str] | None) -> Iterator[tuple[TensorInfo, torch.Tensor | None]]:
        for info, tensor in zip(self._infos, self.reader.tensors):
            if names is not None and info.name not in names:
                continue
            if info.skip_reason is not None:
                yield info, None
                continue
            try:
                array = self._values(tensor, info)
            except Exception as exc:  # a type gguf cannot dequantise, data shorter than its shape, ...
                detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                yield (
                    TensorInfo(info.name, info.shape, info.dtype, info.role_name, f"cannot read: {detail}"),
                    None,
                )
                continue
            if not array.flags.writeable:
                array = array.copy()
            values = torch.from_numpy(array)
            yield info, values.view(torch.bfloat16) if info.dtype == "bfloat16" else values
            del values, array
            data = tensor.data
            drop_pages(data.ctypes.data, data.nbytes)


_PLAIN_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


register_format(CheckpointFormat("gguf", (".gguf",), GGUFSource))
