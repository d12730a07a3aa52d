"""Snapshots of models with adapters (PEFT LoRA, DoRA, QLoRA) and of frozen matrices (docs/monitor.md).

- Every adapted matrix is fitted as the weight the forward pass uses, ``W0 + scaling * B @ A`` (DoRA: with its
  magnitude rescaling; a 4-bit base dequantized first), under the base matrix's role and key, built one group of
  matrices at a time (bounded memory: :data:`EFFECTIVE_BUDGET` elements) and never written back.
- The LoRA factors A and B are no transformer projections: they are fitted apart, under
  ``weibull/lora/<matrix>/<A|B>`` (:func:`~weibull_monitor.snapshot.keys.adapter_metric`), never in a class
  aggregate and never seen by the alert rules (B starts at zero: no fit, and no warning, until it moves).
- A matrix that is frozen (``requires_grad`` False) and not adapted cannot change: it is fitted once and its fit
  reused while the tensor's version counter says it was not written (``snapshot.frozen`` lists them).
- The optimizer group of an adapted matrix is the one that holds its adapter factors (η, λ_wd and T/τ of what
  actually trains).

Adapters are found by duck typing (``lora_A``/``lora_B``/``base_layer``), so nothing here imports peft.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from weibull_monitor.distributed import LocalMatrix, fit_matrices
from weibull_monitor.estimator import WeibullFit, failed_fit, fit_many
from weibull_monitor.models import split_fused
from weibull_monitor.snapshot import keys
from weibull_monitor.snapshot.record import MatrixEntry

__all__ = [
    "EFFECTIVE_BUDGET",
    "AdaptedLayer",
    "Adapters",
    "SnapshotFits",
    "dequantized",
    "effective_weight",
    "find_adapters",
    "find_quantized",
]

#: Elements of effective weights held at once while fitting (fp32: 4 bytes each).
EFFECTIVE_BUDGET = 16 * 1024 * 1024


@dataclass(frozen=True)
class AdaptedLayer:
    """One adapted module: its base weight, and per adapter the parameter names of its factors."""

    module: torch.nn.Module
    base: str  # the base weight's parameter name (``....q_proj.base_layer.weight``)
    factors: tuple[tuple[str, str, str], ...]  # (adapter, lora_A weight name, lora_B weight name)
    magnitudes: tuple[str, ...] = ()  # DoRA magnitude vectors


def find_adapters(model: torch.nn.Module) -> dict[str, AdaptedLayer]:
    """Base weight name -> its adapted layer, for every LoRA-style module of ``model`` (PEFT's LoraLayer)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    found: dict[str, AdaptedLayer] = {}
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        base = f"{name}.base_layer.weight"
        if base not in params:
            continue
        factors = tuple(
            (adapter, f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight")
            for adapter in lora_a
            if f"{name}.lora_A.{adapter}.weight" in params and f"{name}.lora_B.{adapter}.weight" in params
        )
        magnitudes = tuple(n for n in params if n.startswith(f"{name}.lora_magnitude_vector."))
        if factors:
            found[base] = AdaptedLayer(module, base, factors, magnitudes)
    return found


def _base_weight(module: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight as floats (a 4-bit or 8-bit bitsandbytes weight dequantized)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
    return dequantized(base)


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    """A linear module's weight as floats: bitsandbytes 4-bit (NF4/FP4) and 8-bit weights dequantized."""
    weight = module.weight
    if weight.dtype.is_floating_point:
        return weight.detach()
    try:
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module).detach()
    except ImportError:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).detach()


def find_quantized(model: torch.nn.Module, skip: Sequence[str] = ()) -> dict[str, torch.nn.Module]:
    """Parameter name -> module, for every bitsandbytes-quantized weight (packed integers with a quant state or
    scales) outside ``skip``: fitted dequantized, once (they are frozen)."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype.is_floating_point:
            continue
        if getattr(weight, "quant_state", None) is not None or getattr(weight, "SCB", None) is not None:
            key = f"{name}.weight" if name else "weight"
            if key not in skip:
                out[key] = module
    return out


def effective_weight(layer: AdaptedLayer) -> torch.Tensor:
    """The weight the forward pass uses, in float32 [as the base stores it]: ``W0 + Σ scaling·B@A`` over the
    active, unmerged adapters (a variant such as DoRA merges by its own rule)."""
    module = layer.module
    with torch.no_grad():
        w0 = _base_weight(module)
        active = [a for a in getattr(module, "active_adapters", [a for a, _, _ in layer.factors])]
        merged = set(getattr(module, "merged_adapters", ()))
        variants = getattr(module, "lora_variant", {}) or {}
        out: torch.Tensor | None = None
        transposed = bool(getattr(module, "fan_in_fan_out", False))
        for adapter, _, _ in layer.factors:
            if adapter not in active or adapter in merged:
                continue
            if adapter in variants:
                out = variants[adapter].merge_safe(module, adapter, out if out is not None else w0.float())
                continue
            a = module.lora_A[adapter].weight.float()
            b = module.lora_B[adapter].weight.float()
            scaling = float(module.scaling[adapter])
            base = out if out is not None else w0.float()
            out = torch.addmm(base, a.T, b.T, alpha=scaling) if transposed else torch.addmm(base, b, a, alpha=scaling)
        return out if out is not None else w0.float()


@dataclass
class SnapshotFits:
    """What :meth:`Adapters.fit` measured: the fits of the entries, and what is reported beside them."""

    fits: dict[str, WeibullFit]
    frozen: list[str] = field(default_factory=list)  # keys whose fit was reused (frozen, not adapted)
    adapted: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> active adapters fitted into it
    factors: dict[str, WeibullFit] = field(default_factory=dict)  # factor parameter name -> fit
    factor_of: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # factor -> (base, A|B, adapter)


class Adapters:
    """Per-run adapter and frozen-matrix bookkeeping of a monitor (found once, on first use)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.layers = find_adapters(model)
        self.factor_names = {n for layer in self.layers.values() for _, a, b in layer.factors for n in (a, b)}
        self.factor_names |= {n for layer in self.layers.values() for n in layer.magnitudes}
        self.quantized = find_quantized(model, skip=[f"{layer.base}" for layer in self.layers.values()])
        self._cache: dict[str, tuple[int, int, WeibullFit]] = {}

    def without_factors(self, roles: Mapping[str, Any]) -> dict[str, Any]:
        """The role map less the adapter factors (reported apart)."""
        return {name: role for name, role in roles.items() if name not in self.factor_names}

    def groups(self, group_of_param: Mapping[str, int | None]) -> dict[str, int | None]:
        """Parameter -> optimizer group, with each adapted base weight in the group of its first factor."""
        out = dict(group_of_param)
        for base, layer in self.layers.items():
            if out.get(base) is None:
                out[base] = next((group_of_param.get(a) for _, a, _ in layer.factors if a in group_of_param), None)
        return out

    def fit(self, entries: Sequence[MatrixEntry], method: str) -> SnapshotFits:
        """Fit every entry: adapted ones on their effective weight, frozen ones once, the rest as usual (a
        collective under torch.distributed, as :func:`~weibull_monitor.distributed.fit_matrices`)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        adapted: dict[str, list[MatrixEntry]] = {}
        reused: dict[str, WeibullFit] = {}
        plain: list[MatrixEntry] = []
        dequantize: list[MatrixEntry] = []
        for e in entries:
            if e.param_name in self.layers:
                adapted.setdefault(e.param_name, []).append(e)
                continue
            if e.param_name in self.quantized and e.component is None:
                fit = self._cached(e, params.get(e.param_name))
                if fit is not None:
                    reused[e.key] = fit
                else:
                    dequantize.append(e)
                continue
            fit = self._cached(e, params.get(e.param_name))
            if fit is not None:
                reused[e.key] = fit
            else:
                plain.append(e)
        fits = fit_matrices([e.key for e in plain], [e.matrix for e in plain], method)
        for e in plain:
            self._remember(e, params.get(e.param_name), fits.get(e.key))
        for e in dequantize:
            try:
                fit = fit_many([(e.key, dequantized(self.quantized[e.param_name]))], method=method)[e.key]
            except Exception as error:
                fit = failed_fit(f"dequantization failed: {type(error).__name__}: {error}", method)
            fits[e.key] = fit
            self._remember(e, params.get(e.param_name), fit)
        fits.update(reused)
        out = SnapshotFits(fits, frozen=sorted(reused))
        fits.update(self._fit_effective(adapted, method))
        for name, group in adapted.items():
            for e in group:
                out.adapted[e.key] = tuple(a for a, _, _ in self.layers[name].factors)
        self._fit_factors(params, out, method)
        out.fits = {e.key: fits[e.key] for e in entries if e.key in fits}
        return out

    def _fit_effective(self, adapted: Mapping[str, list[MatrixEntry]], method: str) -> dict[str, WeibullFit]:
        """Fits of adapted entries (the whole matrix and its split parts) on the effective weight, a bounded
        group of matrices at a time."""
        config = getattr(self.model, "config", None)
        out: dict[str, WeibullFit] = {}
        batch: list[tuple[str, torch.Tensor]] = []
        held = 0
        for name, group in adapted.items():
            try:
                weight = effective_weight(self.layers[name])
                pieces = [(e.key, weight) for e in group if e.component is None]
                parts = [e for e in group if e.component is not None]
                if parts:
                    whole = next((e.role for e in group if e.component is None), None)
                    split = split_fused(name, weight, config, role=whole, as_matrix=False)
                    pieces += [(e.key, split[e.component]) for e in parts]
            except Exception as error:  # an adapter this version cannot merge: reported, never fatal
                reason = f"effective weight failed: {type(error).__name__}: {error}"
                out.update({e.key: failed_fit(reason, method) for e in group})
                continue
            batch += pieces
            held += weight.numel()
            if held >= EFFECTIVE_BUDGET:
                self._flush(batch, method, out)
                held = 0
        self._flush(batch, method, out)
        return out

    @staticmethod
    def _flush(batch: list[tuple[str, torch.Tensor]], method: str, out: dict[str, WeibullFit]) -> None:
        if batch:
            out.update(fit_many(batch, method=method))
            batch.clear()

    def _fit_factors(self, params: Mapping[str, torch.Tensor], out: SnapshotFits, method: str) -> None:
        named: list[tuple[str, torch.Tensor]] = []
        for base, layer in self.layers.items():
            for adapter, a, b in layer.factors:
                for factor, name in (("A", a), ("B", b)):
                    out.factor_of[name] = (base, factor, adapter)
                    named.append((name, params[name].detach()))
        if named:
            out.factors = fit_many(named, method=method)

    # ------------------------------------------------------------------------------------------- frozen

    def _cached(self, entry: MatrixEntry, param: torch.Tensor | None) -> WeibullFit | None:
        state = _frozen_state(entry, param)
        cached = self._cache.get(entry.key)
        if state is None or cached is None or cached[:2] != state:
            return None
        return cached[2]

    def _remember(self, entry: MatrixEntry, param: torch.Tensor | None, fit: WeibullFit | None) -> None:
        state = _frozen_state(entry, param)
        if state is not None and fit is not None and fit.ok:
            self._cache[entry.key] = (*state, fit)
        else:
            self._cache.pop(entry.key, None)


def _frozen_state(entry: MatrixEntry, param: torch.Tensor | None) -> tuple[int, int] | None:
    """(version counter, storage address) of a frozen, local matrix; None when it may change or is sharded."""
    if param is None or param.requires_grad or not isinstance(entry.matrix, LocalMatrix):
        return None
    tensor = entry.matrix.tensor
    if tensor.is_meta:
        return None
    return int(tensor._version), int(tensor.untyped_storage().data_ptr())


def report(snapshot: Any, fitted: SnapshotFits) -> None:
    """Put what the fits say beside the snapshot: frozen and adapted keys, and the factors' metrics."""
    snapshot.frozen = list(fitted.frozen)
    snapshot.adapted = dict(fitted.adapted)
    snapshot.adapter_fits = dict(fitted.factors)
    if fitted.frozen:
        snapshot.aggregates[keys.FROZEN_MATRICES] = float(len(fitted.frozen))
    stats = getattr(snapshot, "matrices", {}) or {}
    for name, fit in fitted.factors.items():
        base, factor, adapter = fitted.factor_of[name]
        metric_key = getattr(stats.get(base), "metric_key", None)
        if fit.ok and metric_key:
            snapshot.aggregates[keys.adapter_metric(metric_key, factor, adapter)] = float(fit.k)
