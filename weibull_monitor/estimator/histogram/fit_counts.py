"""From count rows to fits: the protocol's regression on a histogram, many rows at once (docs/estimator.md §2-§3).

Cumulative counts give the code of the element at every rank. For the exact kinds (bf16, fp16) the counts are the
sorted sample: rank by rank up to EXACT_RANKS middle ranks, bin by bin beyond (closed-form sums of y over each
bin's ranks). For the fp32 kind values inside a bin are interpolated uniformly in ln|w|, rank by rank or on a grid.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from weibull_monitor.estimator import quadrature
from weibull_monitor.estimator.histogram.codes import (
    ALL_CODES,
    EXACT_KINDS,
    KINDS,
    N_BINS,
    NO_CODES,
    NONFINITE_COLUMN,
    ZERO_COLUMN,
    Span,
    tables,
)
from weibull_monitor.estimator.histogram.runtime import (
    POOL_PREFIX,
    pool_size,
    search_sorted_rows,
    thread_pool,
    torch_on_one_thread,
)
from weibull_monitor.estimator.protocol import QUANTILE_LEVELS, too_few_reason
from weibull_monitor.estimator.record import WeibullFit, failed_fit
from weibull_monitor.estimator.regression import SUM_NAMES, fits_from_sums, regression_sums

EXACT_RANKS = 4096
"""Up to this many middle ranks, the regression runs rank by rank (as the sort-based protocol does)."""
GRID_POINTS = 1024
"""Beyond EXACT_RANKS, a midpoint grid of this many ranks (|dk| ~ 4e-5 against the sort for fp32, measured)."""
FP32_EXACT_RANKS = 2048
"""fp32 rows go to the grid beyond this many middle ranks, not EXACT_RANKS: inside a bin their values are
interpolated anyway, and at >= 2 ranks per grid point the grid is as close to the sort as rank by rank (measured,
docs/estimator.md); it cuts the fit's temporaries of small fp32 matrices by half or more."""


FIT_BLOCK_ROWS = 128
"""Rows fitted together at most: the fit's cost is mostly per tensor op, so more rows per op is cheaper, while
its [rows, used codes] and [rows, rank positions] temporaries bound the memory (see FIT_BLOCK_ELEMENTS)."""
FIT_BLOCK_ELEMENTS = 1 << 19
"""Count cells (rows x used codes) per fitted block: 128 matrices of ~4000 used codes, ~4 MB per int64 temporary.
Wider spans (fp32 weights over many octaves) fit fewer rows at a time, so memory stays flat."""
PARALLEL_FIT_MIN_ROWS = 16
"""On CPU, batches of at least twice this many rows (and at most one block per thread) are fitted in blocks
across the counting pool's threads (measured, 128 rows of a 125M model on 2 cores: 6.1 ms on one thread, 4.4 ms
as two blocks of 64 side by side)."""


def host_reads_by_default(device: torch.device) -> bool:
    """Whether a fit on ``device`` reads values back to the host mid-way to narrow its work: on CPU, where that is
    free. Elsewhere the fit runs at full code width with one transfer at the end (the accelerator path); the
    answers are the same either way, which the tests check by running the accelerator path on CPU."""
    return device.type == "cpu"


class Compact(NamedTuple):
    """Count rows cut to code columns ``offset .. offset + mags.shape[1] - 1`` (every other code column is 0)."""

    mags: torch.Tensor  # int64 or int32 [M, W] (the fit's cumulative counts are int64 either way)
    offset: int
    zeros: torch.Tensor  # int64 [M]: ZERO_COLUMN
    nonfinite: torch.Tensor  # int64 [M]: NONFINITE_COLUMN

    def rows(self, start: int, stop: int) -> Compact:
        return Compact(self.mags[start:stop], self.offset, self.zeros[start:stop], self.nonfinite[start:stop])


def compact(
    counts: torch.Tensor, span: Span = ALL_CODES, copy: bool = False, host_reads: bool | None = None
) -> Compact:
    """``counts`` [M, N_COLUMNS] cut to the code columns in use. On CPU, where host syncs are free, to ``span``
    when it is known, else to the columns some row uses (``amax`` over rows: one read of the counts); elsewhere
    the full width. ``copy``: own the data (the counts buffer is then free for reuse)."""
    lo, hi = 1, N_BINS - 1  # code 0 has moved to ZERO_COLUMN
    if host_reads is None:
        host_reads = host_reads_by_default(counts.device)
    if host_reads:
        if span == ALL_CODES:
            used = counts[:, :N_BINS].amax(0).nonzero()  # counts >= 0; ~3x faster than any(0) (measured)
            span = (int(used[0]), int(used[-1])) if used.numel() else NO_CODES
        lo, hi = max(lo, span[0]), min(hi, span[1])
        if hi < lo:
            lo = hi = 1
    else:
        lo = 0
    mags = counts[:, lo : hi + 1]
    zeros, nonfinite = counts[:, ZERO_COLUMN], counts[:, NONFINITE_COLUMN]
    if copy:
        mags, zeros, nonfinite = mags.clone(), zeros.clone(), nonfinite.clone()
    return Compact(mags, lo, zeros, nonfinite)


def concat_compact(parts: Sequence[Compact]) -> Compact:
    """Rows of several compact blocks in one, over the union of their columns."""
    if len(parts) == 1:
        return parts[0]
    lo = min(p.offset for p in parts)
    hi = max(p.offset + p.mags.shape[1] for p in parts)
    rows = sum(p.mags.shape[0] for p in parts)
    mags = torch.zeros(rows, hi - lo, dtype=torch.int64, device=parts[0].mags.device)
    row = 0
    for p in parts:
        mags[row : row + p.mags.shape[0], p.offset - lo : p.offset - lo + p.mags.shape[1]] = p.mags
        row += p.mags.shape[0]
    return Compact(mags, lo, torch.cat([p.zeros for p in parts]), torch.cat([p.nonfinite for p in parts]))


def fit_compact(
    counts: Compact, kinds: Sequence[str], reasons: Sequence[str | None], host_reads: bool | None = None
) -> list[WeibullFit]:
    """Fit every row of compact counts; one device-to-host transfer for the whole batch. ``host_reads``: see
    :func:`host_reads_by_default` (None decides by the counts' device)."""
    m = counts.mags.shape[0]
    if m == 0:
        return []
    if host_reads is None:
        host_reads = host_reads_by_default(counts.mags.device)
    kind_idx = torch.tensor([KINDS.index(k) for k in kinds], device=counts.mags.device)
    rows = block_rows(counts.mags.shape[1])
    threads = pool_size()
    # torch runs these small ops on one thread: the pool's threads fit blocks side by side instead, one block
    # each and one round only. More rounds kept every worker's malloc arena full of fit temporaries: 1000 rows on
    # each of 2 ranks peaked at 130-190 MB of RSS instead of 66-78 MB (measured).
    parallel = (
        counts.mags.device.type == "cpu"
        and threads > 1
        and 2 * PARALLEL_FIT_MIN_ROWS <= m <= threads * rows
        and not threading.current_thread().name.startswith(POOL_PREFIX)
    )
    if parallel:
        rows = max(PARALLEL_FIT_MIN_ROWS, -(-m // threads))
    work = [(counts.rows(i, i + rows), kind_idx[i : i + rows], host_reads) for i in range(0, m, rows)]
    if parallel and len(work) > 1:
        blocks = list(thread_pool(threads).map(_fit_block_no_grad, work))
    else:
        blocks = [_fit_rows_on_device(*block) for block in work]
    host = torch.cat(blocks).cpu().numpy()  # the one host sync of the batch
    n_sums = len(SUM_NAMES)
    n_all, n_zero, n_nonfinite, span_all = (host[:, i].astype(np.int64) for i in range(4))
    fits = fits_from_sums(
        host[:, 4 : 4 + n_sums],
        n=n_all,
        n_zero=n_zero,
        n_nonfinite=n_nonfinite,
        method="histogram",
        quantiles=host[:, 4 + n_sums :],
    )
    for i, (kind, reason) in enumerate(zip(kinds, reasons)):
        why = reason or too_few_reason(int(n_all[i]), int(n_zero[i]), int(n_nonfinite[i]))
        if why is None and kind not in EXACT_KINDS and span_all[i] < MIN_CODE_SPAN:
            why = (
                f"the middle 80% of |w| spans only {int(span_all[i])} bf16 codes, too few to interpolate inside "
                "them: use method='exact'"
            )
        if why is not None:
            fits[i] = failed_fit(why, "histogram", int(n_all[i]), int(n_zero[i]), int(n_nonfinite[i]))
    return fits


def block_rows(width: int) -> int:
    """Rows per fitted block for counts ``width`` code columns wide (FIT_BLOCK_ROWS at most, 8 at least)."""
    return max(8, min(FIT_BLOCK_ROWS, FIT_BLOCK_ELEMENTS // max(1, width)))


def _fit_block_no_grad(block: tuple[Compact, torch.Tensor, bool]) -> torch.Tensor:
    with torch.inference_mode():  # a pool thread does not inherit the caller's grad mode
        return _fit_rows_on_device(*block)


def _fit_rows_on_device(counts: Compact, kind_idx: torch.Tensor, host_reads: bool) -> torch.Tensor:
    """[rows, 4 + len(SUM_NAMES) + 5] float64 on the counts' device: (n, n_zero, n_nonfinite, codes spanned by
    the middle band), the regression sums, the quantiles. No host sync unless ``host_reads`` (free on CPU).
    """
    mags, offset = counts.mags, counts.offset
    device = mags.device
    cum = mags.cumsum(1)
    n = cum[:, -1]
    n_f = n.to(torch.float64)
    lo = torch.div(n + 14, 10, rounding_mode="floor")
    hi = torch.div(9 * n + 5, 10, rounding_mode="floor")
    n_mid = (hi - lo + 1).clamp(min=0)
    rounded = kind_idx < len(EXACT_KINDS)
    exact_rows = n_mid <= torch.where(rounded, EXACT_RANKS, FP32_EXACT_RANKS)
    if host_reads:  # no wider than the widest row needs
        width = int(torch.where(exact_rows, n_mid, GRID_POINTS).max().clamp(min=1))
    else:
        width = max(EXACT_RANKS, GRID_POINTS)
    pos, weight = _rank_positions(lo, n_mid, exact_rows, width)
    y = (pos / n_f.clamp(min=1.0)[:, None]).clamp_(1e-12, 1 - 1e-12).neg_().log1p_().neg_().log_()

    # Quantiles at Hazen positions p*n (rank h+1 with h = p n - 1/2, linear between neighbours): their two
    # neighbouring ranks are looked up together with the regression's positions, in one search.
    levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64, device=device)
    h = (levels[None, :] * n_f[:, None] - 0.5).clamp(min=0.0)
    h = torch.minimum(h, (n_f[:, None] - 1).clamp(min=0.0))
    base = h.floor()
    frac = h - base
    top = (n_f[:, None] - 0.5).clamp(min=0.5)
    n_levels = len(QUANTILE_LEVELS)
    # the code's own value where it is exact: every rounded row's quantiles, its regression ranks when rank by rank
    step = torch.cat(
        [(rounded & exact_rows)[:, None].expand(-1, width), rounded[:, None].expand(-1, 2 * n_levels)], dim=1
    )
    positions = torch.cat([pos, base + 0.5, torch.minimum(base + 1.5, top)], dim=1)
    del pos  # [rows, width] temporaries are the fit's memory: free each as soon as it is used
    looked_up = _lookup(cum, mags, positions, kind_idx, step, offset)
    del positions, step
    x = looked_up[:, :width]
    x_lo, x_hi = looked_up[:, width : width + n_levels], looked_up[:, width + n_levels :]
    quant = torch.exp(x_lo) * (1 - frac) + torch.exp(x_hi) * frac

    # Grid sums stand for all n_mid middle ranks: scale them so that every row's sums count ranks.
    per_point = torch.where(exact_rows, torch.ones_like(n_f), n_mid.to(torch.float64) / GRID_POINTS)
    sums = regression_sums(x, y, weight) * per_point[:, None]
    del x, y, weight, looked_up

    # Resolution: the codes at the first and last middle ranks.
    last_column = cum.shape[1] - 1
    span_codes = search_sorted_rows(cum, torch.stack([lo, hi], dim=1)).clamp(max=last_column)
    span = span_codes[:, 1] - span_codes[:, 0] + 1

    # Exact kinds beyond the rank-by-rank size: the step function x(rank) is known exactly, so the sums that
    # involve x are taken bin by bin, with sums of y over each bin's ranks in closed form (_rank_sums_of_y).
    stepped = rounded & ~exact_rows
    if not host_reads or bool(stepped.any()):
        if host_reads:  # look only at the codes of the middle band
            first, width = span_codes[:, 0], int(span.max())
        else:
            first, width = torch.zeros_like(span), cum.shape[1]
        step = _step_sums(cum, lo, hi, n_f, kind_idx, first, width, offset)
        for name, column in zip(("w", "x", "xx", "y", "yy", "xy"), step.unbind(1)):
            j = SUM_NAMES.index(name)
            sums[:, j] = torch.where(stepped, column, sums[:, j])

    header = torch.stack(
        [
            n_f,
            counts.zeros.to(torch.float64),
            counts.nonfinite.to(torch.float64),
            span.to(torch.float64),
        ],
        dim=1,
    )
    return torch.cat([header, sums, quant], dim=1)


def _rank_positions(
    lo: torch.Tensor, n_mid: torch.Tensor, exact_rows: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, width] continuous rank positions, their weights 1 or 0): every middle rank lo..hi for exact rows, a
    midpoint grid of GRID_POINTS for the others; padding carries weight 0 at a valid rank."""
    g = torch.arange(width, dtype=torch.float64, device=lo.device)
    lo_f = lo.to(torch.float64)[:, None]
    n_mid_f = n_mid.to(torch.float64)[:, None]
    exact = exact_rows[:, None]
    pos = torch.where(exact, lo_f + g - 0.5, lo_f - 1.0 + (g + 0.5) * n_mid_f / GRID_POINTS)
    weight = (g < torch.where(exact, n_mid_f, float(GRID_POINTS))).to(torch.float64)
    return torch.where(weight > 0, pos, lo_f - 0.5), weight


_EULER_GAMMA = 0.5772156649015329


def _unit_nodes() -> tuple[torch.Tensor, torch.Tensor]:
    """Composite Gauss-Legendre nodes and weights on [0, 1] (16 panels x 16 nodes)."""
    f, w = quadrature.nodes(0.0, 1.0)
    return torch.from_numpy(f), torch.from_numpy(w)


_GL_UNIT = _unit_nodes()


_E1_TERMS = 28  # |terms| of the series below 1e-17 by then at u = 2.31
_E1_COEFFICIENTS = [(-1.0) ** k / (k * math.factorial(k)) for k in range(1, _E1_TERMS + 1)]


def _e1(u: torch.Tensor) -> torch.Tensor:
    """Exponential integral E1(u) for 0 < u <~ 3 (the middle band has 0.105 <= u <= 2.31), by its power series
    -gamma - ln u - sum_k (-u)^k / (k k!), evaluated by Horner's rule."""
    acc = torch.full_like(u, _E1_COEFFICIENTS[-1])
    for c in reversed(_E1_COEFFICIENTS[:-1]):
        acc.mul_(u).add_(c)
    return -_EULER_GAMMA - torch.log(u) - acc * u


def _rank_sums_of_y(j: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Psi(j) with sum_{i=a+1}^{b} ln(-ln(1 - (i - 1/2)/n)) = Psi(b) - Psi(a), for ranks in the middle band.

    Euler-Maclaurin for the midpoint sum of Y(F) = ln(-ln(1 - F)): n A(j/n) - Y1(j/n) / (24 n)
    + 7 Y3(j/n) / (5760 n^3), with Y1, Y3 the first and third derivatives of Y and the antiderivative
    A(F) = -(1 - F) ln u - E1(u), u = -ln(1 - F). The next term is O(Y5 / n^5): below 1e-12 for the n > ~5000
    where it is used.
    """
    u = -torch.log1p(-(j / n))
    eu = torch.exp(u)
    antiderivative = -torch.log(u) / eu - _e1(u)
    d1 = eu / u
    d3 = eu**3 * (2.0 / u - 3.0 / u**2 + 2.0 / u**3)
    return n * antiderivative - d1 / (24.0 * n) + 7.0 * d3 / (5760.0 * n**3)


def _step_sums(
    cum: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    n_f: torch.Tensor,
    kind_idx: torch.Tensor,
    first: torch.Tensor,
    width: int,
    offset: int = 0,
) -> torch.Tensor:
    """Exact (w, x, xx, y, yy, xy) sums over middle ranks lo..hi for histograms whose elements equal their codes.

    Looks at ``width`` columns from ``first`` per row (the middle band on CPU, all columns elsewhere); column j of
    ``cum`` holds code ``offset + j``.
    """
    device = cum.device
    offsets = torch.arange(width, device=device)
    idx = (first[:, None] + offsets).clamp(max=cum.shape[1] - 1)
    low, high = (lo - 1)[:, None], hi[:, None]
    # Middle ranks a+1..b of each column: b is the clamped cumulative count through the column, a the one before
    # it (the previous column's b; lo - 1 before the first, which holds rank lo). Columns past the end repeat the
    # last cumulative count, hence b = a = hi there. Consecutive columns share a boundary, so Psi is evaluated once
    # per boundary: width + 1 of them, from lo - 1 to hi.
    b = torch.minimum(torch.maximum(cum.gather(1, idx), low), high)
    bounds = torch.cat([low, b], dim=1)
    a = bounds[:, :-1]
    m = (b - a).to(torch.float64)
    x = tables(device)[0][kind_idx[:, None].expand_as(idx), idx + offset]
    n = n_f.clamp(min=1.0)[:, None]
    psi = _rank_sums_of_y(bounds.to(torch.float64).clamp(min=1.0), n)
    sum_xy = (x * torch.where(m > 0, psi[:, 1:] - psi[:, :-1], torch.zeros_like(m))).sum(1)
    sum_y = psi[:, -1] - psi[:, 0]
    return torch.stack(
        [m.sum(1), (m * x).sum(1), (m * x * x).sum(1), sum_y, _rank_sums_of_y2(lo, hi, n), sum_xy], 1
    )


def _rank_sums_of_y2(lo: torch.Tensor, hi: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """sum_{i=lo}^{hi} Y((i - 1/2)/n)^2 per row: Gauss-Legendre integral of Y^2 plus the Euler-Maclaurin end term.

    Y^2 has no closed antiderivative; 16 panels x 16 nodes integrate it to ~1e-14 on the middle band, and the
    next Euler-Maclaurin term is O(Y3 / n^3), below 1e-10 for the n > ~5000 where it is used.
    """
    t, w = _GL_UNIT
    a = (lo - 1).to(torch.float64)[:, None] / n
    b = hi.to(torch.float64)[:, None] / n
    f = a + (b - a) * t.to(a.device)
    y = torch.log(-torch.log1p(-f))
    integral = n[:, 0] * ((b - a)[:, 0] * (y * y * w.to(a.device)).sum(1))

    def slope(fv: torch.Tensor) -> torch.Tensor:  # d(Y^2)/dF = 2 Y Y1
        u = -torch.log1p(-fv)
        return 2.0 * torch.log(u) * torch.exp(u) / u

    return integral - (slope(b[:, 0]) - slope(a[:, 0])) / (24.0 * n[:, 0])


MIN_CODE_SPAN = 16
"""An fp32/fp16/fp64 histogram whose middle band covers fewer codes than this cannot resolve the shape (k >~ 40):
ok=False rather than a number the interpolation made up."""


def _lookup(
    cum: torch.Tensor,
    mags: torch.Tensor,
    pos: torch.Tensor,
    kind_idx: torch.Tensor,
    step: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """ln|w| at continuous rank positions ``pos`` [M, P] (element i occupies (i-1, i]), from cumulative counts.

    Where ``step`` [M, P] is true, the value of the element's code (exact for the bf16 and fp16 histograms);
    elsewhere interpolated uniformly in ln|w| inside the code's bin. Column j of ``cum``/``mags`` holds code
    ``offset + j``.
    """
    table = tables(cum.device).reshape(3, -1)
    # The element at position r is in the first code whose cumulative count reaches ceil(r).
    code = search_sorted_rows(cum, torch.ceil(pos).to(torch.int64)).clamp_(max=cum.shape[1] - 1)
    count = mags.gather(1, code)
    t = (cum.gather(1, code) - count).to(torch.float64).neg_().add_(pos)  # position within the code's bin
    t.div_(count.to(torch.float64).clamp_(min=1.0)).clamp_(0.0, 1.0)
    del count
    flat = code.add_(offset).add_(kind_idx[:, None] * N_BINS).view(-1)
    low = table[1].index_select(0, flat).view_as(pos)
    low.lerp_(table[2].index_select(0, flat).view_as(pos), t)
    return torch.where(step, table[0].index_select(0, flat).view_as(pos), low)


def fit_guarded(
    build: Callable[[], Compact],
    kinds: Sequence[str],
    reasons: Sequence[str | None],
    device: torch.device,
    host_reads: bool | None = None,
) -> list[WeibullFit]:
    """``fit_compact`` of the block ``build()`` makes, in inference mode with torch on one thread; never raises:
    a failure becomes one failed fit per row, carrying the row's own reason where it has one."""
    try:
        with torch.inference_mode(), torch_on_one_thread(device):
            return fit_compact(build(), kinds, reasons, host_reads)
    except Exception as exc:  # never take training down
        why = f"fit failed: {type(exc).__name__}: {exc}"
        return [failed_fit(r or why, "histogram") for r in reasons]
