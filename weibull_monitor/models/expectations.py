"""What the paper measured, as data: the bands a class of matrices is expected to sit in.

These are reference figures quoted beside measurements (reports, CLI tables, alert messages); they never
force a matrix into a class. Sources: docs/roles.md (classes) and docs/monitor.md (thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Band:
    """A closed interval of Weibull shape k with a short description of where it comes from."""

    low: float
    high: float
    label: str

    def contains(self, k: float) -> bool:
        return self.low <= k <= self.high

    def __str__(self) -> str:
        return f"{self.label} k in [{self.low:.2f}, {self.high:.2f}]"


#: Terminal median k of the Transmission class (FFN, W_o) across 12 models (paper).
TRANSMISSION_TERMINAL = Band(1.186, 1.204, "transmission")
#: Selection class (W_q, W_k) terminal medians by how attention stores Q and K (paper).
SELECTION_TERMINAL = {
    "deep": Band(0.76, 0.99, "deep selection (separate Q/K)"),
    "mild": Band(1.10, 1.16, "mild selection (GQA)"),
    "transitional": Band(1.05, 1.18, "transitional selection (fused QKV)"),
}
#: Which Selection expectation applies to a model's attention kind.
SELECTION_EXPECTATION_BY_ATTENTION = {
    "mha": "deep",
    "gqa": "mild",
    "mqa": "mild",
    "fused": "transitional",
}

# The paper's reference-library thresholds (docs/monitor.md); alert rules take these as defaults.
TRANSMISSION_BAND = (1.18, 1.21)
STRONG_SELECTION_BELOW = 0.95
R2_WEIBULL_MIN = 0.95
AT_INIT_TOLERANCE = 0.01

#: Pythia's within-family constant: terminal lambda ~= 0.087 * sqrt(lr / weight_decay). Does not carry across families.
PYTHIA_SCALE_PER_SQRT_LR_WD = 0.087


def selection_expectation(attention_kind: str | None) -> str | None:
    """'deep', 'mild' or 'transitional' for an attention kind ('mha', 'gqa', 'mqa', 'fused'); None if unknown."""
    if attention_kind is None:
        return None
    return SELECTION_EXPECTATION_BY_ATTENTION.get(attention_kind)


def expected_band(klass: str, attention_kind: str | None = None) -> Band | None:
    """The paper's terminal band for a class ('transmission', 'selection'), or None where the paper gives none."""
    if klass == "transmission":
        return TRANSMISSION_TERMINAL
    if klass == "selection":
        expectation = selection_expectation(attention_kind)
        return SELECTION_TERMINAL.get(expectation) if expectation else None
    return None
