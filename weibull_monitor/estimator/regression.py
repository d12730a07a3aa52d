"""From regression sums to fits: the least-squares line of the protocol, its R^2 and its standard errors.

Both methods (the exact sort and the histogram of counts) reduce a matrix to the same weighted sums over its
regression points (``SUM_NAMES``); :func:`fits_from_sums` finishes any number of them at once
(docs/estimator.md §3-§4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from weibull_monitor.estimator import quadrature
from weibull_monitor.estimator.protocol import QUANTILE_LEVELS
from weibull_monitor.estimator.record import WeibullFit, failed_fit

__all__ = ["SUM_NAMES", "fits_from_sums", "regression_sums"]

_NAN = float("nan")
# Sums over the regression points, in this order. The y-powers and x*y-powers feed the cubic quantile model of the
# standard errors (docs/estimator.md).
SUM_NAMES = ("w", "x", "xx", "y", "yy", "xy", "y3", "y4", "y5", "y6", "xy2", "xy3")
_GL_F, _GL_W = quadrature.nodes()
_GL_Y = quadrature.weibull_y(_GL_F)
_Y_HI = float(quadrature.weibull_y(np.array([quadrature.F_HI]))[0])
_BAND = quadrature.F_HI - quadrature.F_LO


def regression_sums(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted sums of SUM_NAMES over the last dimension (float64), shape [..., len(SUM_NAMES)]."""
    y2 = y * y
    wy = w * y
    wx = w * x
    wy2 = wy * y
    return torch.stack(
        [
            w.sum(-1),
            wx.sum(-1),
            (wx * x).sum(-1),
            wy.sum(-1),
            wy2.sum(-1),
            (wx * y).sum(-1),
            (wy2 * y).sum(-1),
            (wy2 * y2).sum(-1),
            (wy2 * y2 * y).sum(-1),
            (wy2 * y2 * y2).sum(-1),
            (wx * y2).sum(-1),
            (wx * y2 * y).sum(-1),
        ],
        dim=-1,
    )


_GL_Y_LO = float(quadrature.weibull_y(np.array([quadrature.F_LO]))[0])
_ANTI_POWERS = np.vander(np.concatenate([[_Y_HI, _GL_Y_LO], _GL_Y]), 7, increasing=True)  # y^0..y^6


def _stderr_batch(sums: np.ndarray, k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Delta-method standard errors (sd of k, relative sd of lambda) for rows of regression sums [M, 12].

    The quantile curve x(y) is modelled by the least-squares cubic in y through the regression points (smooth, so
    the noise of single order statistics does not enter); order statistics fluctuate as x'(F) B(F) / sqrt(n) with
    B a Brownian bridge; the OLS slope and intercept are linear in those fluctuations, and integration by parts
    turns each variance into single integrals (docs/estimator.md). For Weibull data the cubic is a line and this is
    the exact asymptotic result; for Gaussian weights it gives 1.365/sqrt(n) and 0.862/sqrt(n), the constants
    measured on Gaussian samples (docs/estimator.md §4).
    """
    col = {name: sums[:, i] for i, name in enumerate(SUM_NAMES)}
    w = col["w"]
    ys = [w, col["y"], col["yy"], col["y3"], col["y4"], col["y5"], col["y6"]]
    a = np.stack([np.stack([ys[p + q] for q in range(4)], -1) for p in range(4)], -2)  # [M, 4, 4]
    b = np.stack([col["x"], col["xy"], col["xy2"], col["xy3"]], -1)
    coef = np.full_like(b, _NAN)
    usable = (w >= 2) & np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=1)
    try:  # one stacked solve (a per-row loop cost ~50 us a matrix)
        coef[usable] = np.linalg.solve(a[usable], b[usable][..., None])[..., 0]
    except np.linalg.LinAlgError:  # a singular row (too few distinct points): row by row, least squares there
        for i in np.flatnonzero(usable):
            try:
                coef[i] = np.linalg.solve(a[i], b[i])
            except np.linalg.LinAlgError:
                try:
                    coef[i] = np.linalg.lstsq(a[i], b[i], rcond=None)[0]
                except np.linalg.LinAlgError:
                    coef[i] = _NAN
    x_mean, y_mean = col["x"] / w, col["y"] / w
    sxx = (col["xx"] - col["x"] * x_mean) / w  # variance of x over the band
    # w(y) = (y - ybar) - 2k (x(y) - xbar), x(y) = cubic; integrand = w(y) x'(y); anti = its antiderivative in y.
    resid = -2.0 * k[:, None] * coef
    resid[:, 0] += 2.0 * k * x_mean - y_mean
    resid[:, 1] += 1.0
    slope = coef[:, 1:] * np.arange(1, 4)  # x'(y): degree 2
    integrand = np.zeros((len(w), 6))
    for i in range(4):
        for j in range(3):
            integrand[:, i + j] += resid[:, i] * slope[:, j]
    anti = np.zeros((len(w), 7))
    anti[:, 1:] = integrand / np.arange(1, 7)
    anti_at = anti @ _ANTI_POWERS.T  # [M, 2 + nodes]: at y_hi, y_lo, then the Gauss-Legendre nodes
    poly_at = coef @ _ANTI_POWERS[:, :4].T
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma_k = (anti_at[:, :1] - anti_at[:, 1:]) / (_BAND * sxx)[:, None]  # from F to the top of the band
        gamma_ln = (poly_at[:, :1] - poly_at[:, 1:]) / _BAND + (y_mean / (k * k))[:, None] * gamma_k
        out = []
        for gamma in (gamma_k, gamma_ln):  # Var int Gamma dB = int Gamma^2 - (int Gamma)^2 over [0, 1]
            lo, nodes = gamma[:, 0], gamma[:, 1:]
            first = nodes @ _GL_W + quadrature.F_LO * lo
            second = (nodes * nodes) @ _GL_W + quadrature.F_LO * lo * lo
            out.append(np.sqrt(np.maximum(second - first * first, 0.0) / n))
    bad = ~(sxx > 0)
    out[0][bad] = _NAN
    out[1][bad] = _NAN
    return out[0], out[1]


def fits_from_sums(
    sums: np.ndarray,
    *,
    n: Sequence[int],
    n_zero: Sequence[int],
    n_nonfinite: Sequence[int],
    method: str,
    quantiles: np.ndarray | None = None,
) -> list[WeibullFit]:
    """Finish the regressions from their sums (rows of ``regression_sums`` [M, 12]) into WeibullFits."""
    sums = np.asarray(sums, dtype=np.float64).reshape(-1, len(SUM_NAMES))
    m = sums.shape[0]
    if m == 0:
        return []
    col = {name: sums[:, i] for i, name in enumerate(SUM_NAMES)}
    w = col["w"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x_mean, y_mean = col["x"] / w, col["y"] / w
        sxx = col["xx"] - col["x"] * x_mean
        syy = col["yy"] - col["y"] * y_mean
        sxy = col["xy"] - col["x"] * y_mean
        k = sxy / sxx
        ln_scale = x_mean - y_mean / k  # lambda = exp(-intercept / k), intercept = ybar - k xbar
        r2 = np.clip(sxy * sxy / (sxx * syy), 0.0, 1.0)
        k_se, rel_se = _stderr_batch(sums, k, np.asarray(n, dtype=np.float64))
        scale = np.exp(ln_scale)
    if quantiles is None:
        quantiles = np.full((m, len(QUANTILE_LEVELS)), _NAN)
    fits = []
    for i in range(m):
        args = (method, n[i], n_zero[i], n_nonfinite[i])
        # Relative tolerance: cancellation in float64 sums leaves ~1e-16 * sum(x^2) of noise in sxx.
        if not w[i] >= 2:
            fits.append(failed_fit("fewer than 2 points in the middle 80%", *args))
        elif not sxx[i] > 1e-12 * max(col["xx"][i], 1e-300):
            fits.append(failed_fit("no spread: the middle 80% of |w| holds a single value", *args))
        elif not (math.isfinite(k[i]) and k[i] > 0):
            fits.append(failed_fit(f"degenerate regression (slope {float(k[i])!r})", *args))
        elif not (math.isfinite(scale[i]) and scale[i] > 0):
            fits.append(failed_fit("scale out of floating-point range", *args))
        else:
            q = [float(v) for v in quantiles[i]]
            fits.append(
                WeibullFit(
                    k=float(k[i]),
                    scale=float(scale[i]),
                    r2=float(r2[i]),
                    n=int(n[i]),
                    n_zero=int(n_zero[i]),
                    n_nonfinite=int(n_nonfinite[i]),
                    k_stderr=float(k_se[i]),
                    scale_rel_stderr=float(rel_se[i]),
                    method=method,
                    ok=True,
                    reason=None,
                    q10=q[0],
                    q50=q[1],
                    q90=q[2],
                    q99=q[3],
                    q999=q[4],
                )
            )
    return fits
