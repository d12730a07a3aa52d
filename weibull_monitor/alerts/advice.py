"""What each warning and critical alert tells the user to try (one place, so every message says it the same way),
and how a matrix is named in a message. The evidence behind each piece of advice: docs/alerts.md."""

from __future__ import annotations

from typing import Any

from weibull_monitor.snapshot import keys

__all__ = ["ACTIONS", "short_name"]

ACTIONS = {
    "lr": "try a lower peak learning rate, a longer warm-up, or qk-norm",
    "spike": (
        "check the learning-rate schedule and the last checkpoint restore, and roll back if the loss jumped"
    ),
    "diverged": (
        "training diverged: roll back to the last good checkpoint, then lower the learning rate, keep gradient "
        "clipping on, and check fp16 overflow (bf16 or loss scaling)"
    ),
}


def short_name(key: str, snapshot: Any) -> str:
    """The matrix's short dashboard name (``L3/q``...), else its key."""
    stats = getattr(snapshot, "matrices", {}) or {}
    return keys.short_matrix_name(getattr(stats.get(key), "metric_key", None), key)
