"""The estimator: one weight tensor (or its histogram) -> :class:`WeibullFit` (k, λ, R², standard errors, quantiles).

Layers, bottom up: ``quadrature`` (large-n limits of the protocol, by quadrature) -> ``protocol`` (anchors, rank
band, input checks) and ``record`` (the fit record) -> ``regression`` (sums to fits) -> ``exact`` (the sort) and
``histogram`` (magnitude-code counts) -> ``api`` (:func:`fit_weibull`, :func:`fit_many`). Nothing here imports any
other part of weibull_monitor. The science: docs/estimator.md.
"""

from weibull_monitor.estimator.api import fit_many, fit_weibull
from weibull_monitor.estimator.fallbacks import in_histogram_range
from weibull_monitor.estimator.protocol import (
    K_GAUSSIAN,
    LAMBDA_PER_SIGMA,
    METHODS,
    MIN_ELEMENTS,
    QUANTILE_LEVELS,
    R2_GAUSSIAN,
)
from weibull_monitor.estimator.record import WeibullFit, failed_fit

__all__ = [
    "K_GAUSSIAN",
    "LAMBDA_PER_SIGMA",
    "METHODS",
    "MIN_ELEMENTS",
    "QUANTILE_LEVELS",
    "R2_GAUSSIAN",
    "WeibullFit",
    "failed_fit",
    "fit_many",
    "fit_weibull",
    "in_histogram_range",
]
