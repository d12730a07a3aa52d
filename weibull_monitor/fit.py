"""The fit engine: one weight tensor (or its histogram) -> WeibullFit(k, scale, r2, standard errors, quantiles).

Protocol (science.md section 1), per matrix, never pooled: a = |w| without zeros and non-finite values (both
counted), sorted; Hazen plotting positions F_i = (i - 0.5) / n; keep 0.1 <= F_i <= 0.9; OLS of
y = ln(-ln(1 - F)) on x = ln a; k = slope, lambda = exp(-intercept / k), R^2 of that regression.

Two methods give the same numbers (docs/estimator.md): ``"exact"`` sorts in float64 (the reference);
``"histogram"`` (default) bins the bf16 magnitude code of every element (weibull_monitor.histogram) and runs the
same regression on the counts, exactly for bf16 weights and with within-bin interpolation for wider dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from weibull_monitor import _quadrature

__all__ = [
    "K_GAUSSIAN",
    "LAMBDA_PER_SIGMA",
    "MIN_ELEMENTS",
    "R2_GAUSSIAN",
    "WeibullFit",
    "fit_many",
    "fit_weibull",
]

K_GAUSSIAN: float
LAMBDA_PER_SIGMA: float
R2_GAUSSIAN: float
K_GAUSSIAN, _LN_LAMBDA_PER_SIGMA, R2_GAUSSIAN = _quadrature.line_fit_limit(
    lambda f: np.log(_quadrature.half_normal_quantile(f))
)
LAMBDA_PER_SIGMA = math.exp(_LN_LAMBDA_PER_SIGMA)

MIN_ELEMENTS: int = 100
"""Fewer finite nonzero elements than this gives ok=False: with n = 100 the middle band holds 80 points and the
standard error of k is already ~0.14, too coarse to tell one class of matrix from another."""

METHODS = ("histogram", "exact")
QUANTILE_LEVELS = (0.1, 0.5, 0.9, 0.99, 0.999)
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


def middle_ranks(n: int) -> tuple[int, int]:
    """1-based ranks (first, last) with 0.1 <= (i - 0.5)/n <= 0.9, in exact integer arithmetic."""
    return (n + 14) // 10, (9 * n + 5) // 10


# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by both methods


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


# ---------------------------------------------------------------------------------------------------------------
# From regression sums to a WeibullFit (shared by both methods)

# Sums over the regression points, in this order. The y-powers and x*y-powers feed the cubic quantile model of the
# standard errors (docs/estimator.md).
_EXACT_CHUNK = 1 << 16  # ranks per step of the exact regression: its float64 temporaries stay in cache
SUM_NAMES = ("w", "x", "xx", "y", "yy", "xy", "y3", "y4", "y5", "y6", "xy2", "xy3")
_GL_F, _GL_W = _quadrature._nodes()
_GL_Y = _quadrature.weibull_y(_GL_F)
_Y_HI = float(_quadrature.weibull_y(np.array([_quadrature.F_HI]))[0])
_BAND = _quadrature.F_HI - _quadrature.F_LO


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


_GL_Y_LO = float(_quadrature.weibull_y(np.array([_quadrature.F_LO]))[0])
_ANTI_POWERS = np.vander(np.concatenate([[_Y_HI, _GL_Y_LO], _GL_Y]), 7, increasing=True)  # y^0..y^6


def _stderr_batch(sums: np.ndarray, k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Delta-method standard errors (sd of k, relative sd of lambda) for rows of regression sums [M, 12].

    The quantile curve x(y) is modelled by the least-squares cubic in y through the regression points (smooth, so
    the noise of single order statistics does not enter); order statistics fluctuate as x'(F) B(F) / sqrt(n) with
    B a Brownian bridge; the OLS slope and intercept are linear in those fluctuations, and integration by parts
    turns each variance into single integrals (docs/estimator.md). For Weibull data the cubic is a line and this is
    the exact asymptotic result; for Gaussian weights it gives 1.365/sqrt(n) and 0.862/sqrt(n), the constants
    measured in science.md section 2.
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
            first = nodes @ _GL_W + _quadrature.F_LO * lo
            second = (nodes * nodes) @ _GL_W + _quadrature.F_LO * lo * lo
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


# ---------------------------------------------------------------------------------------------------------------
# The exact method


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


def _fit_exact(t: torch.Tensor) -> WeibullFit:
    """The sort-based reference (science.md section 1), all arithmetic in float64."""
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


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def fit_weibull(tensor: torch.Tensor, *, method: str = "histogram") -> WeibullFit:
    """Middle-80% Weibull fit of |tensor| (any shape: a matrix, a vector, or a >2-D tensor taken flattened).

    Returns a WeibullFit; bad input (empty, all zero, too few finite nonzero elements, all non-finite, integer,
    quantized, complex, meta, sparse, unreadable tensor subclass) gives ``ok=False`` with a reason and never raises.
    NaN/Inf elements are counted in ``n_nonfinite`` and left out. Raises TypeError for a non-tensor and ValueError
    for an unknown ``method``.
    """
    _check_method(method)
    t, reason = readable_tensor(tensor)
    if t is None:
        return failed_fit(reason or "unreadable tensor", method)
    try:
        with torch.no_grad():
            if method == "exact":
                return _fit_exact(t)
            from weibull_monitor.histogram import WeightHistogram

            return WeightHistogram.from_tensor(t).fit()
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
    _check_method(method)
    items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError("fit_many expects a mapping or an iterable of (name, tensor) pairs")
        if not isinstance(item[1], torch.Tensor):
            raise TypeError(f"{item[0]!r}: expected a torch.Tensor, got {type(item[1]).__name__}")
    if method == "exact":
        return {name: fit_weibull(t, method="exact") for name, t in items}
    from weibull_monitor.histogram import fit_tensors

    tensors = [t for _, t in items]
    try:
        fits = fit_tensors(tensors)
    except Exception:  # never take training down: fall back to one (never-raising) fit at a time
        fits = [fit_weibull(t) for t in tensors]
    return {name: fit for (name, _), fit in zip(items, fits)}
