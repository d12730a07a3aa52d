"""The fit record: :class:`WeibullFit`, its fields declared once, and the not-ok fit.

Everything that copies fits field by field (the distributed float64 table, the run store's columns, the scan's
rows, dashboards' tables) takes the field names from here, so a new field travels everywhere it is declared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["FIELDS", "FLOAT_FIELDS", "INT_FIELDS", "WeibullFit", "failed_fit"]

_NAN = float("nan")


@dataclass(frozen=True)
class WeibullFit:
    """Result of the middle-80% Weibull fit of one weight matrix.

    ``scale`` (lambda) and the quantiles are in the units of the weights; ``k`` and ``r2`` are dimensionless.
    ``k_stderr`` is the standard error of k and ``scale_rel_stderr`` the relative standard error of lambda
    (delta method on the fitted quantile curve, docs/estimator.md). A fit with ``ok=False`` carries a readable
    ``reason`` and nan in every float field.
    """

    k: float
    scale: float
    r2: float
    n: int
    n_zero: int
    n_nonfinite: int
    k_stderr: float
    scale_rel_stderr: float
    method: str
    ok: bool
    reason: str | None
    q10: float = _NAN
    q50: float = _NAN
    q90: float = _NAN
    q99: float = _NAN
    q999: float = _NAN

    @property
    def q90_over_q10(self) -> float:
        """Distribution-free spread of |w| (nan when unknown)."""
        return _ratio(self.q90, self.q10)

    @property
    def q99_over_q50(self) -> float:
        """Upper-tail weight of |w| (nan when unknown)."""
        return _ratio(self.q99, self.q50)

    @property
    def q999_over_q50(self) -> float:
        """Extreme-tail weight of |w| (nan when unknown)."""
        return _ratio(self.q999, self.q50)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of floats, ints, bools and strings (ratios included)."""
        out = asdict(self)
        out["q90_over_q10"] = self.q90_over_q10
        out["q99_over_q50"] = self.q99_over_q50
        out["q999_over_q50"] = self.q999_over_q50
        return out


def _ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return _NAN
    ratio = a / b  # overflows to inf when b is a denormal (fp64 weights): undefined, never inf
    return ratio if math.isfinite(ratio) else _NAN


def failed_fit(reason: str, method: str, n: int = 0, n_zero: int = 0, n_nonfinite: int = 0) -> WeibullFit:
    """A not-ok fit: nan in every float field, the counts that are known, and why."""
    return WeibullFit(
        k=_NAN,
        scale=_NAN,
        r2=_NAN,
        n=int(n),
        n_zero=int(n_zero),
        n_nonfinite=int(n_nonfinite),
        k_stderr=_NAN,
        scale_rel_stderr=_NAN,
        method=method,
        ok=False,
        reason=reason,
    )


#: Every field of a WeibullFit, in declaration order.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WeibullFit))
#: The float fields (nan when unknown) and the integer counts: what a fit is made of as numbers.
FLOAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WeibullFit) if f.type == "float")
INT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WeibullFit) if f.type == "int")
