"""Every dashboard metric name, in one place: ``weibull/...`` keys are built here and nowhere else.

One namespace and stable keys, so saved W&B panels and TensorBoard layouts keep working across versions and models
(docs/monitor.md lists them). Per class ``weibull/<class>/<metric>``; global ``weibull/T_over_tau`` and
``weibull/selection_transmission_gap``; per matrix
``weibull/k/[L<layer>/]<component>[/<qualifier>][/E<expert>][/<stack>]`` (built from the role, never the name);
alert counters ``weibull/alerts/<level>``; reference lines ``weibull/ref/...``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from weibull_monitor.models.naming import display_name

__all__ = [
    "ADAPTER_PREFIX",
    "ALL",
    "CLASS_METRICS",
    "FITS_TABLE",
    "FROZEN_MATRICES",
    "K_HEATMAP",
    "MATRIX_K_PREFIX",
    "PREFIX",
    "REF_K_GAUSSIAN",
    "REF_SELECTION_HIGH",
    "REF_SELECTION_LOW",
    "REF_TRANSMISSION_HIGH",
    "REF_TRANSMISSION_LOW",
    "SELECTION_TRANSMISSION_GAP",
    "T_OVER_TAU",
    "adapter_metric",
    "alert_count",
    "alert_text",
    "class_metric",
    "fits_artifact",
    "matrix_metric_keys",
    "short_matrix_name",
]

PREFIX = "weibull"
#: Everything weibull-monitor logs (a W&B ``define_metric`` glob).
ALL = f"{PREFIX}/*"

#: Per-class aggregates, ``weibull/<class>/<name>`` (medians over the class's matrices).
CLASS_METRICS = (
    "k_median",
    "k_drift",
    "k_drift_z",
    "scale_median",
    "scale_growth",
    "scale_over_sqrt_lr_wd",
    "scale_over_sqrt_peak_lr_wd",
)
T_OVER_TAU = f"{PREFIX}/T_over_tau"
SELECTION_TRANSMISSION_GAP = f"{PREFIX}/selection_transmission_gap"
MATRIX_K_PREFIX = f"{PREFIX}/k/"

#: How many matrices a snapshot reused the fit of (frozen and not adapted: they cannot have changed).
FROZEN_MATRICES = f"{PREFIX}/frozen_matrices"
#: Adapter factors (LoRA A and B), apart from every class: ``weibull/lora/<matrix>/<A|B>[/<adapter>]``.
ADAPTER_PREFIX = f"{PREFIX}/lora/"

#: Rich content: the per-snapshot table of fits and the layer x step heatmap of k.
FITS_TABLE = f"{PREFIX}/fits"
K_HEATMAP = f"{PREFIX}/k_heatmap"

#: Reference lines drawn beside the class medians.
REF_K_GAUSSIAN = f"{PREFIX}/ref/k_gaussian"
REF_TRANSMISSION_LOW = f"{PREFIX}/ref/transmission_band_low"
REF_TRANSMISSION_HIGH = f"{PREFIX}/ref/transmission_band_high"
REF_SELECTION_LOW = f"{PREFIX}/ref/selection_band_low"
REF_SELECTION_HIGH = f"{PREFIX}/ref/selection_band_high"


def class_metric(klass: str, name: str) -> str:
    """``weibull/<class>/<name>``, e.g. ``class_metric("selection", "k_median")``."""
    return f"{PREFIX}/{klass}/{name}"


def alert_count(level: str) -> str:
    """The counter of alerts of one level drawn beside the curves."""
    return f"{PREFIX}/alerts/{level}"


def alert_text(rule: str) -> str:
    """Where a dashboard with text panels (TensorBoard) writes a rule's alert messages."""
    return f"{PREFIX}/alerts/{rule}"


def fits_artifact(step: int) -> str:
    """The artifact path of one snapshot's fits (MLflow)."""
    return f"{PREFIX}/fits/step_{int(step):08d}.json"


_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")


def _sanitize(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_")


def matrix_metric_keys(roles: Mapping[str, Any]) -> dict[str, str]:
    """Stable dashboard key per matrix: ``weibull/k/[L<layer>/]<component>[/<qualifier>][/E<expert>][/<stack>]``.

    The key is built from the role alone (docs/monitor.md has the table), so the same matrix of two models of
    different families, or of one model wrapped or not (torch.compile, PEFT, DDP), gets the same key. Matrices
    without a layer (embeddings, lm_head) drop ``L<layer>/``; split views carry their own component (``L3/q``
    beside the fused ``L3/qkv``); the qualifier tells apart roles that share a component (``embed/position``,
    ``router/shared``, ``ffn_up/shared``, ``o/a``). Where recognised matrices still share a key (two attention
    blocks in one layer, as in LongCat-Flash) each gets ``/<i>``, its rank among them by parameter name; unrecognised
    ``other`` matrices get their parameter name (without wrapper prefixes) instead. Order-independent.
    """
    base: dict[str, str] = {}
    for key, role in roles.items():
        if role is None:
            continue
        parts = [f"{PREFIX}/k"]
        if role.layer is not None:
            parts.append(f"L{role.layer}")
        parts.append(role.component)
        qualifier = getattr(role, "qualifier", None)
        if qualifier:
            parts.append(_sanitize(qualifier))
        if role.expert is not None:
            parts.append(f"E{role.expert}")
        if role.stack:
            parts.append(_sanitize(role.stack))
        base[key] = "/".join(parts)
    sharing: dict[str, list[str]] = {}
    for key, metric in base.items():
        sharing.setdefault(metric, []).append(key)
    out: dict[str, str] = {}
    for metric, group in sharing.items():
        if len(group) == 1:
            out[group[0]] = metric
            continue
        for rank, key in enumerate(sorted(group)):
            other = roles[key].component == "other"
            out[key] = f"{metric}/{_sanitize(display_name(key))}" if other else f"{metric}/{rank}"
    return out


def adapter_metric(matrix_key: str, factor: str, adapter: str = "default") -> str:
    """The key of an adapter factor's k: ``weibull/lora/L3/q/A`` for the A factor of the matrix keyed
    ``weibull/k/L3/q`` (``/<adapter>`` appended for an adapter not named ``default``)."""
    key = f"{ADAPTER_PREFIX}{matrix_key.removeprefix(MATRIX_K_PREFIX)}/{factor}"
    return key if adapter == "default" else f"{key}/{_sanitize(adapter)}"


def short_matrix_name(metric_key: str | None, fallback: str) -> str:
    """A matrix's name in messages: its metric key without ``weibull/k/`` (``L3/q``), else ``fallback`` without the
    prefixes wrappers add (``_orig_mod.``, ``base_model.model.``, ``module.``, ...)."""
    return metric_key.removeprefix(MATRIX_K_PREFIX) if metric_key else display_name(fallback)
