"""The scaling study: train one small model at several (η, λ_wd) settings, from each of several seeds, with the
monitor attached, then read the store back and check the paper's training-dynamics findings against AdamW physics.

Physics (docs/study.md). With AdamW every element moves by about η per step (Adam normalises the
gradient) while decoupled decay shrinks it by η·λ_wd·w. The two balance when the weights' spread reaches an
equilibrium proportional to √(η/λ_wd), and they get there on the timescale τ = 1/(η·λ_wd) steps. So:

* after a few τ (T/τ = Σ η_t·λ_wd >= 3) the Transmission scale λ should be proportional to √(η/λ_wd), whatever
  the starting point: the terminal λ against √(η/λ_wd) is a straight line with Pearson r close to 1;
* λ/√(η/λ_wd) against T/τ should bring every run into one band once T/τ is past ~1 (that is the collapse;
  λ/λ_first itself rises to a different level in each run, because each run has a different equilibrium). The
  proportionality constant is not universal: it depends on how noisy the normalised Adam update is, which changes
  as the loss settles and with η per step (docs/study.md quotes what was measured);
* the shape k is free to move meanwhile: the study records the class medians against T/τ, beside the Gaussian
  anchor and the paper's bands, and claims nothing about them beyond what it measures.

The model starts from a small initialisation (``initializer_range``) so that every equilibrium lies above the
starting scale and λ visibly grows, as it does in the paper's runs.

Regime. The settings keep λ_wd <= 1 and η <= 0.02 and reach T/τ with more steps (τ of 200-300 steps), not with
extreme decay: an earlier preset with λ_wd up to 3.95 and τ of 25-40 steps trained chaotically (loss spikes, the
Selection k jumping to 2.1), and its Pearson r went from 0.85 to 0.997 with the CPU's kernels
(``ATEN_CPU_CAPABILITY`` default, avx2, avx512), i.e. with float rounding. A single training run is always
sensitive to rounding; what the study claims is the law over runs, so every setting is trained from several seeds
(each seed decides both the initial weights and the batch order) and the summary gives r and the slope per seed
with their spread (mean, min, max). docs/study.md quotes the spread measured across kernels and thread counts.

Entry points: :func:`run_study` (train every setting into one store, then analyse), :func:`analyse_store` (read a
store written by it, or any store whose runs used AdamW with decay), :func:`write_figures`, :func:`format_summary`,
and :func:`main` for ``python examples/scaling_study.py`` / ``weibull-monitor study``.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from weibull_monitor.snapshot import keys
from weibull_monitor.snapshot.dynamics import finite_median

__all__ = [
    "RunResult",
    "ScaleLine",
    "Setting",
    "Spread",
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "analyse_store",
    "default_config",
    "format_k_trajectories",
    "format_summary",
    "k_at",
    "main",
    "pearson",
    "quick_config",
    "run_seed",
    "run_study",
    "spearman",
    "write_figures",
]

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


def build_model(config: StudyConfig, seed: int | None = None) -> Any:
    """The study's model, freshly initialised from ``seed`` (default: the config's first seed; byte vocabulary,
    no download)."""
    import torch

    from weibull_monitor.demos.toy import BYTE_VOCAB, tiny_llama

    seed = config.seeds[0] if seed is None else seed
    if config.arch == "llama":
        return tiny_llama(seed, initializer_range=config.initializer_range, **config.model)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    params: dict[str, Any] = {
        "vocab_size": BYTE_VOCAB,
        "max_position_embeddings": max(256, config.seq_len),
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": False,
        **config.model,
    }
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**params))


def train_setting(
    config: StudyConfig,
    setting: Setting,
    store: Any,
    *,
    seed: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one setting from ``seed`` (default: the config's first seed; it decides the initial weights and the
    batch order) with a :class:`WeibullMonitor` writing run ``config.run_name(setting, seed)`` into the SQLite file
    ``store`` (the monitor opens and closes it). Returns what the store does not hold: steps, seconds (wall and
    this process's CPU), final loss."""
    import torch

    from weibull_monitor.demos.toy import byte_batches
    from weibull_monitor.monitor import WeibullMonitor

    seed = config.seeds[0] if seed is None else seed
    name = config.run_name(setting, seed)
    model = build_model(config, seed)
    model.train()
    # the usual AdamW grouping: decay the matrices, not the norms and biases
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": setting.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=setting.lr,
        betas=config.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: config.lr_at(setting, done + 1) / setting.lr
    )
    batches = byte_batches(batch_size=config.batch_size, seq_len=config.seq_len, seed=seed)
    steps, every = config.steps(setting), config.every(setting)
    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    with WeibullMonitor(model, optimizer, every=every, store=store, run_name=name, rules=[]) as monitor:
        monitor.observe(0)  # the initial weights: λ_first, the reference of scale growth
        for step in range(1, steps + 1):
            ids = next(batches)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            monitor.observe(step)
        if steps % every:
            monitor.snapshot(steps)  # the terminal state is always measured
        reached = monitor.last_snapshot.T_over_tau if monitor.last_snapshot is not None else None
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    tail = losses[-max(1, len(losses) // 10) :]
    log(
        f"  {name}: {steps} steps (every {every}), T/τ {reached if reached is not None else math.nan:.2f}, "
        f"final loss {statistics.mean(tail):.3f} (mean of the last 10%), {seconds:.1f} s"
    )
    return {
        "seed": seed,
        "steps": steps,
        "every": every,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "final_loss": statistics.mean(tail),
    }


# ------------------------------------------------------------------------------------------------ statistics


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equal-length series (NaN when undefined: fewer than 2 points, no spread)."""
    if len(x) != len(y):
        raise ValueError("pearson needs two series of the same length")
    if len(x) < 2:
        return math.nan
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for position in range(i, j + 1):  # ties share the mean of their ranks
            ranks[order[position]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of the ranks, ties averaged)."""
    return pearson(_ranks(x), _ranks(y))


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Ordinary least squares y = intercept + slope·x; returns (slope, intercept)."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        return math.nan, math.nan
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    return slope, my - slope * mx


# ------------------------------------------------------------------------------------------------ analysis


@dataclass
class RunResult(_LrWd):
    """One run of the study, read back from the store."""

    name: str
    lr: float  # peak η of the decayed group (from the store's fit rows)
    weight_decay: float
    steps: list[int]
    t_over_tau: list[float]  # per snapshot
    scale: list[float]  # Transmission median λ per snapshot
    growth: list[float]  # Transmission median of λ/λ_first per snapshot
    scale_over_sqrt: list[float]  # Transmission median λ over √(η/λ_wd) (η: the run's peak) per snapshot
    k: dict[str, list[float]]  # class (or "qkv (fused)") -> median k per snapshot (NaN where absent)
    attention_kind: str | None
    seed: int | None = None  # from the run name (``...,seed=N``); None for runs named otherwise

    @property
    def terminal_scale(self) -> float:
        return self.scale[-1]

    @property
    def terminal_growth(self) -> float:
        """λ/λ_first at the last snapshot."""
        return self.growth[-1]

    @property
    def growth_spearman(self) -> float:
        """Rank correlation of λ/λ_first with T/τ over the whole run (1 = rises at every snapshot)."""
        return spearman(self.t_over_tau, self.growth)


@dataclass(frozen=True)
class ScaleLine:
    """Terminal Transmission λ against √(η/λ_wd) over a set of runs (one seed's, or all of them)."""

    seed: int | None  # None: every run of the store pooled (or runs named without a seed)
    n_runs: int
    pearson_r: float  # NaN with fewer than two runs or no spread
    slope: float  # d λ_terminal / d √(η/λ_wd), ordinary least squares with intercept
    intercept: float
    through_origin: float  # λ_terminal ≈ c·√(η/λ_wd), least squares through 0 (the paper's form)

    @classmethod
    def of(cls, runs: Sequence[RunResult], seed: int | None = None) -> ScaleLine:
        x = [r.sqrt_lr_over_wd for r in runs]
        y = [r.terminal_scale for r in runs]
        slope, intercept = linear_fit(x, y) if len(runs) >= 2 else (math.nan, math.nan)
        origin = sum(a * b for a, b in zip(x, y)) / sum(a * a for a in x) if runs else math.nan
        return cls(seed, len(runs), pearson(x, y), slope, intercept, origin)


@dataclass(frozen=True)
class Spread:
    """Mean, min and max of one figure over the seeds (NaN figures left out; ``n`` counts the rest)."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.fmean(finite), min(finite), max(finite), len(finite))

    def __str__(self) -> str:
        return f"mean {self.mean:.4f} (min {self.low:.4f}, max {self.high:.4f}, {self.n} seeds)"


@dataclass
class StudyResult:
    """The study's findings; every number here was computed from the store.

    ``pearson_r``, ``slope``, ``intercept`` and ``through_origin`` are the line through every run, all seeds
    pooled (one point per run); ``per_seed`` holds the same line for each seed's runs alone, and
    :attr:`r_spread` / :attr:`slope_spread` their spread over the seeds: the figures that say how much one
    study's answer owes to its seed (and so to float rounding, which moves a run about as much as a new seed)."""

    runs: list[RunResult]
    pearson_r: float  # terminal Transmission λ against √(η/λ_wd), all runs pooled
    slope: float  # d λ_terminal / d √(η/λ_wd), ordinary least squares with intercept
    intercept: float
    through_origin: float  # λ_terminal ≈ c·√(η/λ_wd), least squares through 0 (the paper's form)
    per_seed: list[ScaleLine] = field(default_factory=list)  # one line per seed (runs named with a seed)
    store: Path | None = None
    figures: list[Path] = field(default_factory=list)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # per run: steps, seconds, final loss
    skipped: dict[str, str] = field(default_factory=dict)  # run name -> why the analysis could not use it

    @property
    def sqrt_span(self) -> float:
        """max / min of √(η/λ_wd) over the runs."""
        xs = [r.sqrt_lr_over_wd for r in self.runs]
        return max(xs) / min(xs)

    @property
    def seeds(self) -> list[int | None]:
        return sorted({r.seed for r in self.runs}, key=lambda s: (s is None, s or 0))

    @property
    def r_spread(self) -> Spread:
        """Pearson r over the seeds (each seed's own line)."""
        return Spread.of([line.pearson_r for line in self.per_seed])

    @property
    def slope_spread(self) -> Spread:
        """The least-squares slope over the seeds (each seed's own line)."""
        return Spread.of([line.slope for line in self.per_seed])


_SEED_SUFFIX = re.compile(r",seed=(\d+)$")


def run_seed(name: str) -> int | None:
    """The seed in a study run's name (``lr=0.005,wd=1,seed=2`` -> 2), None for a name without one."""
    match = _SEED_SUFFIX.search(name)
    return int(match.group(1)) if match else None


def _decayed_rates(fits: list[dict]) -> tuple[float, float] | None:
    """(peak η, λ_wd) of the Transmission matrices' optimizer group at the run's last step."""
    rows = [
        f
        for f in fits
        if f.get("klass") == "transmission" and (f.get("weight_decay") or 0) > 0 and f.get("lr_peak")
    ]
    if not rows:
        return None
    last = max(int(f["step"]) for f in rows)
    rows = [f for f in rows if int(f["step"]) == last]
    return statistics.median(f["lr_peak"] for f in rows), statistics.median(f["weight_decay"] for f in rows)


def load_run_result(store: Any, run: dict[str, Any]) -> tuple[RunResult | None, str | None]:
    """One run's series from an open :class:`RunStore`, or (None, why) when the study cannot use it: no decayed
    Transmission matrices, fewer than two snapshots with T/τ, or no Transmission scale at the last snapshot (a
    diverged run: its weights stopped fitting). Such runs are reported, never silently left out."""
    run_id = int(run["run_id"])
    fits = store.fits(run_id=run_id)
    rates = _decayed_rates(fits)
    if rates is None:
        return None, "no Transmission matrix in an optimizer group with weight decay (λ_wd > 0)"
    metrics: dict[int, dict[str, float]] = {}
    for row in store.aggregates(run_id=run_id):
        if row["value"] is not None:
            metrics.setdefault(int(row["step"]), {})[row["metric"]] = float(row["value"])
    fused: dict[int, list[float]] = {}
    for f in fits:
        if f.get("component") == "qkv" and f.get("ok") and f.get("k") is not None:
            fused.setdefault(int(f["step"]), []).append(float(f["k"]))
    # the initial snapshot (step 0) has no update behind it yet: its T/τ is 0, not missing
    snaps = [
        {**s, "T_over_tau": 0.0} if int(s["step"]) == 0 and s.get("T_over_tau") is None else s
        for s in store.snapshots(run_id)
    ]
    if snaps and TRANSMISSION_SCALE not in metrics.get(int(snaps[-1]["step"]), {}):
        return None, f"no Transmission scale at the last snapshot (step {snaps[-1]['step']}): diverged?"
    snaps = [
        s
        for s in snaps
        if s.get("T_over_tau") is not None and TRANSMISSION_SCALE in metrics.get(int(s["step"]), {})
    ]
    if len(snaps) < 2:
        return None, f"{len(snaps)} snapshot(s) with T/τ and a Transmission scale; at least 2 needed"
    steps = [int(s["step"]) for s in snaps]
    classes = ("selection", "value", "transmission")
    k = {c: [metrics[s].get(K_MEDIAN.format(klass=c), math.nan) for s in steps] for c in classes}
    if fused:
        k["qkv (fused)"] = [finite_median(fused.get(s, [])) for s in steps]
    kinds = [s.get("attention_kind") for s in snaps if s.get("attention_kind")]
    result = RunResult(
        name=str(run["name"]),
        lr=rates[0],
        weight_decay=rates[1],
        steps=steps,
        t_over_tau=[float(s["T_over_tau"]) for s in snaps],
        scale=[metrics[s][TRANSMISSION_SCALE] for s in steps],
        growth=[metrics[s].get(TRANSMISSION_GROWTH, math.nan) for s in steps],
        # over the run's peak η (the stored per-snapshot ratio uses the peak so far, small during warmup)
        scale_over_sqrt=[metrics[s][TRANSMISSION_SCALE] / math.sqrt(rates[0] / rates[1]) for s in steps],
        k=k,
        attention_kind=kinds[-1] if kinds else run.get("attention_kind"),
        seed=run_seed(str(run["name"])),
    )
    return result, None


def analyse_store(store_path: str | Path) -> StudyResult:
    """Read every usable run of a store and compute the scaling figures. StudyError when fewer than two runs
    with decayed Transmission matrices are there (no line to fit)."""
    from weibull_monitor.store import RunStore

    path = Path(store_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such run store")
    runs: list[RunResult] = []
    skipped: dict[str, str] = {}
    with RunStore(path) as store:
        for run in store.runs():
            result, reason = load_run_result(store, run)
            if result is None:
                skipped[str(run["name"])] = reason or "unusable"
            else:
                runs.append(result)
    if len(runs) < 2:
        why = "".join(f"; {name}: {reason}" for name, reason in skipped.items())
        raise StudyError(
            f"{path}: {len(runs)} usable run(s) with decayed Transmission matrices and T/τ; "
            f"the study needs at least two{why}"
        )
    runs.sort(key=lambda r: (r.seed is None, r.seed or 0, r.sqrt_lr_over_wd, r.tau))
    pooled = ScaleLine.of(runs)
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    return StudyResult(
        runs=runs,
        pearson_r=pooled.pearson_r,
        slope=pooled.slope,
        intercept=pooled.intercept,
        through_origin=pooled.through_origin,
        per_seed=[ScaleLine.of([r for r in runs if r.seed == seed], seed) for seed in seeds],
        store=path,
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------------------ output


def _fmt_k(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    return f"{finite[0]:.3f}→{finite[-1]:.3f}"


def format_summary(result: StudyResult) -> str:
    """The printed table: one row per run, then the fitted line (all runs pooled) and, with several seeds, each
    seed's line and the spread of r and of the slope over the seeds."""
    fused = any("qkv (fused)" in r.k for r in result.runs)
    width = _name_width(result)
    header = (
        f"{'run':<{width}} {'√(η/λwd)':>8} {'τ':>6} {'T/τ':>5} {'λ_first':>8} {'λ_end':>8} {'λ_end/λ_first':>13} "
        f"{'ρ(λ/λ₀,T/τ)':>11} {'λ_end/√(η/λwd)':>14} {'sel k':>13} {'trans k':>13}"
        + (f" {'qkv k':>13}" if fused else "")
    )
    lines = [header, "-" * len(header)]
    for name, reason in result.skipped.items():
        lines.append(f"{name:<{width}} skipped: {reason}")
    for r in result.runs:
        first = r.scale[0] / r.growth[0] if r.growth[0] else math.nan
        lines.append(
            f"{r.name:<{width}} {r.sqrt_lr_over_wd:>8.4f} {r.tau:>6.0f} {r.t_over_tau[-1]:>5.2f} {first:>8.4f} "
            f"{r.terminal_scale:>8.4f} {r.terminal_growth:>13.2f} {r.growth_spearman:>+11.2f} "
            f"{r.scale_over_sqrt[-1]:>14.3f} {_fmt_k(r.k['selection']):>13} {_fmt_k(r.k['transmission']):>13}"
            + (f" {_fmt_k(r.k.get('qkv (fused)', [])):>13}" if fused else "")
        )
    lines.append("")
    settings = len({(round(r.sqrt_lr_over_wd, 6), round(r.tau, 3)) for r in result.runs})
    seeds = result.seeds
    runs = f"{len(result.runs)} runs" + (
        f" ({settings} settings, {len(seeds)} seeds)" if len(seeds) > 1 else ""
    )
    lines.append(
        f"terminal Transmission median λ against √(η/λ_wd) over {runs} "
        f"(span {result.sqrt_span:.1f}x): Pearson r = {result.pearson_r:.4f}, "
        f"slope = {result.slope:.4f}, intercept = {result.intercept:+.5f}; "
        f"through the origin λ ≈ {result.through_origin:.4f}·√(η/λ_wd) (Pythia, mean λ of W_o and FFN: 0.087)"
    )
    if len(result.per_seed) > 1:
        lines.append(
            f"over the seeds, each seed's own line: Pearson r {result.r_spread}; slope {result.slope_spread}"
        )
        for line in result.per_seed:
            lines.append(
                f"  seed {line.seed}: {line.n_runs} runs, Pearson r = {line.pearson_r:.4f}, slope = {line.slope:.4f}, "
                f"intercept = {line.intercept:+.5f}, through the origin {line.through_origin:.4f}"
            )
    by_tau: dict[int, list[float]] = {}
    for r in result.runs:
        by_tau.setdefault(round(r.tau), []).append(r.scale_over_sqrt[-1])
    if len(by_tau) > 1:  # the constant is not universal: show it per clock
        lines.append(
            "terminal λ/√(η/λ_wd) by τ: "
            + "; ".join(
                f"τ = {tau}: {statistics.mean(v):.3f} (mean of {len(v)}, {min(v):.3f} to {max(v):.3f})"
                for tau, v in sorted(by_tau.items())
            )
        )
    for panel in ("selection", "qkv (fused)"):
        if any(panel in r.k for r in result.runs):
            lines.append("")
            lines.extend(format_k_trajectories(result, panel))
    return "\n".join(lines)


def _name_width(result: StudyResult) -> int:
    return max([22, *(len(r.name) for r in result.runs), *(len(name) for name in result.skipped)])


def k_at(run: RunResult, panel: str, t_over_tau: float) -> float:
    """The class-median k of ``panel`` at the snapshot nearest to ``t_over_tau`` (NaN when not recorded)."""
    values = run.k.get(panel)
    if not values:
        return math.nan
    nearest = min(range(len(run.t_over_tau)), key=lambda i: abs(run.t_over_tau[i] - t_over_tau))
    return values[nearest]


def format_k_trajectories(result: StudyResult, panel: str = "selection") -> list[str]:
    """Median k of ``panel`` at whole T/τ (nearest snapshot), one row per run."""
    end = min(math.floor(r.t_over_tau[-1] + 1e-9) for r in result.runs)
    marks = list(range(end + 1))
    width = _name_width(result)
    lines = [
        f"{panel} median k at T/τ ≈ " + ", ".join(map(str, marks)) + " (nearest snapshot)",
        f"{'run':<{width}} " + " ".join(f"{m:>6}" for m in marks),
    ]
    for r in result.runs:
        lines.append(f"{r.name:<{width}} " + " ".join(f"{k_at(r, panel, m):>6.3f}" for m in marks))
    return lines


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.05 + 0.85 * i / max(1, n - 1)) for i in range(n)]


def _setting_key(r: RunResult) -> tuple[float, float]:
    return round(r.sqrt_lr_over_wd, 6), round(r.tau, 3)


def _styles(runs: list[RunResult]) -> list[tuple[Any, str, str | None]]:
    """(colour, marker, legend label) per run: one colour per setting (its seeds share it, and only the first run of
    a setting is labelled), one marker per τ."""
    keys = sorted({_setting_key(r) for r in runs})
    colours = dict(zip(keys, _colours(len(keys))))
    seen: set[tuple[float, float]] = set()
    styles = []
    for r, marker in zip(runs, _markers(runs)):
        key = _setting_key(r)
        label = None if key in seen else _label(r)
        seen.add(key)
        styles.append((colours[key], marker, label))
    return styles


def _label(r: RunResult) -> str:
    return f"√(η/λwd)={r.sqrt_lr_over_wd:.3f}, τ={r.tau:.0f}"


def _markers(runs: list[RunResult]) -> list[str]:
    """One marker per distinct τ, so runs on different clocks stay apart in every figure."""
    taus = sorted({round(r.tau) for r in runs})
    shapes = "osD^vP*X"
    return [shapes[taus.index(round(r.tau)) % len(shapes)] for r in runs]


def write_figures(result: StudyResult, out_dir: str | Path) -> list[Path]:
    """study_scale.png, study_growth.png, study_k.png under ``out_dir`` (matplotlib, Agg, no pyplot state)."""
    from matplotlib.figure import Figure

    from weibull_monitor.estimator import K_GAUSSIAN
    from weibull_monitor.models import expectations

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    styles = _styles(result.runs)
    seeds = len(result.seeds)
    paths = [out / name for name in FIGURE_NAMES]

    fig = Figure(figsize=(6.5, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    xs = [r.sqrt_lr_over_wd for r in result.runs]
    for r, (colour, marker, label) in zip(result.runs, styles):
        ax.scatter(
            [r.sqrt_lr_over_wd],
            [r.terminal_scale],
            color=colour,
            marker=marker,
            s=45,
            zorder=3,
            alpha=0.8,
            label=label,
        )
    top = max(xs) * 1.1
    ax.plot(
        [0, top],
        [result.intercept, result.intercept + result.slope * top],
        color="black",
        lw=1,
        label=f"least squares{f' ({seeds} seeds pooled)' if seeds > 1 else ''}: slope {result.slope:.3f}, "
        f"r = {result.pearson_r:.3f}",
    )
    ax.plot(
        [0, top],
        [0, result.through_origin * top],
        color="grey",
        ls=":",
        lw=1,
        label=f"through 0: λ = {result.through_origin:.3f}·√(η/λwd)",
    )
    ax.set_xlim(0, top)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("√(η/λ_wd)")
    ax.set_ylabel("terminal median λ, Transmission (W_o, FFN)")
    ax.set_title(
        "terminal scale against √(η/λ_wd)"
        + (f": r per seed {result.r_spread.low:.3f} to {result.r_spread.high:.3f}" if seeds > 1 else "")
    )
    ax.legend(fontsize=7)
    fig.savefig(paths[0])

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    growth_ax, ratio_ax = fig.subplots(1, 2)
    for r, (colour, marker, label) in zip(result.runs, styles):
        style = {"marker": marker, "ms": 3, "color": colour, "label": label}
        growth_ax.plot(r.t_over_tau, r.growth, **style)
        ratio_ax.plot(r.t_over_tau, r.scale_over_sqrt, **style)
    growth_ax.axhline(1.0, color="black", lw=0.8, ls="--")
    growth_ax.set_xlabel("T/τ = Σ η_t·λ_wd")
    growth_ax.set_ylabel("λ / λ_first (Transmission median)")
    growth_ax.set_title("scale growth: each run rises to its own equilibrium")
    ratio_ax.set_xlabel("T/τ = Σ η_t·λ_wd")
    ratio_ax.set_ylabel("λ / √(η/λ_wd) (Transmission median; η: peak)")
    ratio_ax.set_title("scale over √(η/λ_wd): one band for every run")
    ratio_ax.set_ylim(bottom=0)
    for axis in (growth_ax, ratio_ax):
        axis.legend(fontsize=7)
    fig.savefig(paths[1])

    panels = ["selection", "value", "transmission"]
    if any("qkv (fused)" in r.k for r in result.runs):
        panels.insert(0, "qkv (fused)")
    fig = Figure(figsize=(4.2 * len(panels), 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    kind = result.runs[0].attention_kind
    for ax, panel in zip(axes, panels):
        band_class = "selection" if panel in ("selection", "qkv (fused)") else panel
        band = expectations.expected_band(band_class, "fused" if panel == "qkv (fused)" else kind)
        if band is not None:
            ax.axhspan(band.low, band.high, color="#1f77b4", alpha=0.12, lw=0, label=f"paper: {band}")
        ax.axhline(K_GAUSSIAN, color="black", lw=0.8, ls="--", label=f"Gaussian anchor {K_GAUSSIAN:.4f}")
        for r, (colour, marker, label) in zip(result.runs, styles):
            values = r.k.get(panel)
            if values:
                ax.plot(r.t_over_tau, values, marker=marker, ms=3, color=colour, label=label)
        ax.set_xlabel("T/τ")
        ax.set_title(f"{panel} median k")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("median k")
    fig.suptitle(f"class-median k against T/τ (attention: {kind or 'unknown'})")
    fig.savefig(paths[2])
    result.figures = paths
    return paths


# ------------------------------------------------------------------------------------------------ the study


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Train every setting of ``config`` into ``<out_dir>/study.sqlite`` (one run per setting), analyse the store,
    write the figures (when matplotlib is there and ``figures``) and return the result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "study.sqlite"
    if store_path.exists():
        if not overwrite:
            raise FileExistsError(
                f"{store_path} exists; pass overwrite=True (--overwrite) to start it afresh"
            )
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    import torch

    seeds = ", ".join(map(str, config.seeds))
    log(
        f"scaling study: {config.arch}, {len(config.settings)} settings x seed{'s' * (len(config.seeds) > 1)} "
        f"{seeds}, each to T/τ = {config.t_over_tau:g}; torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s); store {store_path}"
    )
    training = {}
    for seed in config.seeds:
        for setting in config.settings:
            training[config.run_name(setting, seed)] = train_setting(
                config, setting, store_path, seed=seed, log=log
            )
    result = analyse_store(store_path)
    result.training = training
    if figures:
        write_figures(result, out)
    return result


def _setting_argument(text: str) -> Setting:
    try:
        return Setting.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seeds_argument(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds are integers separated by commas (e.g. 0,1,2), got {text!r}"
        ) from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"seeds are distinct integers >= 0, got {text!r}")
    return seeds


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The study's options (shared by ``examples/scaling_study.py`` and ``weibull-monitor study``)."""
    parser = parser or argparse.ArgumentParser(
        prog="scaling_study", description="Reproduce the paper's scale-dynamics findings on a CPU."
    )
    parser.add_argument("--quick", action="store_true", help="the small CI run (about a minute of CPU)")
    parser.add_argument(
        "--arch",
        choices=("llama", "neox"),
        default="llama",
        help="llama: tiny LLaMA (GQA); neox: GPT-NeoX with fused query_key_value",
    )
    parser.add_argument("--out", metavar="DIR", default="weibull-study", help="output directory")
    parser.add_argument(
        "--setting",
        action="append",
        metavar="LR:WD",
        type=_setting_argument,
        help="an (η, λ_wd) setting, repeatable (replaces the preset's settings)",
    )
    parser.add_argument("--t-over-tau", type=float, default=None, help="train each setting to this T/τ")
    parser.add_argument("--snapshots", type=int, default=None, help="snapshots per run (at least)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="train every setting from this one seed")
    seeds.add_argument(
        "--seeds",
        type=_seeds_argument,
        default=None,
        metavar="S,S,...",
        help="train every setting from each of these seeds (the presets: 0,1,2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is too small to share)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <out>/study.sqlite")
    parser.add_argument(
        "--analyse-only", action="store_true", help="train nothing: analyse <out>/study.sqlite again"
    )
    parser.add_argument("--no-figures", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    config = quick_config(args.arch) if args.quick else default_config(args.arch)
    changes: dict[str, Any] = {}
    if args.setting:
        changes["settings"] = tuple(args.setting)
    if args.t_over_tau is not None:
        changes["t_over_tau"] = args.t_over_tau
    if args.snapshots is not None:
        changes["snapshots"] = args.snapshots
    if args.seed is not None:
        changes["seeds"] = (args.seed,)
    if getattr(args, "seeds", None) is not None:
        changes["seeds"] = args.seeds
    return replace(config, **changes) if changes else config


def run_from_args(args: argparse.Namespace) -> int:
    """Run (or re-analyse) the study and print the table; 0 on success, 2 (with a one-line message) when the
    store is missing, already there without ``--overwrite``, or holds too little to analyse."""
    import torch

    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(args.out)
    try:
        if args.analyse_only:
            result = analyse_store(out / "study.sqlite")
            if not args.no_figures:
                write_figures(result, out)
        else:
            torch.set_num_threads(max(1, args.threads))
            config = config_from_args(args)
            result = run_study(config, out, overwrite=args.overwrite, figures=not args.no_figures)
    except (FileNotFoundError, FileExistsError, StudyError) as error:
        print(f"scaling study: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print()
    print(format_summary(result))
    for path in result.figures:
        print(f"figure: {path}")
    print(
        f"store: {result.store}  ({time.perf_counter() - started:.0f} s wall, "
        f"{time.process_time() - cpu_started:.0f} s CPU in this process)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))
