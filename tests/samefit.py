"""Shared by the fit tests: two fits of the same counts by different routes agree."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from weibull_monitor.estimator import WeibullFit


def assert_same_fit(
    got: WeibullFit,
    want: WeibullFit,
    *,
    fields: Sequence[str] | None = None,
    rel: float = 1e-12,
    label: object = "",
) -> None:
    """Same outcome and counts; where the fit is ok, ``fields`` (default: every float field) within ``rel``."""
    assert (got.ok, got.reason, got.n, got.n_zero, got.n_nonfinite) == (
        want.ok,
        want.reason,
        want.n,
        want.n_zero,
        want.n_nonfinite,
    ), label
    if want.ok:
        wanted = want.to_dict()
        names = fields or [k for k, v in wanted.items() if isinstance(v, float)]
        numbers = {k: wanted[k] for k in names}
        assert {k: got.to_dict()[k] for k in names} == pytest.approx(
            numbers, rel=rel, abs=1e-15, nan_ok=True
        ), label
