"""Run specifications, the full and quick suites, and the calibration / held-out split.

A :class:`RunSpec` is everything that decides a run (architecture, seed, optimiser settings, schedule, injected
events) plus the *design intent* (``intent``: what the run was built to show). The intent is not the label: labels
come from the ground-truth signals (``labels.py``) and may disagree with the intent (a run built to fail that
trains fine is labelled healthy, and the report says so).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

#: Architectures whose runs are held out whole (never used to tune a rule).
HELD_OUT_ARCHS = ("llama_gqa", "qwen3_gqa", "torch_encoder", "demo_llama")
#: Seeds held out on the other architectures.
HELD_OUT_SEEDS = (3,)


@dataclass(frozen=True)
class RunSpec:
    arch: str
    seed: int
    intent: str  # healthy | control | lr_too_high | divergence | no_wd | lr_spike | corrupt_reinit | corrupt_scale | selection_deep
    lr: float
    weight_decay: float
    steps: int
    warmup: int = 20
    schedule: str = "constant"  # constant | cosine (to 10% of the peak), both after a linear warm-up
    batch: int = 16
    seq_len: int = 128
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    every: int = 10
    events: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    tag: str = ""  # distinguishes otherwise equal specs

    @property
    def name(self) -> str:
        parts = [self.intent, self.arch, f"s{self.seed}", f"lr{self.lr:g}", f"wd{self.weight_decay:g}"]
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)

    @property
    def split(self) -> str:
        if self.arch in HELD_OUT_ARCHS or self.seed in HELD_OUT_SEEDS:
            return "heldout"
        return "calibration"

    @property
    def cause_step(self) -> int:
        """The first step at which the run can be 'wrong' by design: an injected event's step, else 0."""
        return min((int(e["step"]) for e in self.events), default=0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["events"] = [dict(e) for e in self.events]
        d["name"], d["split"], d["cause_step"] = self.name, self.split, self.cause_step
        return d

    def digest(self) -> str:
        d = asdict(self)
        d["events"] = [dict(e) for e in self.events]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def lr_at(spec: RunSpec, step: int) -> float:
    """η used by update number ``step`` (1-based): warm-up, schedule, then any lr-spike event on top."""
    if spec.warmup and step <= spec.warmup:
        lr = spec.lr * step / spec.warmup
    elif spec.schedule == "cosine":
        import math

        progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        lr = spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    else:
        lr = spec.lr
    for event in spec.events:
        if event["kind"] == "lr_spike" and event["step"] <= step < event["step"] + event["length"]:
            lr *= event["factor"]
    return lr


# ------------------------------------------------------------------------------------------------ suites

LLAMA_LIKE = ("llama_mha", "llama_gqa")
MAIN_ARCHS = ("llama_mha", "llama_gqa", "neox")
CONTROL_OF = {"llama_mha": "qwen3_mha", "llama_gqa": "qwen3_gqa"}


def _healthy(arch: str, seed: int) -> list[RunSpec]:
    """Two healthy settings per (arch, seed), alternating so that the suite spans lr 1e-3..3e-3, wd 0.3..1,
    warm-up 20..50, constant and cosine schedules, batch 16 and 32; T/τ >= 0.5 in each."""
    settings = [
        dict(lr=2e-3, weight_decay=1.0, steps=600, warmup=30, schedule="cosine"),
        dict(lr=1e-3, weight_decay=1.0, steps=700, warmup=50, schedule="constant"),
        dict(lr=3e-3, weight_decay=0.3, steps=600, warmup=20, schedule="constant"),
        dict(lr=3e-3, weight_decay=0.4, steps=900, warmup=40, schedule="cosine", batch=32, seq_len=64),
    ]
    chosen = [settings[seed % 4], settings[(seed + 2) % 4]]
    return [RunSpec(arch, seed, "healthy", **s) for s in chosen]


def _failing(arch: str, seed: int) -> list[RunSpec]:
    """One run of every failure mode per (arch, seed); the learning rates alternate across seeds."""
    high = (3e-2, 1e-1)[seed % 2]
    base = dict(lr=2e-3, weight_decay=0.5, warmup=30, schedule="constant")
    return [
        RunSpec(arch, seed, "lr_too_high", lr=high, weight_decay=0.1, steps=300),
        RunSpec(
            arch,
            seed,
            "divergence",
            lr=(1.0, 0.3)[seed % 2],
            weight_decay=0.1,
            steps=300,
            warmup=100,
            grad_clip=None,
        ),
        RunSpec(arch, seed, "no_wd", lr=(5e-3, 1e-2)[seed % 2], weight_decay=0.0, steps=500),
        RunSpec(
            arch,
            seed,
            "lr_spike",
            steps=500,
            **base,
            events=({"kind": "lr_spike", "step": 250, "factor": (30.0, 50.0)[seed % 2], "length": 30},),
        ),
        RunSpec(
            arch,
            seed,
            "corrupt_reinit",
            steps=500,
            **base,
            events=({"kind": "reinit", "step": 250, "layer": seed % 2, "std": 0.2},),
        ),
        RunSpec(
            arch,
            seed,
            "corrupt_scale",
            steps=500,
            **base,
            events=({"kind": "scale", "step": 250, "layer": seed % 2, "factor": 8.0, "what": "qk"},),
        ),
    ]


def _controls(arch: str, seed: int) -> list[RunSpec]:
    """The qk-norm twin of the too-high-lr run: same optimiser, same data, q/k RMS-normalised per head."""
    control = CONTROL_OF.get(arch)
    if control is None:
        return []
    high = (3e-2, 1e-1)[seed % 2]
    return [RunSpec(control, seed, "control", lr=high, weight_decay=0.1, steps=300)]


def full_suite(seeds: tuple[int, ...] = (0, 1, 2, 3)) -> list[RunSpec]:
    specs: list[RunSpec] = []
    for seed in seeds:
        for arch in MAIN_ARCHS:
            specs += _healthy(arch, seed) + _failing(arch, seed) + _controls(arch, seed)
    specs += selection_search()
    specs += [  # PyTorch default init (uniform / Xavier): k = 1.36 at step 0, held out as an architecture
        RunSpec("torch_encoder", seed, "healthy", lr=1e-3, weight_decay=1.0, steps=600, warmup=50)
        for seed in (0, 1)
    ]
    specs.append(  # the demo's model and recipe (HF Trainer defaults: β2 0.999, clip 1.0, warm-up steps/20)
        RunSpec(
            "demo_llama",
            0,
            "healthy",
            lr=3e-3,
            weight_decay=0.1,
            steps=600,
            warmup=30,
            batch=8,
            seq_len=64,
            betas=(0.9, 0.999),
            every=20,
        )
    )
    return specs


def demo_variants() -> list[RunSpec]:
    """The demo's model and recipe (plain loop, with the probe) at the old demo setting (lr 3e-3, wd 0.1, the suite's
    ``demo_llama``) and around it: which recipe keeps the demo's attention healthy (docs/alerts.md §7)."""
    base = dict(steps=600, warmup=30, batch=8, seq_len=64, betas=(0.9, 0.999), every=20)
    settings = ((3e-3, 0.1), (3e-3, 0.5), (3e-3, 1.0), (2e-3, 0.1), (1e-3, 0.1), (1e-3, 1.0))
    return [RunSpec("demo_llama", 0, "healthy", lr=lr, weight_decay=wd, **base) for lr, wd in settings]


def selection_search() -> list[RunSpec]:
    """Long separate-Q/K runs at high T/τ, the search for the paper's Selection collapse proper."""
    return [
        RunSpec("llama_mha", 0, "selection_deep", lr=5e-3, weight_decay=1.0, steps=2000, warmup=50, every=20),
        RunSpec("llama_mha", 1, "selection_deep", lr=1e-2, weight_decay=1.0, steps=1500, warmup=50, every=20),
    ]


def quick_suite() -> list[RunSpec]:
    """Five short runs for CI (about 700 steps of batch 16 × 64 bytes): two healthy runs (MHA and GQA), a too-high
    learning rate and a corrupted layer that the rules must flag, and a qk-norm control that must stay quiet."""
    base = dict(weight_decay=0.5, warmup=20, seq_len=64)
    return [
        RunSpec("llama_mha", 0, "healthy", lr=3e-3, steps=200, **base),
        RunSpec("llama_gqa", 1, "healthy", lr=2e-3, steps=200, **base),
        RunSpec("llama_mha", 0, "lr_too_high", lr=1e-1, weight_decay=0.1, steps=60, seq_len=64),
        RunSpec(
            "llama_gqa",
            1,
            "corrupt_scale",
            lr=2e-3,
            steps=150,
            **base,
            events=({"kind": "scale", "step": 100, "layer": 1, "factor": 8.0, "what": "qk"},),
        ),
        RunSpec("qwen3_mha", 0, "control", lr=3e-2, weight_decay=0.1, steps=60, seq_len=64),
    ]
