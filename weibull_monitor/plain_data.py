"""Plain data for JSON, SQLite and dashboards: the one place where non-finite floats, tensors and numpy scalars
become values every reader can parse. At the bottom of the import graph: every layer may use it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "finite_or_nan",
    "finite_or_none",
    "from_json_safe",
    "json_dumps",
    "json_safe",
    "scrub_non_finite",
    "sql_value",
]


def finite_or_nan(value: Any) -> float:
    """``value`` as a float, nan when it is not a finite number (dashboards that take nan for "missing")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, None when it is not a finite number (JSON has no nan or inf)."""
    number = finite_or_nan(value)
    return None if math.isnan(number) else number


def sql_value(value: Any) -> Any:
    """A value SQLite can hold: non-finite floats become NULL, bools ints, tensors/numpy scalars Python."""
    if value is None or isinstance(value, (str, bytes)):
        return value
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def scrub_non_finite(value: Any) -> Any:
    """Nested mappings and sequences with non-finite floats replaced by None (keys as strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): scrub_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_non_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON without NaN/inf (they become null), so any reader can parse it."""
    return json.dumps(scrub_non_finite(value), default=str, allow_nan=False)


def json_safe(value: Any) -> Any:
    """Plain JSON data that round-trips non-finite floats: tuples to lists, tensors and numpy scalars to numbers,
    nan/inf to ``{"__float__": "nan"}`` objects that :func:`from_json_safe` turns back."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    tolist = getattr(value, "tolist", None)  # torch tensors, numpy arrays and scalars
    if callable(tolist):
        return json_safe(tolist())
    raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")


def from_json_safe(value: Any) -> Any:
    """Inverse of :func:`json_safe` for the non-finite floats (lists stay lists)."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {key: from_json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json_safe(item) for item in value]
    return value
