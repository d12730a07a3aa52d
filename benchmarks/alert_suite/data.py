"""Load the cached runs of a suite: spec, ground-truth signals, label, and the snapshots rebuilt from the store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .labels import Label, label_all
from .models import has_qk_norm
from .replay import ReplaySnapshot, load_snapshots
from .runs import RunSpec
from .train import STORE, is_cached, load_signals, run_dir


@dataclass
class RunData:
    spec: RunSpec
    signals: dict[str, Any]
    label: Label
    snapshots: list[ReplaySnapshot]


def _extras(sig: dict[str, Any]) -> Any:
    index = {step: j for j, step in enumerate(sig["w_steps"])}

    def extras(step: int) -> dict[str, Any]:
        j = index.get(step)
        if j is None:
            return {}
        out: dict[str, Any] = {
            "weight_norms": {k: v[j] for k, v in sig["weight_norms"].items()},
            "qk_norm": has_qk_norm(sig["spec"]["arch"]),
        }
        if sig["qk_head_norms"]:
            out["qk_head_norms"] = sig["qk_head_norms"][j]
            out["qk_head_norms_first"] = sig["qk_head_norms"][0]
        return out

    return extras


def load_suite(specs: Sequence[RunSpec], out: Path, *, strict: bool = True) -> dict[str, RunData]:
    """Every cached run of ``specs`` (a missing run raises when ``strict``, else it is skipped)."""
    present = []
    for spec in specs:
        if is_cached(out, spec):
            present.append(spec)
        elif strict:
            raise FileNotFoundError(f"run {spec.name} is not cached under {out}: train it first")
    signals = {spec.name: load_signals(run_dir(out, spec)) for spec in present}
    labels = label_all(signals)
    return {
        spec.name: RunData(
            spec,
            signals[spec.name],
            labels[spec.name],
            load_snapshots(run_dir(out, spec) / STORE, _extras(signals[spec.name])),
        )
        for spec in present
    }
