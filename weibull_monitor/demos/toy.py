"""Small models and an embedded corpus for the demo, the examples, the tests and the benchmarks.

Nothing here downloads: models come from transformers config classes with random init, and the corpus is the
source of the Python standard library that every install carries, read as bytes (vocabulary of 256).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

BYTE_VOCAB = 256


def tiny_llama_config(**overrides: Any) -> Any:
    """A LLaMA config small enough to train on a CPU in seconds (byte vocabulary, GQA with 2 KV heads)."""
    from transformers import LlamaConfig

    params: dict[str, Any] = {
        "vocab_size": BYTE_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` from :func:`tiny_llama_config` (deterministic for a seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


def llama_config_with_params(n_params: float, **overrides: Any) -> Any:
    """A LLaMA-shaped config whose transformer blocks hold about ``n_params`` parameters (hidden 768 at 125M)."""
    hidden = overrides.pop("hidden_size", 768)
    intermediate = overrides.pop("intermediate_size", int(hidden * 8 / 3) // 64 * 64)
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    layers = max(1, round(n_params / per_layer))
    heads = max(1, hidden // 64)
    return tiny_llama_config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=overrides.pop("num_key_value_heads", heads),
        **overrides,
    )


def stdlib_corpus_files() -> list[Path]:
    """The standard library's own ``.py`` files, sorted, as the embedded default corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:  # pragma: no cover - a Python without its stdlib sources
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return files


def byte_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Up to ``max_bytes`` bytes of standard-library source as a uint8 tensor (deterministic order)."""
    chunks: list[bytes] = []
    total = 0
    for path in stdlib_corpus_files():
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def byte_batches(
    batch_size: int = 8, seq_len: int = 64, seed: int = 0, max_bytes: int = 2_000_000
) -> Iterator[torch.Tensor]:
    """Endless random windows of the byte corpus as int64 token ids, shape ``[batch_size, seq_len]``."""
    data = byte_corpus(max_bytes).long()
    generator = torch.Generator().manual_seed(seed)
    high = data.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + seq_len] for s in starts.tolist()])


class ByteWindowDataset(torch.utils.data.Dataset):
    """Fixed windows of the byte corpus in the ``{"input_ids", "labels"}`` form the HF Trainer expects."""

    def __init__(self, n_samples: int = 512, seq_len: int = 64, seed: int = 0, max_bytes: int = 2_000_000):
        data = byte_corpus(max_bytes).long()
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, data.numel() - seq_len - 1, (n_samples,), generator=generator)
        self.windows = torch.stack([data[s : s + seq_len] for s in starts.tolist()])

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.windows[index]
        return {"input_ids": ids, "labels": ids.clone()}
