"""Snapshots of models with adapters (PEFT LoRA, DoRA, QLoRA) and of frozen matrices (docs/monitor.md).

- Every adapted matrix is fitted as the weight the forward pass uses, ``W0 + scaling * B @ A`` (DoRA: with its
  magnitude rescaling; a 4-bit base dequantized first), under the base matrix's role and key, built one group of
  matrices at a time (bounded memory: :data:`EFFECTIVE_BUDGET` elements) and never written back.
- The LoRA factors A and B are no transformer projections: they are fitted apart, under
  ``weibull/lora/<matrix>/<A|B>`` (:func:`~weibull_monitor.snapshot.keys.adapter_metric`), never in a class
  aggregate and never seen by the alert rules (B starts at zero: no fit, and no warning, until it moves); at every
  ``factors_every``-th snapshot (the monitor's ``adapter_factors_every``: two factors per adapted matrix would
  otherwise double the number of fits).
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
from weibull_monitor.estimator.histogram import N_COLUMNS, CountBuffer, HistogramBatch
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
            out = (
                torch.addmm(base, a.T, b.T, alpha=scaling)
                if transposed
                else torch.addmm(base, b, a, alpha=scaling)
            )
        return out if out is not None else w0.float()


#: Elements of one block of effective-weight rows (~1 MB of fp32: built and counted while in cache), and how many
#: blocks are counted per call of the counting kernel (its threads share them).
CHUNK_ELEMENTS = 1 << 20
POOL_BLOCKS = 4


def _low_rank_terms(
    layer: AdaptedLayer,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, float]]] | None:
    """(W0, [(left, right, scaling)]) with effective rows ``W0[r] + Σ scaling·left[r] @ right``; None where only
    the whole matrix will do (DoRA and other variants, a quantized or non-2-D base)."""
    module = layer.module
    if getattr(module, "lora_variant", None):
        return None
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
    w0 = base.weight.detach()
    if not w0.dtype.is_floating_point or w0.dim() != 2 or w0.is_meta:
        return None
    active = set(getattr(module, "active_adapters", [a for a, _, _ in layer.factors]))
    merged = set(getattr(module, "merged_adapters", ()))
    transposed = bool(getattr(module, "fan_in_fan_out", False))
    terms = []
    for adapter, _, _ in layer.factors:
        if adapter in active and adapter not in merged:
            a = module.lora_A[adapter].weight.detach().to(torch.float32)
            b = module.lora_B[adapter].weight.detach().to(torch.float32)
            terms.append(
                (a.T, b.T, float(module.scaling[adapter]))
                if transposed
                else (b, a, float(module.scaling[adapter]))
            )
    return w0, terms


def effective_counts(layers: Sequence[tuple[str, AdaptedLayer]]) -> dict[str, torch.Tensor]:
    """Histogram counts of the effective weights, built a cache-sized block of rows at a time into a small pool of
    reused buffers and counted :data:`POOL_BLOCKS` blocks per kernel call (no matrix-sized allocation, one pass
    over each W0). Layers :func:`_low_rank_terms` refuses are left out (the caller fits them whole)."""
    totals: dict[str, torch.Tensor] = {}
    pool = [torch.empty(CHUNK_ELEMENTS, dtype=torch.float32) for _ in range(POOL_BLOCKS)]
    counter = CountBuffer(POOL_BLOCKS)
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        counted = counter.count([block for _, block in pending])
        for (key, _), row in zip(pending, counted.counts):
            totals[key] += row
        pending.clear()

    with torch.no_grad():
        for key, layer in layers:
            found = _low_rank_terms(layer)
            if found is None or found[0].device.type != "cpu":
                continue
            w0, terms = found
            rows, cols = w0.shape
            step = max(1, min(rows, CHUNK_ELEMENTS // cols))
            if step * cols > CHUNK_ELEMENTS:
                continue  # one row alone is larger than a block: fitted whole
            totals[key] = torch.zeros(N_COLUMNS, dtype=torch.int64)
            for start in range(0, rows, step):
                n = min(step, rows - start)
                block = pool[len(pending)][: n * cols].view(n, cols)
                if w0.dtype == torch.float32 and terms:
                    left, right, scaling = terms[0]
                    torch.addmm(
                        w0[start : start + n], left[start : start + n], right, alpha=scaling, out=block
                    )
                    rest = terms[1:]
                else:
                    block.copy_(w0[start : start + n])
                    rest = terms
                for left, right, scaling in rest:
                    block.addmm_(left[start : start + n], right, alpha=scaling)
                pending.append((key, block))
                if len(pending) == POOL_BLOCKS:
                    flush()
        if pending:
            flush()
    return totals


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

    def __init__(self, model: torch.nn.Module, factors_every: int = 1) -> None:
        self.model = model
        self.factors_every = int(factors_every)  # fit the LoRA factors at every n-th snapshot (0: never)
        self.snapshots = 0
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
                out[base] = next(
                    (group_of_param.get(a) for _, a, _ in layer.factors if a in group_of_param), None
                )
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
        if self.factors_every > 0 and self.snapshots % self.factors_every == 0:
            self._fit_factors(params, out, method)
        self.snapshots += 1
        out.fits = {e.key: fits[e.key] for e in entries if e.key in fits}
        return out

    def _fit_effective(self, adapted: Mapping[str, list[MatrixEntry]], method: str) -> dict[str, WeibullFit]:
        """Fits of adapted entries (the whole matrix and its split parts) on the effective weight, a bounded
        group of matrices at a time."""
        config = getattr(self.model, "config", None)
        out: dict[str, WeibullFit] = {}
        batch: list[tuple[str, torch.Tensor]] = []
        counted: dict[str, torch.Tensor] = {}
        if (
            method == "histogram"
        ):  # whole adapted matrices: counted block by block (split parts need the whole)
            blockwise = [
                (g[0].key, self.layers[n])
                for n, g in adapted.items()
                if len(g) == 1 and g[0].component is None
            ]
            try:
                counted = effective_counts(blockwise)
            except Exception:  # any surprise: the whole-matrix path below says what went wrong
                counted = {}
        held = 0
        for name, group in adapted.items():
            if len(group) == 1 and group[0].key in counted:
                continue
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
        if counted:
            fits = HistogramBatch(torch.stack(list(counted.values())), ["fp32"] * len(counted)).fit_all()
            out.update(zip(counted, fits))
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
