"""The fit protocol as code: its anchors, its rank band, its input checks (docs/estimator.md §1).

Per matrix, never pooled: a = |w| without zeros and non-finite values (both counted), sorted; Hazen plotting
positions F_i = (i - 0.5) / n; keep 0.1 <= F_i <= 0.9; OLS of y = ln(-ln(1 - F)) on x = ln a; k = slope,
lambda = exp(-intercept / k), R^2 of that regression. The anchors (k, lambda / sigma and R^2 of Gaussian weights)
are computed here by quadrature, not typed in.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from weibull_monitor.estimator import quadrature

__all__ = [
    "K_GAUSSIAN",
    "LAMBDA_PER_SIGMA",
    "METHODS",
    "MIN_ELEMENTS",
    "QUANTILE_LEVELS",
    "R2_GAUSSIAN",
    "check_method",
    "middle_ranks",
    "readable_tensor",
    "storage_order",
    "too_few_reason",
]

K_GAUSSIAN: float
LAMBDA_PER_SIGMA: float
R2_GAUSSIAN: float
K_GAUSSIAN, _LN_LAMBDA_PER_SIGMA, R2_GAUSSIAN = quadrature.line_fit_limit(
    lambda f: np.log(quadrature.half_normal_quantile(f))
)
LAMBDA_PER_SIGMA = math.exp(_LN_LAMBDA_PER_SIGMA)

MIN_ELEMENTS: int = 100
"""Fewer finite nonzero elements than this gives ok=False: with n = 100 the middle band holds 80 points and the
standard error of k is already ~0.14, too coarse to tell one class of matrix from another."""

METHODS = ("histogram", "exact")
QUANTILE_LEVELS = (0.1, 0.5, 0.9, 0.99, 0.999)


def middle_ranks(n: int) -> tuple[int, int]:
    """1-based ranks (first, last) with 0.1 <= (i - 0.5)/n <= 0.9, in exact integer arithmetic."""
    return (n + 14) // 10, (9 * n + 5) // 10


_INTEGER_DTYPES = {
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
}


def readable_tensor(tensor: Any) -> tuple[torch.Tensor | None, str | None]:
    """(plain detached tensor, None) when its values can be read, else (None, reason). TypeError for non-tensors."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    try:
        t = tensor.detach()
    except Exception as exc:  # an exotic subclass whose detach fails: report, never raise
        return None, f"cannot read tensor of type {type(tensor).__name__}: {exc}"
    if type(t) is not torch.Tensor:
        return None, (
            f"tensor subclass {type(t).__name__} is not read directly (for DTensor / sharded parameters, fit the "
            "local shard's histogram and all-reduce it: weibull_monitor.distributed)"
        )
    if t.is_meta or t.device.type == "meta":
        return None, "meta tensor: it has no data"
    if t.is_quantized:
        return None, f"quantized tensor ({t.dtype}): dequantize it first"
    if t.layout != torch.strided:
        return None, f"layout {t.layout} is not supported: pass a dense tensor"
    if t.is_complex():
        return None, f"complex dtype {t.dtype}: the fit is defined for real weights"
    if t.dtype in _INTEGER_DTYPES or not t.is_floating_point():
        return None, f"dtype {t.dtype} is not floating point: dequantize integer weights first"
    return t, None


def storage_order(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` holding the same elements in the order they lie in memory, when its dimensions are a
    permutation of a dense block (a transposed or permuted matrix); ``t`` itself otherwise.

    Counts and sorts do not depend on the order of the elements, and reading memory in order is what makes them
    fast: a transposed 1e9-element fp32 view took 55 s to count against 1 s for its contiguous twin.
    """
    if t.dim() < 2 or t.is_contiguous():
        return t
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)
    permuted = t.permute(order)
    return permuted if permuted.is_contiguous() else t


def too_few_reason(n: int, n_zero: int, n_nonfinite: int) -> str | None:
    """Why a matrix with these counts has no fit, or None when it has one."""
    if n == 0 and n_zero == 0 and n_nonfinite == 0:
        return "empty tensor (no elements)"
    if n == 0 and n_zero == 0 and n_nonfinite > 0:
        return f"all {n_nonfinite} elements are non-finite"
    if n == 0 and n_nonfinite == 0 and n_zero > 0:
        return f"all {n_zero} elements are zero"
    if n == 0:
        return f"no finite nonzero element ({n_zero} zero, {n_nonfinite} non-finite)"
    if n < MIN_ELEMENTS:
        return f"only {n} finite nonzero elements (minimum {MIN_ELEMENTS})"
    return None


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
