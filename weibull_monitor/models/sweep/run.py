"""The sweep: every causal-LM model type of the installed transformers (plus the encoder and encoder-decoder families
docs/roles.md lists), each built tiny and random, its role map checked against its own forward pass by the probe.

:func:`sweep_family` builds one family and returns a :class:`FamilyResult`; :func:`run_sweep` does all of them;
:func:`coverage_table` prints the table docs/roles.md carries (``weibull-monitor roles --sweep``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from weibull_monitor.models.probe import probe_model
from weibull_monitor.models.probe.verify import verify_roles
from weibull_monitor.models.roles import model_roles
from weibull_monitor.models.sweep import configs

__all__ = ["MAX_PARAMETERS", "FamilyResult", "all_families", "coverage_table", "run_sweep", "sweep_family"]

#: Families whose tiny config still holds more parameters than this are listed, not built.
MAX_PARAMETERS = 60_000_000


@dataclass
class FamilyResult:
    """One family's line of the coverage table."""

    model_type: str
    built: bool
    config_type: str | None = (
        None  # the model_type of the config the model class takes (llama4 -> llama4_text)
    )
    reason: str = ""  # why it was not built, or what failed
    matrices: int = 0  # matrices the role map names (2-D weights and 3-D expert stacks)
    block: int = 0  # of those, matrices inside the blocks (a layer index)
    unclassified: list[str] = field(default_factory=list)  # block matrices classed "other"
    checked: int = 0  # matrices and split parts the probe could check
    verified: int = 0
    mismatches: list[str] = field(default_factory=list)
    not_observed: int = 0
    splits_used: int = 0
    splits_verified: int = 0
    layouts: dict[str, str] = field(default_factory=dict)  # split parameter -> the layout used
    unreached: list[str] = field(default_factory=list)  # split parameters the pass did not read
    splits_refused: dict[str, str] = field(default_factory=dict)
    wrong_splits: list[str] = field(default_factory=list)
    discovered: dict[str, list[str]] = field(
        default_factory=dict
    )  # kept-whole parameter -> layouts that verify
    attention_calls: int = 0
    seconds: float = 0.0

    @property
    def fully_classified(self) -> bool:
        return self.built and not self.unclassified


def all_families() -> list[str]:
    """Every causal-LM model type of the installed transformers, then the extra encoder families, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + sorted(
        t for t in configs.EXTRA_FAMILIES if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:140]}"


def build_family(model_type: str) -> tuple[torch.nn.Module, Any]:
    """The tiny random model of a family and its config (raises with the reason when it cannot be built)."""
    import transformers

    if model_type == "torch_mha":
        return configs.TorchEncoder.build(), None
    config = configs.tiny_config(model_type)
    cls = configs.model_class(model_type)
    with torch.device("meta"):
        meta = cls(config)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"{n / 1e6:.0f}M parameters at the tiny size (limit {MAX_PARAMETERS / 1e6:.0f}M)")
    del meta
    transformers.set_seed(0)
    model = cls(config).eval()
    with contextlib.suppress(Exception):
        model.set_experts_implementation(
            "eager"
        )  # one F.linear per expert: the probe sees each expert's slice
    prepare = configs.PREPARE.get(model_type)
    if prepare is not None:
        prepare(model)
    return model, config


def family_inputs(model_type: str, model: torch.nn.Module, config: Any) -> dict[str, torch.Tensor]:
    if config is None:
        return {"input_ids": torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))}
    ids = configs.input_ids(model_type, config)
    if model_type == "vit":
        size = int(config.image_size)
        return {"pixel_values": torch.randn(1, int(config.num_channels), size, size)}
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def sweep_family(model_type: str, *, discover: bool = False) -> FamilyResult:
    """Build one family tiny, map its roles, probe it, check every role and split."""
    started = time.perf_counter()
    result = FamilyResult(model_type, built=False)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        try:
            model, config = build_family(model_type)
        except Exception as error:
            result.reason = f"not built: {_short(error)}"
            return _done(result, started)
        roles = model_roles(model)
        result.built = True
        result.config_type = getattr(config, "model_type", None)
        result.matrices = len(roles)
        block = {n: r for n, r in roles.items() if r.layer is not None}
        result.block = len(block)
        result.unclassified = sorted(n for n, r in block.items() if r.component == "other")
        try:
            labels, _ = probe_model(model, family_inputs(model_type, model, config), roles=roles)
        except Exception as error:
            result.reason = f"forward pass failed: {_short(error)}"
            return _done(result, started)
    result.attention_calls = labels.calls
    report = verify_roles(roles, labels, config, discover=discover)
    result.discovered = {name: layouts for name, layouts in report.discovered.items()}
    for check in report.checks:
        if check.status == "unchecked":
            continue
        result.checked += 1
        if check.status == "verified":
            result.verified += 1
        elif check.status == "not observed":
            result.not_observed += 1
        else:
            result.mismatches.append(f"{check.key}: {check.detail}")
    for name, state in report.splits.items():
        if not state.startswith("used"):
            result.splits_refused[name] = state.removeprefix("refused: ")
            continue
        result.splits_used += 1
        result.layouts[name] = state.removeprefix("used: ")
        parts = [c for c in report.checks if c.key.startswith(name + "[")]
        if any(c.status == "mismatch" for c in parts):
            result.wrong_splits.append(name)
        elif any(c.status == "verified" for c in parts):
            result.splits_verified += 1
        else:
            result.unreached.append(name)
    return _done(result, started)


def _done(result: FamilyResult, started: float) -> FamilyResult:
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_sweep(
    families: Iterable[str] | None = None,
    *,
    progress: Callable[[FamilyResult], Any] | None = None,
    discover: bool = False,
) -> list[FamilyResult]:
    """Sweep ``families`` (default: :func:`all_families`), one at a time, in this process, on one torch thread (the
    models are tiny: a second thread only spins, and on a shared machine slows every op many times over)."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    try:
        for model_type in families or all_families():
            result = sweep_family(model_type, discover=discover)
            results.append(result)
            if progress is not None:
                progress(result)
    finally:
        torch.set_num_threads(torch_threads)
    return results


def coverage_table(results: list[FamilyResult]) -> str:
    """The coverage table (markdown) and its summary lines."""
    lines = [
        "| model type | built | matrices | classified | probe-verified | splits used / verified | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.built:
            lines.append(f"| {r.model_type} | no | | | | | {_cell(r.reason)} |")
            continue
        notes = []
        if r.reason:
            notes.append(r.reason)
        if r.unclassified:
            notes.append(f"other: {', '.join(_short_name(n) for n in r.unclassified[:4])}")
        if r.wrong_splits:
            notes.append(f"WRONG SPLIT: {', '.join(_short_name(n) for n in r.wrong_splits)}")
        if r.mismatches and not r.wrong_splits:
            more = f" (+{len(r.mismatches) - 1} more)" if len(r.mismatches) > 1 else ""
            notes.append(f"mismatch: {r.mismatches[0]}{more}")
        if r.splits_refused:
            name, why = next(iter(r.splits_refused.items()))
            why = why.split(": ", 1)[-1].split("; kept whole")[0]
            more = f" and {len(r.splits_refused) - 1} more" if len(r.splits_refused) > 1 else ""
            notes.append(f"kept whole: {_short_name(name)}{more} ({why})")
        if r.not_observed:
            notes.append(f"{r.not_observed} not reached by the pass")
        classified = r.block - len(r.unclassified)
        lines.append(
            f"| {r.model_type} | yes | {r.matrices} | {classified}/{r.block} | {r.verified}/{r.checked} | "
            f"{r.splits_used} / {r.splits_verified} | {_cell('; '.join(notes))} |"
        )
    return "\n".join(lines) + "\n\n" + summary(results)


def coverage(results: list[FamilyResult]) -> dict[str, Any]:
    """The sweep's headline numbers (the targets of docs/roles.md).

    A split the pass did not reach (a vision tower's fused projection under a text-only input) counts as verified
    when the probe verified the same layout on a part it did reach, elsewhere in the sweep (``verified_elsewhere``),
    else as ``unverified``."""
    built = [r for r in results if r.built and not r.reason]
    full = [r for r in built if r.fully_classified]
    verified_layouts = {
        layout
        for r in built
        for name, layout in r.layouts.items()
        if name not in r.unreached and name not in r.wrong_splits
    }
    elsewhere = sum(1 for r in built for name in r.unreached if r.layouts.get(name) in verified_layouts)
    unreached = sum(len(r.unreached) for r in built)
    return {
        "model_types": len(results),
        "built": len(built),
        "not_built": len(results) - len(built),
        "fully_classified": len(full),
        "fully_classified_pct": 100 * len(full) / len(built) if built else 0.0,
        "splits_used": sum(r.splits_used for r in built),
        "splits_verified": sum(r.splits_verified for r in built),
        "splits_verified_elsewhere": elsewhere,
        "splits_unverified": unreached - elsewhere,
        "wrong_splits": sum(len(r.wrong_splits) for r in built),
        "kept_whole": sum(len(r.splits_refused) for r in built),
        "role_mismatches": sum(len(r.mismatches) for r in built),
        "families_with_mismatches": sum(1 for r in built if r.mismatches),
    }


def summary(results: list[FamilyResult]) -> str:
    c = coverage(results)
    return (
        f"{c['model_types']} model types: {c['built']} built and run tiny, {c['not_built']} not (reasons above); "
        f"{c['fully_classified']}/{c['built']} fully classified ({c['fully_classified_pct']:.1f}%); "
        f"splits used {c['splits_used']}: verified by the probe {c['splits_verified']}, not reached by the pass but "
        f"their layout verified elsewhere {c['splits_verified_elsewhere']}, unverified {c['splits_unverified']}, "
        f"wrong {c['wrong_splits']}; {c['kept_whole']} fused parameters kept whole (no verified layout); "
        f"{c['role_mismatches']} role mismatches in {c['families_with_mismatches']} families (listed above)."
    )


def discovered_table(results: list[FamilyResult]) -> str:
    """Which candidate layouts the probe verified on which model types (``--discover``): the data of
    ``weibull_monitor.models.layout_table.VERIFIED``."""
    found: dict[str, set[str]] = {}
    for r in results:
        for layouts in r.discovered.values():
            for layout in layouts:
                found.setdefault(layout, set()).add(r.config_type or r.model_type)
    lines = ["layouts the probe verified (layout: model types):"]
    lines += [f"  {layout}: {', '.join(sorted(types))}" for layout, types in sorted(found.items())]
    return "\n".join(lines)


def _short_name(name: str) -> str:
    return name.removesuffix(".weight")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
