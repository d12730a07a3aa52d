"""The one place the suite imports the package's toy corpus and demo recipe (``weibull_monitor.demos``):
everything else imports from here."""

from __future__ import annotations

import importlib
from typing import Any

from weibull_monitor.demos.toy import BYTE_VOCAB, ByteWindowDataset, byte_batches, tiny_llama

__all__ = ["BYTE_VOCAB", "ByteWindowDataset", "byte_batches", "demo_recipe", "tiny_llama"]

#: The names read from the demo module (values: the recipe as of this writing, overridden by the module's).
_DEMO_FALLBACK = {
    "DEFAULT_STEPS": 600,
    "BATCH_SIZE": 8,
    "SEQ_LEN": 64,
    "LEARNING_RATE": 3e-3,
    "WEIGHT_DECAY": 0.1,
    "SNAPSHOTS": 30,
    "DEMO_MODEL": {
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
}


def demo_recipe() -> dict[str, Any]:
    """``weibull-monitor demo``'s model, dataset and hyper-parameters (read from the demo module when present)."""
    values = dict(_DEMO_FALLBACK)
    module = importlib.import_module("weibull_monitor.demos.demo")
    values.update({k: getattr(module, k) for k in _DEMO_FALLBACK if hasattr(module, k)})
    seq_len, batch = values["SEQ_LEN"], values["BATCH_SIZE"]
    return {
        "model": lambda seed: tiny_llama(seed, **values["DEMO_MODEL"]),
        "dataset": lambda steps, seed: ByteWindowDataset(
            n_samples=min(max(steps * batch, 64), 8192), seq_len=seq_len, seed=seed
        ),
        "steps": values["DEFAULT_STEPS"],
        "snapshots": values["SNAPSHOTS"],
        "lr": values["LEARNING_RATE"],
        "weight_decay": values["WEIGHT_DECAY"],
        "batch": batch,
        "seq_len": seq_len,
    }
