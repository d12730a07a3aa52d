"""Where the histogram cannot answer alone: values outside its range (the exact fit takes over) and tensors too
small to fit at all (only their counts are taken, many at once)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from weibull_monitor.estimator.exact import fit_exact
from weibull_monitor.estimator.histogram import histogram_kind
from weibull_monitor.estimator.histogram.runtime import (
    CPU_CHUNK_ELEMENTS,
    chunks,
    pool_size,
    thread_pool,
    torch_on_one_thread,
)
from weibull_monitor.estimator.protocol import MIN_ELEMENTS, readable_tensor, too_few_reason
from weibull_monitor.estimator.record import WeibullFit, failed_fit

__all__ = ["EXACT_FALLBACK_ELEMENTS", "counts_only", "in_histogram_range"]

EXACT_FALLBACK_ELEMENTS = 1 << 26
"""Largest tensor refitted by the exact sort when its values fall outside the histogram's range (a float32 or
float64 copy of it is sorted); a larger one gets ok=False with the reason."""


def in_histogram_range(tensor: torch.Tensor, fit: WeibullFit, *, exact_zeros: int | None = None) -> WeibullFit:
    """``fit`` (a histogram fit of ``tensor``), or the exact fit when some values lie outside the histogram's range.

    The fp32 kind reads a value through the high 16 bits of its float32 pattern (fp64 rounded to float32 first):
    nonzero values below 2**-133 (fp32 subnormals included) land in the zero column, and fp64 values beyond
    float32's range in the non-finite one. So when one of those columns holds anything that can be misplaced, an
    independent count decides: the true zeros (one ``count_nonzero`` pass, about as long as the histogram itself;
    only for matrices with a zero), and for fp64 the true non-finite values (fp32's are exact). Equal counts keep
    the histogram fit; different ones mean values the histogram cannot place, and the exact method (which reads every
    value in float64) fits the tensor instead, or, past EXACT_FALLBACK_ELEMENTS, the fit is not ok and says why.
    ``exact_zeros``: the true zeros of an fp32 tensor when the counting kernel counted them alongside the codes
    (``Counted.exact_zeros``): then no pass is made. Never raises.
    """
    if fit.n_zero == 0 and fit.n_nonfinite == 0:  # nothing the histogram could have misplaced
        return fit
    try:
        t, _ = readable_tensor(tensor)
        if t is None or histogram_kind(t.dtype) != "fp32":
            return fit
        wide = t.dtype != torch.float32  # fp64: rounded to float32 first, so non-finite codes can be wrong too
        if fit.n_zero == 0 and not wide:
            return fit
        with torch.no_grad():
            numel = t.numel()
            if not fit.n_zero:
                zeros = 0
            elif exact_zeros is not None and t.dtype == torch.float32:
                zeros = exact_zeros
            else:
                zeros = numel - _count_nonzero(t)  # NaN counts as nonzero, as it must
            nonfinite = numel - int(torch.isfinite(t).sum()) if wide and fit.n_nonfinite else fit.n_nonfinite
        if zeros == fit.n_zero and nonfinite == fit.n_nonfinite:
            return fit
        outside = fit.n_zero - zeros + fit.n_nonfinite - nonfinite
        if numel > EXACT_FALLBACK_ELEMENTS:
            return failed_fit(
                f"{outside} of {numel} values lie outside the histogram's range (nonzero |w| < 2**-133, or "
                f"beyond float32's range); too large for the exact fallback: fit it with method='exact'",
                fit.method,
                fit.n,
                zeros,
                nonfinite,
            )
        return fit_exact(t)
    except Exception as exc:  # never raises: the histogram fit stands, flagged
        return failed_fit(f"range check failed: {type(exc).__name__}: {exc}", fit.method)


def _count_nonzero(t: torch.Tensor) -> int:
    """``count_nonzero`` spread over the histogram's thread pool for a large CPU tensor (one read pass, chunked in
    memory order like the counting itself)."""
    size = pool_size()
    if t.device.type != "cpu" or t.numel() < 1 << 22 or size <= 1:
        return int(torch.count_nonzero(t))
    parts = chunks(t, max(CPU_CHUNK_ELEMENTS, -(-t.numel() // size)))
    with torch_on_one_thread():
        return sum(thread_pool(size).map(lambda part: int(torch.count_nonzero(part)), parts))


def counts_only(tensors: Sequence[torch.Tensor], method: str) -> list[WeibullFit]:
    """Not-ok fits of readable tensors with fewer than MIN_ELEMENTS elements: none has a fit, so only (n, n_zero,
    n_nonfinite) are taken, as the exact method takes them (in float64, every nonzero value counted), in one
    vectorised pass per dtype and device instead of one histogram per tensor."""
    out: list[WeibullFit | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() >= MIN_ELEMENTS:
            raise ValueError(f"counts_only takes tensors of fewer than {MIN_ELEMENTS} elements")
        groups.setdefault((t.dtype, t.device), []).append(i)
    with torch.no_grad():
        for (_, device), index in groups.items():
            sizes = [tensors[i].numel() for i in index]
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in index]).to(torch.float64)
            segment = torch.from_numpy(np.repeat(np.arange(len(index)), sizes)).to(device)
            nonfinite = torch.bincount(segment[~torch.isfinite(flat)], minlength=len(index)).tolist()
            zeros = torch.bincount(segment[flat == 0], minlength=len(index)).tolist()
            for j, i in enumerate(index):
                n = sizes[j] - zeros[j] - nonfinite[j]
                reason = too_few_reason(n, zeros[j], nonfinite[j]) or "too few elements"
                out[i] = failed_fit(reason, method, n, zeros[j], nonfinite[j])
    return [fit for fit in out if fit is not None]
