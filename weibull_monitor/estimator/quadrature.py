"""Large-n limits of the middle-80% Weibull probability-plot fit, by deterministic Gauss-Legendre quadrature.

Everything here is a function of the fit protocol alone (docs/estimator.md §1), so the anchors K_GAUSSIAN,
LAMBDA_PER_SIGMA and R2_GAUSSIAN and the standard-error constants are computed, not typed in. numpy only (no
scipy): the half-normal quantile uses ``torch.special.erfinv`` in float64, polished by Newton steps on ``math.erf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

F_LO = 0.1  # the protocol keeps plotting positions 0.1 <= F <= 0.9
F_HI = 0.9
_PANELS = 16  # composite Gauss-Legendre: 16 panels x 16 nodes over [F_LO, F_HI]
_NODES = 16


def nodes(lo: float = F_LO, hi: float = F_HI, panels: int = _PANELS) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre nodes and weights on [lo, hi] (weights sum to hi - lo)."""
    t, w = np.polynomial.legendre.leggauss(_NODES)
    edges = np.linspace(lo, hi, panels + 1)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    mid = (edges[1:] + edges[:-1])[:, None] / 2
    return (mid + half * t).ravel(), (half * w).ravel()


def weibull_y(f: np.ndarray) -> np.ndarray:
    """The protocol's ordinate y = ln(-ln(1 - F))."""
    return np.log(-np.log1p(-f))


def half_normal_quantile(f: np.ndarray) -> np.ndarray:
    """Quantile of |Z|, Z ~ N(0, 1): sqrt(2) erfinv(F), to float64 precision."""
    import torch

    z = torch.special.erfinv(torch.as_tensor(f, dtype=torch.float64)).numpy()
    erf = np.vectorize(math.erf)
    for _ in range(2):  # Newton on erf(z) = F: derivative 2/sqrt(pi) exp(-z^2)
        z = z - (erf(z) - f) / (2.0 / math.sqrt(math.pi) * np.exp(-z * z))
    return math.sqrt(2.0) * z


def line_fit_limit(log_quantile: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float, float]:
    """(k, ln lambda, R^2) of the protocol's OLS in the limit n -> inf, for ln of a quantile function of |w|."""
    f, w = nodes()
    x = log_quantile(f)
    y = weibull_y(f)
    span = w.sum()
    mx, my = (w * x).sum() / span, (w * y).sum() / span
    sxx = (w * (x - mx) ** 2).sum()
    syy = (w * (y - my) ** 2).sum()
    sxy = (w * (x - mx) * (y - my)).sum()
    k = sxy / sxx
    return float(k), float(mx - my / k), float(sxy * sxy / (sxx * syy))


def _bridge_variance(gamma: Callable[[np.ndarray], np.ndarray]) -> float:
    """Var of int_0^1 Gamma(F) dB(F) for a Brownian bridge B: int Gamma^2 - (int Gamma)^2.

    ``gamma`` is given on [F_LO, F_HI]; it is constant (= gamma(F_LO)) below F_LO and 0 above F_HI.
    """
    f, w = nodes()
    g = gamma(f)
    g_lo = float(gamma(np.array([F_LO]))[0])
    first = (w * g).sum() + F_LO * g_lo
    second = (w * g * g).sum() + F_LO * g_lo * g_lo
    return float(second - first * first)


def weibull_stderr_constants() -> tuple[float, float]:
    """(c_k, c_lambda) of the delta method for Weibull-distributed |w|.

    For n i.i.d. Weibull(k, lambda) magnitudes, the protocol's estimates have, to first order in 1/sqrt(n),
    sd(k_hat) = c_k k / sqrt(n) and sd(lambda_hat) / lambda = c_lambda / (k sqrt(n)). Derivation (docs/estimator.md):
    order statistics x(F) = ln Q(F) fluctuate as q(F) B(F) / sqrt(n) with q = dx/dF = y'(F) / k and B a Brownian
    bridge; the OLS slope and intercept are linear functionals of those fluctuations, and integrating by parts turns
    each variance into single integrals of closed-form antiderivatives.
    """
    f, w = nodes()
    span = F_HI - F_LO
    y = weibull_y(f)
    my = (w * y).sum() / span
    v = (w * (y - my) ** 2).sum() / span  # per unit F, i.e. the variance of y over the middle band
    y_hi = float(weibull_y(np.array([F_HI]))[0])

    def gamma_k(ff: np.ndarray) -> np.ndarray:  # int_F^hi y'(s) (y(s) - my) ds / (span v)
        return ((y_hi - my) ** 2 - (weibull_y(ff) - my) ** 2) / 2.0 / (span * v)

    def gamma_scale(ff: np.ndarray) -> np.ndarray:  # int_F^hi [y'/span - my * y' (y - my) / (span v)] ds
        return (y_hi - weibull_y(ff)) / span - my * gamma_k(ff)

    return math.sqrt(_bridge_variance(gamma_k)), math.sqrt(_bridge_variance(gamma_scale))


def half_normal_stderr_constants() -> tuple[float, float]:
    """(sd(k) sqrt(n), sd(lambda)/lambda sqrt(n)) of the protocol for Gaussian weights, by the same delta method.

    Used to check the Weibull-model standard errors against the Gaussian case (docs/estimator.md §4: 1.365 and 0.862).
    Here x(F) = ln of the half-normal quantile is not linear in y, so the antiderivatives are built numerically.
    """
    f_fine = np.linspace(F_LO, F_HI, 20001)
    x = np.log(half_normal_quantile(f_fine))
    y = weibull_y(f_fine)
    k, _, _ = line_fit_limit(lambda ff: np.log(half_normal_quantile(ff)))
    span = F_HI - F_LO
    dx = np.gradient(x, f_fine)

    def trapz(values: np.ndarray) -> float:
        return float(((values[1:] + values[:-1]) / 2 * np.diff(f_fine)).sum())

    mx, my = trapz(x) / span, trapz(y) / span
    sxx = trapz((x - mx) ** 2) / span
    g_k = dx * ((y - my) - 2 * k * (x - mx)) / (span * sxx)
    g_ln_scale = dx / span + (my / (k * k)) * g_k  # ln lambda = mx - my / k

    def tail_integral(g: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        seg = (g[1:] + g[:-1]) / 2 * np.diff(f_fine)
        tail = np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])
        return lambda ff: np.interp(ff, f_fine, tail)

    return math.sqrt(_bridge_variance(tail_integral(g_k))), math.sqrt(
        _bridge_variance(tail_integral(g_ln_scale))
    )
