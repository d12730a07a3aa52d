"""The public entry points of the estimator: :func:`fit_weibull` for one tensor, :func:`fit_many` for many."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from weibull_monitor.estimator.exact import fit_exact
from weibull_monitor.estimator.fallbacks import counts_only, in_histogram_range
from weibull_monitor.estimator.histogram import WeightHistogram, fit_tensors
from weibull_monitor.estimator.protocol import MIN_ELEMENTS, check_method, readable_tensor
from weibull_monitor.estimator.record import WeibullFit, failed_fit

__all__ = ["fit_many", "fit_weibull"]

def fit_weibull(tensor: torch.Tensor, *, method: str = "histogram") -> WeibullFit:
    """Middle-80% Weibull fit of |tensor| (any shape: a matrix, a vector, or a >2-D tensor taken flattened).

    Returns a WeibullFit; bad input (empty, all zero, too few finite nonzero elements, all non-finite, integer,
    quantized, complex, meta, sparse, unreadable tensor subclass) gives ``ok=False`` with a reason and never raises.
    NaN/Inf elements are counted in ``n_nonfinite`` and left out. Raises TypeError for a non-tensor and ValueError
    for an unknown ``method``.
    """
    check_method(method)
    t, reason = readable_tensor(tensor)
    if t is None:
        return failed_fit(reason or "unreadable tensor", method)
    try:
        with torch.no_grad():
            if t.numel() < MIN_ELEMENTS:
                return counts_only([t], method)[0]
            if method == "exact":
                return fit_exact(t)
            if t.device.type == "cpu":  # the kernel's exact zeros spare the range check its pass
                zeros: list[int | None] = []
                fit = fit_tensors([t], exact_zeros=zeros)[0]
                return in_histogram_range(t, fit, exact_zeros=zeros[0] if zeros else None)
            return in_histogram_range(t, WeightHistogram.from_tensor(t).fit())
    except Exception as exc:  # the fit path never takes training down
        return failed_fit(f"fit failed: {type(exc).__name__}: {exc}", method)


def fit_many(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    method: str = "histogram",
) -> dict[str, WeibullFit]:
    """Fit many tensors in one call: name -> WeibullFit, in input order.

    The histogram method counts in slices of ``histogram.SLICE_ROWS`` matrices and fits up to
    ``histogram.FIT_BLOCK_ROWS`` of them after a single device-to-host transfer (``histogram.fit_tensors``).
    TypeError when any value is not a tensor (raised before any work).
    """
    check_method(method)
    items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError("fit_many expects a mapping or an iterable of (name, tensor) pairs")
        if not isinstance(item[1], torch.Tensor):
            raise TypeError(f"{item[0]!r}: expected a torch.Tensor, got {type(item[1]).__name__}")
    fits: dict[int, WeibullFit] = {}
    tiny = [i for i, (_, t) in enumerate(items) if t.numel() < MIN_ELEMENTS and readable_tensor(t)[0] is not None]
    try:  # too small to fit: counted together, in one pass per dtype (100,000 1x1 matrices in ~0.1 s)
        fits.update(zip(tiny, counts_only([items[i][1] for i in tiny], method)))
    except Exception:
        fits.update((i, fit_weibull(items[i][1], method=method)) for i in tiny)
    rest = [i for i in range(len(items)) if i not in fits]
    tensors = [items[i][1] for i in rest]
    if method == "exact":
        fits.update((i, fit_weibull(items[i][1], method="exact")) for i in rest)
    else:
        try:
            zeros: list[int | None] = []  # exact zeros the kernel counted: the range check needs no pass then
            fitted = fit_tensors(tensors, exact_zeros=zeros)
            zeros += [None] * (len(fitted) - len(zeros))
            checked = (in_histogram_range(t, f, exact_zeros=z) for t, f, z in zip(tensors, fitted, zeros))
            fits.update(zip(rest, checked))
        except Exception:  # never take training down: fall back to one (never-raising) fit at a time
            fits.update((i, fit_weibull(items[i][1])) for i in rest)
    return {name: fits[i] for i, (name, _) in enumerate(items)}
