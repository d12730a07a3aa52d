"""The study's settings: (η, λ_wd) pairs, the presets and the configuration of one study."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from weibull_monitor.snapshot import keys

EXIT_USAGE = 2


class StudyError(ValueError):
    """A study that cannot run (fewer than two settings, unknown architecture) or a store it cannot analyse
    (fewer than two runs with decayed Transmission matrices and T/τ)."""


TRANSMISSION_SCALE = keys.class_metric("transmission", "scale_median")
TRANSMISSION_GROWTH = keys.class_metric("transmission", "scale_growth")
K_MEDIAN = keys.class_metric("{klass}", "k_median")
FIGURE_NAMES = ("study_scale.png", "study_growth.png", "study_k.png")


# ------------------------------------------------------------------------------------------------ settings


class _LrWd:
    """√(η/λ_wd) and τ for a record with ``lr`` and ``weight_decay`` fields."""

    lr: float
    weight_decay: float

    @property
    def sqrt_lr_over_wd(self) -> float:
        return math.sqrt(self.lr / self.weight_decay)

    @property
    def tau(self) -> float:
        """τ = 1/(η·λ_wd), in optimizer steps."""
        return 1.0 / (self.lr * self.weight_decay)


@dataclass(frozen=True)
class Setting(_LrWd):
    """One AdamW setting: peak learning rate η and decoupled weight decay λ_wd (both > 0)."""

    lr: float
    weight_decay: float

    def __post_init__(self) -> None:
        for label, value in (("lr", self.lr), ("weight_decay", self.weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"a study setting needs {label} > 0 (finite), got {value!r}")

    @classmethod
    def from_ratio(cls, sqrt_lr_over_wd: float, tau_steps: float) -> Setting:
        """The setting with √(η/λ_wd) = ``sqrt_lr_over_wd`` and τ = 1/(η·λ_wd) = ``tau_steps`` steps."""
        return cls(
            lr=sqrt_lr_over_wd / math.sqrt(tau_steps),
            weight_decay=1.0 / (sqrt_lr_over_wd * math.sqrt(tau_steps)),
        )

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``"LR:WD"``, e.g. ``"4e-3:2.5"``."""
        try:
            lr, wd = (float(part) for part in text.split(":"))
        except ValueError:
            raise ValueError(f"a setting is LR:WD (e.g. 4e-3:2.5), got {text!r}") from None
        return cls(lr, wd)

    @property
    def name(self) -> str:
        return f"lr={self.lr:.3g},wd={self.weight_decay:.3g}"


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a study run. Model sizes are passed to the architecture's config class."""

    settings: tuple[Setting, ...]
    arch: str = "llama"  # "llama" (tiny LLaMA, GQA) or "neox" (GPT-NeoX, fused query_key_value)
    model: dict[str, Any] = field(default_factory=dict)
    initializer_range: float = 0.006  # small init: every equilibrium lies above the starting scale
    # every setting is trained once from each seed (the seed decides the initial weights and the batch order)
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 8
    seq_len: int = 64
    t_over_tau: float = 5.0  # train each setting until Σ η_t·λ_wd reaches this
    # linear warmup over this many τ, then constant η: a full-rate start grows λ coherently for a few steps and
    # overshoots the equilibrium (measured on the quick preset with 0.1 τ of warmup: λ/√(η/λ_wd) peaked at 0.52-0.60
    # near T/τ 0.5 and fell to 0.30-0.37 by T/τ 3.5), which turns the rise of λ/λ_first into a fall
    warmup_tau: float = 1.0
    snapshots: int = 40  # at least this many snapshots per run (plus the initial one)
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0

    def __post_init__(self) -> None:
        if len(self.settings) < 2:
            raise StudyError("a scaling study needs at least two (lr, weight_decay) settings")
        if self.arch not in ("llama", "neox"):
            raise StudyError(f"arch must be 'llama' or 'neox', got {self.arch!r}")
        names = [s.name for s in self.settings]
        if len(set(names)) < len(names):  # one run per setting: equal names would resume one run
            raise StudyError(f"two settings share a run name (equal to 3 significant digits): {names}")
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise StudyError(f"a study needs at least one seed and no seed twice, got {self.seeds!r}")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise StudyError(f"seeds are integers >= 0, got {seed!r}")
        if self.t_over_tau <= 0 or self.snapshots < 1 or self.warmup_tau < 0:
            raise StudyError("t_over_tau must be > 0, snapshots >= 1 and warmup_tau >= 0")

    @staticmethod
    def run_name(setting: Setting, seed: int) -> str:
        """The run's name in the store: the setting's name and the seed (read back by :func:`run_seed`)."""
        return f"{setting.name},seed={seed}"

    def warmup_steps(self, setting: Setting) -> int:
        return max(1, round(self.warmup_tau * setting.tau))

    def lr_at(self, setting: Setting, update: int) -> float:
        """η of the ``update``-th optimizer update (1-based): linear warmup, then constant."""
        warmup = self.warmup_steps(setting)
        return setting.lr * min(1.0, update / warmup)

    def steps(self, setting: Setting) -> int:
        """Optimizer updates until Σ η_t·λ_wd reaches :attr:`t_over_tau` under this schedule."""
        budget, update = 0.0, 0
        while budget < self.t_over_tau * (1 - 1e-12):
            update += 1
            budget += self.lr_at(setting, update) * setting.weight_decay
        return update

    def every(self, setting: Setting) -> int:
        return max(1, self.steps(setting) // self.snapshots)


# hidden 128 rather than the toy's 64: a 128x128 W_q has 16k elements, which halves the noise of each k
# (sd 1.365/√n, docs/estimator.md §4) and keeps the Selection trajectories readable; it costs ~2x the CPU time
_LLAMA_DEFAULT = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2}
_NEOX_DEFAULT = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def _geometric(first: float, last: float, n: int) -> tuple[float, ...]:
    """``n`` values from ``first`` to ``last`` in equal ratios (rounded to 4 significant digits)."""
    return tuple(float(f"{first * (last / first) ** (i / (n - 1)):.4g}") for i in range(n))


def default_config(arch: str = "llama") -> StudyConfig:
    """The documented run: five settings spanning 4x in √(η/λ_wd) (0.0707 to 0.283) at τ of 200 and 300 steps
    (λ_wd 0.25 to 1.0, η 0.005 to 0.02), each to T/τ = 4, from three seeds (16,200 steps in all)."""
    ratios = _geometric(0.0707, 0.2828, 5)
    taus = (200, 300, 200, 300, 200)
    return StudyConfig(
        settings=tuple(Setting.from_ratio(x, t) for x, t in zip(ratios, taus)),
        arch=arch,
        model=dict(_LLAMA_DEFAULT if arch == "llama" else _NEOX_DEFAULT),
        seeds=(0, 1, 2),
        t_over_tau=4.0,
    )


def quick_config(arch: str = "llama") -> StudyConfig:
    """The CI run: four settings spanning 4x in √(η/λ_wd) (0.0707 to 0.283, τ of 200 and 300 steps, λ_wd 0.20 to
    1.0) on a smaller model, to T/τ = 3, from three seeds (10,500 steps in all, ~45 s of CPU time)."""
    ratios = _geometric(0.0707, 0.2828, 4)
    taus = (200, 300, 200, 300)
    model = {"hidden_size": 32, "intermediate_size": 86, "num_hidden_layers": 2}
    if arch == "neox":
        model = {
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
    return StudyConfig(
        settings=tuple(Setting.from_ratio(x, t) for x, t in zip(ratios, taus)),
        arch=arch,
        model=model,
        batch_size=4,
        seq_len=32,
        t_over_tau=3.0,
        snapshots=30,
        seeds=(0, 1, 2),
    )


# ------------------------------------------------------------------------------------------------ training
