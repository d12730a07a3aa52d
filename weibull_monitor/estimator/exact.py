"""The exact method: sort |w| and run the protocol's regression rank by rank, all arithmetic in float64.

The reference every faster path is checked against (docs/estimator.md §2).
"""

from __future__ import annotations

import numpy as np
import torch

from weibull_monitor.estimator.protocol import QUANTILE_LEVELS, middle_ranks, too_few_reason
from weibull_monitor.estimator.record import WeibullFit, failed_fit
from weibull_monitor.estimator.regression import SUM_NAMES, fits_from_sums, regression_sums

__all__ = ["fit_exact"]

_EXACT_CHUNK = 1 << 16  # ranks per step of the exact regression: its float64 temporaries stay in cache


def _sorted_magnitudes(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(ascending finite nonzero |w| as a 1-D tensor, n_zero, n_nonfinite).

    Values are sorted in float32 when that is exact (fp32, bf16, fp16, float8) and in float64 otherwise, on the
    CPU through numpy (its sort is 2-3x faster than torch's there), elsewhere on the tensor's own device.
    """
    flat = t.reshape(-1)
    exact_in_fp32 = t.dtype in (torch.float32, torch.bfloat16, torch.float16) or "float8" in str(t.dtype)
    values = flat.to(torch.float32 if exact_in_fp32 else torch.float64).abs()
    if values.device.type == "cpu":
        a = values.numpy()
        finite = np.isfinite(a)
        keep = finite & (a != 0)
        n_nonfinite = int(a.size - np.count_nonzero(finite))
        kept = a[keep]
        n_zero = int(a.size - n_nonfinite - kept.size)
        kept.sort()
        return torch.from_numpy(kept), n_zero, n_nonfinite
    finite = torch.isfinite(values)
    keep = finite & (values != 0)
    n_nonfinite = int((~finite).sum())
    kept = values[keep]
    n_zero = int(values.numel() - n_nonfinite - kept.numel())
    return torch.sort(kept).values, n_zero, n_nonfinite


def fit_exact(t: torch.Tensor) -> WeibullFit:
    """The sort-based reference (docs/estimator.md §1), all arithmetic in float64."""
    a, n_zero, n_nonfinite = _sorted_magnitudes(t)
    n = int(a.numel())
    reason = too_few_reason(n, n_zero, n_nonfinite)
    if reason is not None:
        return failed_fit(reason, "exact", n, n_zero, n_nonfinite)
    lo, hi = middle_ranks(n)
    sums = torch.zeros(len(SUM_NAMES), dtype=torch.float64, device=a.device)
    for start in range(lo, hi + 1, _EXACT_CHUNK):  # ranks start .. stop-1, 1-based
        stop = min(start + _EXACT_CHUNK, hi + 1)
        ranks = torch.arange(start, stop, dtype=torch.float64, device=a.device)
        y = torch.log(-torch.log1p(-(ranks - 0.5) / n))
        x = torch.log(a[start - 1 : stop - 1].to(torch.float64))
        sums += regression_sums(x, y, torch.ones_like(x))
    sums = sums.cpu().numpy()
    h = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64) * n - 0.5
    h = h.clamp(0.0, n - 1.0)
    base = h.floor().long()
    nxt = (base + 1).clamp(max=n - 1)
    frac = h - base
    a_lo = a[base.to(a.device)].to(torch.float64).cpu()
    a_hi = a[nxt.to(a.device)].to(torch.float64).cpu()
    qs = (a_lo * (1 - frac) + a_hi * frac).tolist()
    return fits_from_sums(
        sums[None, :],
        n=[n],
        n_zero=[n_zero],
        n_nonfinite=[n_nonfinite],
        method="exact",
        quantiles=np.array([qs]),
    )[0]
