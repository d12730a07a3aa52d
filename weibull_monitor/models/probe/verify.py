"""The role map and the fused layouts checked against what a model's forward pass does (the probe's labels).

Every matrix with an expectation (attention, MLA and MLP components, split parts) is *verified* when every element
the forward pass read carries exactly the labels its component promises, a *mismatch* otherwise (with what the
probe saw), *not observed* when the pass read none of it (an expert no token was routed to). A matrix the probe
sees feeding attention or an MLP while the role map calls it something else is a mismatch too: that is how a
missing name rule shows. Splits are checked part by part, elementwise, and head by head where the heads are known.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from weibull_monitor.models.components import KLASS_OF_COMPONENT, Role
from weibull_monitor.models.layouts import find_layout, split_fused
from weibull_monitor.models.probe.analysis import (
    LINEAR,
    MIXER_IN,
    MIXER_OUT,
    MLP_IN,
    MLP_OUT,
    NONLINEAR,
    OUTSIDE,
    USED,
    K,
    Labels,
    O,
    Q,
    V,
)

__all__ = ["EXPECTED", "Check", "describe", "verify_roles"]

_QKV = Q | K | V
_ATTN = _QKV | O
# component -> the attention/MLP labels every element read must carry exactly (of Q, K, V, O, MLP_IN, MLP_OUT)
EXPECTED: dict[str, int] = {
    "q": Q,
    "k": K,
    "v": V,
    "q_a": Q,
    "q_b": Q,
    "k_rope": K,
    "kv_latent": K | V,
    "o": O,
    "attn_gate": 0,
    "ffn_up": MLP_IN,
    "ffn_gate": MLP_IN,
    "ffn_gate_up": MLP_IN,
    "ffn_down": MLP_OUT,
}
_SHAPE_BITS = _ATTN | MLP_IN | MLP_OUT
_RECURRENT_FORBIDDEN = _ATTN


@dataclass
class Check:
    """The probe's verdict on one matrix or split part."""

    key: str
    component: str
    status: str  # verified | mismatch | not observed | unchecked
    detail: str = ""
    heads_checked: bool = False


@dataclass
class RoleReport:
    checks: list[Check] = field(default_factory=list)
    splits: dict[str, str] = field(
        default_factory=dict
    )  # fused parameter -> "used: <layout>" | "refused: ..."
    discovered: dict[str, list[str]] = field(default_factory=dict)  # refused parameter -> layouts that verify

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)


def describe(bits: torch.Tensor) -> str:
    """What the probe saw on some elements, e.g. ``"q 50%, k 25%, v 25%"``."""
    used = bits[(bits & USED) != 0]
    if used.numel() == 0:
        return "not read by the traced pass"
    names = {
        Q: "q",
        K: "k",
        V: "v",
        O: "o",
        MLP_IN: "mlp_in",
        MLP_OUT: "mlp_out",
        MIXER_IN: "mixer_in",
        MIXER_OUT: "mixer_out",
        OUTSIDE: "feeds attention from outside its module",
    }
    counts: Counter[str] = Counter()
    for value, n in zip(*used.unique(return_counts=True)):
        label = "+".join(name for bit, name in names.items() if int(value) & bit) or "none of attention/MLP"
        counts[label] += int(n)
    total = used.numel()
    return ", ".join(f"{label} {100 * n / total:.0f}%" for label, n in counts.most_common())


def _check_elements(key: str, component: str, bits: torch.Tensor, glu: bool, layered: bool = True) -> Check:
    klass = KLASS_OF_COMPONENT.get(component)
    if component not in EXPECTED and klass != "recurrent" and component != "other":
        return Check(key, component, "unchecked")
    used = bits[(bits & USED) != 0]
    if used.numel() == 0:
        return Check(key, component, "not observed", "not read by the traced pass")
    if component not in EXPECTED:
        if klass == "recurrent":
            bad = (used & _RECURRENT_FORBIDDEN) != 0
            if bad.any():
                return Check(key, component, "mismatch", f"feeds softmax attention: {describe(bits)}")
            return Check(key, component, "verified", "no softmax attention or its output")
        if (used & _SHAPE_BITS).any() and component == "other" and layered:
            return Check(key, component, "mismatch", f"classed {component!r}, the probe saw {describe(bits)}")
        return Check(key, component, "unchecked")
    want = EXPECTED[component]
    shape = used & _SHAPE_BITS
    if component == "attn_gate":  # feeds none of Q, K, V (it may read the attention output it gates)
        ok = not ((used & _QKV) != 0).any()
    else:
        # every element carries exactly the promised labels; an element the pass left silent (a ReLU feature no
        # token switched on) contradicts nothing, but at least 90% must speak
        silent = shape == 0
        ok = bool(((shape == want) | silent).all()) and float(silent.float().mean()) <= 0.10
    if ok and glu and component in ("ffn_gate", "ffn_up"):
        side = NONLINEAR if component == "ffn_gate" else LINEAR
        speaking = used[(used & MLP_IN) != 0]
        ok = bool(((speaking & side) != 0).all())
        if not ok:
            return Check(key, component, "mismatch", f"the wrong side of the GLU ({_glu_text(used)})")
    if not ok:
        return Check(key, component, "mismatch", f"expected {component}, the probe saw {describe(bits)}")
    return Check(key, component, "verified")


def _glu_text(used: torch.Tensor) -> str:
    lin = int(((used & LINEAR) != 0).sum())
    return f"{100 * lin / used.numel():.0f}% of it enters the down projection linearly"


def _heads_in_order(part_index: torch.Tensor, heads: torch.Tensor | None) -> bool | None:
    """Rows of a split part, in order, map to heads 0, 0, ..., 1, 1, ... (None when heads are not known)."""
    if heads is None:
        return None
    rows = part_index.reshape(-1, part_index.shape[-1])
    row_heads = heads[rows]
    if (row_heads < 0).any() or not (row_heads == row_heads[:, :1]).all():
        return None
    seq = row_heads[:, 0]
    return bool((seq[1:] >= seq[:-1]).all())


def verify_roles(
    roles: dict[str, Role], labels: Labels, config: Any = None, *, discover: bool = False
) -> RoleReport:
    """Check every role of ``roles`` against ``labels``, and every fused parameter's split: the layout
    :func:`~weibull_monitor.models.split_fused` uses for the family (``splits[name] = "used: <layout>"``), or, where
    none is verified for the family, every candidate layout (``discovered[name]``: the candidates whose split the
    probe verified, for the table of verified families; with ``discover=True`` for every fused parameter)."""
    report = RoleReport()
    glu_layers = _glu_scopes(roles, labels)
    for name, role in roles.items():
        bits = labels.bits.get(name)
        if bits is None:
            continue
        glu = _scope(name) in glu_layers
        if not role.stacked:
            report.checks.append(_check_whole(name, role, bits, glu))
        if not role.parts:
            continue
        layout = find_layout(name, tuple(bits.shape), config, role=role)
        if layout is None or discover:
            if layout is None:
                try:
                    split_fused(name, torch.empty(bits.shape, device="meta"), config, role=role)
                except Exception as error:
                    report.splits[name] = f"refused: {error}"
            for candidate in find_layout(name, tuple(bits.shape), config, role=role, candidates=True):
                checks = _check_split(name, role, bits, glu, labels, config, candidate)
                if (
                    checks
                    and all(c.status in ("verified", "not observed") for c in checks)
                    and any(c.status == "verified" for c in checks)
                ):
                    report.discovered.setdefault(name, []).append(candidate.name)
            if layout is None:
                continue
        report.splits[name] = f"used: {layout.name}"
        report.checks += _check_split(name, role, bits, glu, labels, config, layout) or [
            Check(
                f"{name}[*]", role.component, "mismatch", f"layout {layout.name!r} failed on this parameter"
            )
        ]
    return report


def _check_split(
    name: str, role: Role, bits: torch.Tensor, glu: bool, labels: Labels, config: Any, layout: Any
) -> list[Check]:
    """The checks of each part ``layout`` cuts the parameter into (empty when the layout cannot split it)."""
    index = torch.arange(bits.numel()).view(bits.shape)
    try:
        parts = split_fused(name, index, config, role=role, as_matrix=False, layout=layout)
    except Exception:
        return []
    flat = bits.view(-1)
    checks = []
    for part, part_index in parts.items():
        component = part.split(".", 1)[1] if "." in part and part.startswith("e") else part
        check = _check_elements(f"{name}[{part}]", component, flat[part_index.reshape(-1)], glu)
        heads = labels.heads.get(name, {}).get(_HEAD_TENSOR.get(component, component))
        in_order = _heads_in_order(part_index, heads)
        if check.status == "verified" and in_order is False:
            check = Check(
                check.key, component, "mismatch", "parts hold the right rows in the wrong head order"
            )
        check.heads_checked = in_order is True
        checks.append(check)
    return checks


#: the captured tensor whose heads a split part's rows should follow
_HEAD_TENSOR = {"q_b": "q", "k_rope": "k"}


def _check_whole(name: str, role: Role, bits: torch.Tensor, glu: bool) -> Check:
    if role.parts and role.component in ("qkv", "kv_a", "kv_b", "kv"):
        used = bits[(bits & USED) != 0]
        if used.numel() and not ((used & _ATTN) != 0).all():
            return Check(
                name,
                role.component,
                "mismatch",
                f"fused attention projection, the probe saw {describe(bits)}",
            )
        return Check(name, role.component, "verified" if used.numel() else "not observed")
    return _check_elements(name, role.component, bits, glu, role.layer is not None)


def _scope(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:-2])


def _glu_scopes(roles: dict[str, Role], labels: Labels) -> set[str]:
    """Modules whose MLP is gated: among its input-side features some enter the down projection linearly and some
    through the activation (a ReLU-gated unit has no curvature to tell them apart: not checked)."""
    seen: dict[str, int] = {}
    for name, role in roles.items():
        bits = labels.bits.get(name)
        if bits is None or role.component not in ("ffn_up", "ffn_gate", "ffn_gate_up"):
            continue
        used = bits[(bits & MLP_IN) != 0]
        if used.numel():
            seen[_scope(name)] = seen.get(_scope(name), 0) | _or(used)
    return {scope for scope, bits in seen.items() if bits & LINEAR and bits & NONLINEAR}


def _or(values: torch.Tensor) -> int:
    out = 0
    for value in values.unique().tolist():
        out |= int(value)
    return out
