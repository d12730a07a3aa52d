"""T/τ: the training budget in units of the AdamW timescale τ = 1/(η·λ_wd), per optimizer parameter group.

Plain numbers in, plain numbers out (a tensor learning rate is accepted and kept as a tensor, so recording it never
forces a device sync). docs/monitor.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TimescaleBudget", "to_float"]

NAN = math.nan


def to_float(x: Any) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


def _max(a: Any, b: Any) -> Any:
    if hasattr(a, "item") or hasattr(b, "item"):  # tensor learning rates: stay on device, no sync per step
        import torch

        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


class TimescaleBudget:
    """T/τ = Σ_t η_t·λ_wd per optimizer parameter group: the training budget in units of the AdamW timescale
    τ = 1/(η·λ_wd) (decoupled decay; docs/monitor.md), plus the peak η seen per group.

    ``record`` is called once per optimizer update with the (η, λ_wd) of every group as used by that update.
    A group that never had λ_wd > 0 has an undefined budget (NaN), never 0 or inf.
    """

    def __init__(self) -> None:
        self._sums: list[Any] = []
        self._peaks: list[Any] = []
        self._decayed: list[bool] = []
        self.updates = 0

    def _grow(self, n: int) -> None:
        while len(self._sums) < n:
            self._sums.append(0.0)
            self._peaks.append(0.0)
            self._decayed.append(False)

    def record(self, rates: Sequence[tuple[Any, Any]], updates: int = 1) -> None:
        """Add ``updates`` optimizer updates made at the given per-group (η, λ_wd)."""
        if updates <= 0:
            return
        self._grow(len(rates))
        for group, (lr, wd) in enumerate(rates):
            self._sums[group] = self._sums[group] + updates * (lr * wd)
            self._peaks[group] = _max(self._peaks[group], lr)
            if not self._decayed[group]:
                self._decayed[group] = to_float(wd) > 0
        self.updates += updates

    def budget(self, group: int) -> float:
        """Σ η_t·λ_wd of a group; NaN if the group is unknown or never had weight decay."""
        if group is None or not 0 <= group < len(self._sums) or not self._decayed[group]:
            return NAN
        return to_float(self._sums[group])

    def peak_lr(self, group: int) -> float:
        if group is None or not 0 <= group < len(self._peaks) or self.updates == 0:
            return NAN
        return to_float(self._peaks[group])

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": [to_float(s) for s in self._sums],
            "peaks": [to_float(p) for p in self._peaks],
            "decayed": list(self._decayed),
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sums = [float(s) for s in state["sums"]]
        self._peaks = [float(p) for p in state["peaks"]]
        self._decayed = [bool(d) for d in state["decayed"]]
        self.updates = int(state["updates"])
