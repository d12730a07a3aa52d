"""Histograms of the bf16 magnitude code of weights: one cheap read pass per matrix, counts that add across shards.

The code of |w| is a 15-bit integer read from the bit pattern without the sign, monotone in |w| (32768 values).
Three kinds of histogram, fixed by the source dtype (docs/estimator.md):

- ``"bf16"`` (bf16 and float8 weights, float8 cast chunkwise to bf16, which is exact): the bf16 pattern;
- ``"fp16"``: the fp16 pattern itself (fp16 also has 15 magnitude bits);
- ``"fp32"`` (fp32, and fp64 cast chunkwise to fp32): the high 16 bits of the fp32 pattern, read through an integer
  view without any float conversion pass (truncation: code c holds the values in [v(c), v(c+1))).

In the bf16 and fp16 kinds every element *equals* its code's value, so the counts are the sorted sample and the fit
reproduces the sort-based protocol; in the fp32 kind values inside a bin are interpolated (uniform in ln|w|).

Columns of a count row: 0..N_BINS-1 the magnitude codes (code 0 and the Inf/NaN codes always hold 0), then
ZERO_COLUMN (|w| == 0; for the fp32 kind also |w| < 2**-133, fp32 subnormals whose high 16 bits are zero) and
NONFINITE_COLUMN.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from weibull_monitor import _quadrature
from weibull_monitor.fit import (
    QUANTILE_LEVELS,
    SUM_NAMES,
    WeibullFit,
    failed_fit,
    fits_from_sums,
    readable_tensor,
    regression_sums,
    too_few_reason,
)

__all__ = [
    "NONFINITE_COLUMN",
    "N_BINS",
    "N_COLUMNS",
    "ZERO_COLUMN",
    "HistogramBatch",
    "WeightHistogram",
    "histogram_batch",
]

N_BINS: int = 1 << 15
ZERO_COLUMN: int = N_BINS
NONFINITE_COLUMN: int = N_BINS + 1
N_COLUMNS: int = N_BINS + 2
KINDS = ("bf16", "fp16", "fp32")
EXACT_KINDS = ("bf16", "fp16")  # every element equals its code's value
_FIRST_NONFINITE_CODE = {"bf16": 0x7F80, "fp16": 0x7C00, "fp32": 0x7F80}  # exponent all ones: Inf and NaN

CPU_CHUNK_ELEMENTS = 1 << 21
"""Elements coded per step on CPU, into a reused 4 MB int16 buffer per thread (measured on 2 cores: 2M beats 1M by
~15% and 256K by ~2x, the per-call bincount output costing more than the cache misses)."""
DEVICE_CHUNK_ELEMENTS = 1 << 26
"""Elements coded per step on an accelerator: bounds the temporary codes to 128 MB whatever the matrix size."""
PARALLEL_MIN_ELEMENTS = 1 << 18
"""Below this many elements in all, a batch is counted on the calling thread (a pool hand-off costs more)."""
SMALL_ELEMENTS = 1 << 16
"""Tensors up to this size are counted together, many per bincount."""
BATCH_ROWS = 256
"""At most this many small tensors per shared bincount (its output is BATCH_ROWS x 256 KB)."""
SLICE_ROWS = 32
"""Matrices per histogram_batch + fit_all in ``fit.fit_many``: the int64 counts of a slice take 8 MB whatever
the matrices' sizes, and its fit temporaries no more (so a snapshot's extra memory does not grow with the model)."""

EXACT_RANKS = 4096
"""Up to this many middle ranks, the regression runs rank by rank (as the sort-based protocol does)."""
GRID_POINTS = 1024
"""Beyond EXACT_RANKS, a midpoint grid of this many ranks (|dk| ~ 4e-5 against the sort for fp32, measured)."""
FP32_EXACT_RANKS = 2048
"""fp32 rows go to the grid beyond this many middle ranks, not EXACT_RANKS: inside a bin their values are
interpolated anyway, and at >= 2 ranks per grid point the grid is as close to the sort as rank by rank (measured,
docs/estimator.md); it cuts the fit's temporaries of small fp32 matrices by half or more."""


def histogram_kind(dtype: torch.dtype) -> str:
    """The histogram kind of a floating dtype: "bf16" (bf16, float8), "fp16", or "fp32" (fp32, fp64, others)."""
    if dtype == torch.bfloat16 or "float8" in str(dtype):
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "fp32"


# ---------------------------------------------------------------------------------------------------------------
# Coding


_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # index of the high int16 inside an fp32 pattern
_BUFFERS = threading.local()


def _code_buffer(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, zeroed: bool = False
) -> torch.Tensor | None:
    """A reusable per-thread output buffer on CPU (fresh multi-MB allocations per chunk cost more than the coding,
    measured); None elsewhere (accelerators have caching allocators). ``zeroed``: a separate buffer created
    zeroed, which its users leave zeroed (the kernel's scratch)."""
    if device.type != "cpu":
        return None
    numel = math.prod(shape)
    key = f"buffer_{dtype}_{zeroed}"
    buffer = getattr(_BUFFERS, key, None)
    if buffer is None or buffer.numel() < numel:
        size = numel if zeroed else max(numel, CPU_CHUNK_ELEMENTS)
        buffer = torch.zeros(size, dtype=dtype) if zeroed else torch.empty(size, dtype=dtype)
        setattr(_BUFFERS, key, buffer)
    return buffer[:numel].view(shape)


def _codes(chunk: torch.Tensor) -> torch.Tensor:
    """15-bit magnitude codes of a chunk (any strides), as a 1-D integer tensor (a per-thread buffer on CPU: use
    it before the next call on the same thread)."""
    dtype = chunk.dtype
    if dtype in (torch.bfloat16, torch.float16):
        bits = chunk.view(torch.int16)
        out = _code_buffer(bits.shape, torch.int16, bits.device)
        if out is None:
            return torch.bitwise_and(bits, 0x7FFF).reshape(-1)
        return torch.bitwise_and(bits, 0x7FFF, out=out).view(-1)
    if dtype == torch.float32 and chunk.dim() >= 1 and chunk.stride(-1) == 1:
        # The high 16 bits of each fp32 pattern through an int16 view: no float pass, exact bin edges, and half the
        # bytes of an int32 route (measured on 2 cores: 13 ms vs 15 ms for 4096x4096, both threads counting).
        bits = chunk.view(torch.int16)[..., _HIGH_HALF::2]
        out = _code_buffer(bits.shape, torch.int16, bits.device)
        if out is None:
            return torch.bitwise_and(bits, 0x7FFF).reshape(-1)
        # a strided copy then a contiguous in-place mask: ~10% faster than one masking pass over the strided view
        # (measured, 2M-element chunks on one core: 2.10 ms vs 2.33 ms with the bincount; the read pass 1.78 ms)
        return out.copy_(bits).bitwise_and_(0x7FFF).view(-1)
    if (
        dtype == torch.float32
    ):  # a last dimension with stride != 1 (a transposed view): through int32 and a shift
        bits = chunk.view(torch.int32)
        out = _code_buffer(bits.shape, torch.int32, bits.device)
        codes = (
            torch.bitwise_right_shift(bits, 16)
            if out is None
            else torch.bitwise_right_shift(bits, 16, out=out)
        )
        return codes.bitwise_and_(0x7FFF).reshape(-1)
    if histogram_kind(dtype) == "bf16":  # float8: exact in bf16
        return _codes(chunk.to(torch.bfloat16))
    return _codes(chunk.to(torch.float32))  # fp64 rounded to fp32


def _chunks(t: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Views of ``t`` of about ``size`` elements each (no copy, any strides; >2-D tensors are taken flattened)."""
    numel = t.numel()
    if t.dim() == 0:
        return [t.reshape(1)]
    if t.is_contiguous():
        flat = t.view(-1)
        return [flat[i : i + size] for i in range(0, numel, size)]
    if t.dim() == 1:
        return [t[i : i + size] for i in range(0, numel, size)]
    rows = t.shape[0]
    step = max(1, size // max(1, numel // rows))
    return [t[i : i + step] for i in range(0, rows, step)]


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_PREFIX = "weibull-histogram"


def _pool_size() -> int:
    """As many workers as torch may use threads (the user's torch.set_num_threads is respected)."""
    return max(1, getattr(_ONE_THREAD, "saved", None) or torch.get_num_threads())


_ONE_THREAD = threading.local()


@contextlib.contextmanager
def torch_on_one_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run torch's CPU ops single-threaded inside the block (the histogram pool keeps the caller's thread count).

    Why: torch's OpenMP workers spin for several ms after every parallel op, on the very cores the counting pool
    needs (measured: a 125M fp32 ``fit_many`` 83 ms with the fit's small ops parallel, 74 ms without); the fit's
    ops on [32, a few thousand] tensors gain nothing from a second thread. Restores the setting on exit; a no-op
    off CPU, nested, or when torch already runs one thread.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads <= 1 or getattr(_ONE_THREAD, "saved", None):
        yield
        return
    _ONE_THREAD.saved = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _ONE_THREAD.saved = None


def _thread_pool(size: int) -> ThreadPoolExecutor:
    """Workers for CPU histograms: counting runs on one thread per call, so chunks are spread across cores."""
    pool = _POOLS.get(size)
    if pool is None:
        pool = _POOLS[size] = ThreadPoolExecutor(max_workers=size, thread_name_prefix=_POOL_PREFIX)
    return pool


def _load_kernel() -> Callable[..., None] | None:
    """The compiled counting kernel, or None (not built, or WEIBULL_MONITOR_COUNTING=torch asks for torch ops)."""
    if os.environ.get("WEIBULL_MONITOR_COUNTING", "").strip().lower() == "torch":
        return None
    try:
        from weibull_monitor import _codecount
    except ImportError:
        return None
    return _codecount.count_codes


_KERNEL = _load_kernel()
COUNTING_BACKEND: str = "c-extension" if _KERNEL is not None else "torch"
"""How CPU histograms are counted: "c-extension" (the fused kernel built at install, ~0.3 ns per element per core)
or "torch" (mask pass + ``torch.bincount``, ~0.8 ns; used when no C compiler was available at install). Both give
identical counts; accelerators always count with torch ops."""


def _bincount(chunk: torch.Tensor) -> torch.Tensor:
    codes = _codes(chunk)
    try:
        return torch.bincount(codes, minlength=N_BINS)
    except (RuntimeError, NotImplementedError):  # a backend without int16 bincount: widen the codes
        return torch.bincount(codes.to(torch.int64), minlength=N_BINS)


def _kernel_words(chunk: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int] | None:
    """(tensor kept alive, word address, rows, cols, row stride, col stride) of the 16-bit words whose low 15 bits
    are the codes of a CPU chunk, for the kernel; None when the kernel cannot read it (then torch ops count it)."""
    if chunk.dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = chunk
    elif histogram_kind(chunk.dtype) == "bf16":  # float8: exact in bf16
        t = chunk.to(torch.bfloat16)
    else:  # fp64 rounded to fp32, as _codes does
        t = chunk.to(torch.float32)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() > 2:
        if not t.is_contiguous():
            return None
        t = t.view(-1)
    rows, cols = (1, t.shape[0]) if t.dim() == 1 else (t.shape[0], t.shape[1])
    row_stride, col_stride = (0, t.stride(0)) if t.dim() == 1 else (t.stride(0), t.stride(1))
    address = t.data_ptr()
    if t.dtype == torch.float32:  # the high half of each 4-byte pattern: 2 words per element
        address += 2 * _HIGH_HALF
        row_stride, col_stride = 2 * row_stride, 2 * col_stride
    return t, address, rows, cols, row_stride, col_stride


_ADD_LOCK = threading.Lock()

Span = tuple[int, int]
"""(first, last) raw code column >= 1 a count may have touched (column 0 holds the zeros until they move to
ZERO_COLUMN); NO_CODES when none, ALL_CODES when not known."""
NO_CODES: Span = (N_BINS, -1)
ALL_CODES: Span = (0, N_BINS - 1)


def _union(a: Span, b: Span) -> Span:
    return (min(a[0], b[0]), max(a[1], b[1]))


def _count_into(row: torch.Tensor, chunk: torch.Tensor) -> Span:
    """Add the code counts of a CPU chunk to ``row`` (contiguous int64 [N_BINS] on CPU); returns the columns it
    may have changed. Safe to call from several threads on one row: the kernel adds with the GIL held, the torch
    route under a lock."""
    if chunk.numel() == 0:
        return NO_CODES
    words = _kernel_words(chunk) if _KERNEL is not None else None
    if words is None:
        part = _bincount(chunk)
        with _ADD_LOCK:
            row += part
        return ALL_CODES
    _keep_alive, address, rows, cols, row_stride, col_stride = words
    scratch = _code_buffer(torch.Size([N_BINS]), torch.int32, row.device, zeroed=True)
    span = _KERNEL(address, rows, cols, row_stride, col_stride, scratch.data_ptr(), row.data_ptr())
    return NO_CODES if span is None else span


def _run_counts(jobs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Span:
    """Run (row, chunk) counting jobs on CPU, spread over the pool in groups of about equal element counts (one
    hand-off per worker, not per chunk: thousands of small matrices cost no more than their counting). Returns
    the union of the columns the jobs may have changed."""
    size = _pool_size()
    total = sum(chunk.numel() for _, chunk in jobs)
    if (
        size <= 1
        or len(jobs) <= 1
        or total < PARALLEL_MIN_ELEMENTS
        or threading.current_thread().name.startswith(_POOL_PREFIX)
    ):
        return _run_group(jobs)
    groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(size)]
    loads = [0] * size
    for job in sorted(jobs, key=lambda j: j[1].numel(), reverse=True):  # largest first, to the least loaded
        lightest = loads.index(min(loads))
        groups[lightest].append(job)
        loads[lightest] += job[1].numel()
    span = NO_CODES
    for part in _thread_pool(size).map(_run_group, groups):
        span = _union(span, part)
    return span


def _run_group(jobs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Span:
    span = NO_CODES
    for row, chunk in jobs:
        span = _union(span, _count_into(row, chunk))
    return span


def _raw_counts(t: torch.Tensor) -> torch.Tensor:
    """int64 [N_BINS] counts of the magnitude codes of ``t``, on its device, chunk by chunk."""
    if t.device.type != "cpu":
        acc = torch.zeros(N_BINS, dtype=torch.int64, device=t.device)
        for chunk in _chunks(t, DEVICE_CHUNK_ELEMENTS):
            acc += _bincount(chunk)
        return acc
    acc = torch.zeros(N_BINS, dtype=torch.int64)
    _run_counts([(acc, chunk) for chunk in _chunks(t, CPU_CHUNK_ELEMENTS)])
    return acc


def _finalise(raw: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """Raw code counts [M, N_BINS] -> count rows [M, N_COLUMNS]: zeros and Inf/NaN moved to their own columns."""
    counts = torch.zeros(raw.shape[0], N_COLUMNS, dtype=torch.int64, device=raw.device)
    counts[:, :N_BINS] = raw
    _move_special_columns(counts, kinds)
    return counts


def _move_special_columns(counts: torch.Tensor, kinds: Sequence[str]) -> None:
    """In place on [M, N_COLUMNS] rows whose code columns hold raw counts: code 0 -> ZERO_COLUMN, Inf/NaN codes ->
    NONFINITE_COLUMN."""
    counts[:, ZERO_COLUMN] = counts[:, 0]
    counts[:, 0] = 0
    for kind in set(kinds):
        first = _FIRST_NONFINITE_CODE[kind]
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if len(rows) == len(kinds):
            counts[:, NONFINITE_COLUMN] = counts[:, first:N_BINS].sum(1)
            counts[:, first:N_BINS] = 0
        else:
            index = torch.tensor(rows, device=counts.device)
            counts[index, NONFINITE_COLUMN] = counts[index, first:N_BINS].sum(1)
            counts[index, first:N_BINS] = 0


def _batched_raw_counts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[len(tensors), N_BINS] raw counts of small tensors on one device with a single bincount."""
    offsets = []
    for row, t in enumerate(tensors):
        offsets.append(_codes(t).to(torch.int32) + row * N_BINS)
    flat = torch.cat(offsets)
    return torch.bincount(flat, minlength=len(tensors) * N_BINS).view(len(tensors), N_BINS)


# ---------------------------------------------------------------------------------------------------------------
# Code tables


_TABLES: dict[str, torch.Tensor] = {}


def _code_values(kind: str) -> torch.Tensor:
    """float64 value of every code 0..N_BINS of a kind (codes from Inf upwards: a placeholder past the largest)."""
    codes = torch.arange(N_BINS + 1, dtype=torch.int32)
    if kind == "fp16":
        values = codes[:N_BINS].to(torch.int16).view(torch.float16).to(torch.float64)
        values = torch.cat([values, values[-1:]])
        placeholder = 2.0**16
    else:
        values = (codes << 16).view(torch.float32).to(torch.float64)
        placeholder = 2.0**128
    values[_FIRST_NONFINITE_CODE[kind] :] = placeholder
    return values


def _tables(device: torch.device) -> torch.Tensor:
    """[3, len(KINDS), N_BINS] float64: ln of (code value, bin low edge, bin high edge) for every kind.

    Exact kinds (bf16, fp16) come from round-to-nearest, so a code's bin reaches halfway to each neighbour; the fp32
    kind truncates, so code c's bin is [v(c), v(c+1)).
    """
    key = str(device)
    table = _TABLES.get(key)
    if table is None:
        per_kind = []
        for kind in KINDS:
            v = _code_values(kind)
            value = v[:N_BINS]
            nxt = v[1 : N_BINS + 1]
            prev = torch.cat([torch.zeros(1, dtype=torch.float64), v[: N_BINS - 1]])
            if kind in EXACT_KINDS:
                lo, hi = (prev + value) / 2, (value + nxt) / 2
            else:
                lo, hi = value, nxt
            per_kind.append(torch.stack([torch.log(value), torch.log(lo), torch.log(hi)]))
        table = torch.stack(per_kind, dim=1)
        table[~torch.isfinite(table)] = 0.0  # code 0 (ln 0) is never looked up: its count is always 0
        table = table.to(device)
        _TABLES[key] = table
    return table


# ---------------------------------------------------------------------------------------------------------------
# Fitting counts


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


ACCELERATOR_FIT_ON_CPU = False
"""Tests only: fit CPU counts the way accelerators do (full code width, no host reads before the one transfer), so
that path is checked on machines without an accelerator."""


def _host_reads_free(device: torch.device) -> bool:
    """Whether the fit may read values back to the host mid-way (to narrow its work): on CPU, where that is free."""
    return device.type == "cpu" and not ACCELERATOR_FIT_ON_CPU


class _Compact(NamedTuple):
    """Count rows cut to code columns ``offset .. offset + mags.shape[1] - 1`` (every other code column is 0)."""

    mags: torch.Tensor  # int64 or int32 [M, W] (the fit's cumulative counts are int64 either way)
    offset: int
    zeros: torch.Tensor  # int64 [M]: ZERO_COLUMN
    nonfinite: torch.Tensor  # int64 [M]: NONFINITE_COLUMN

    def rows(self, start: int, stop: int) -> _Compact:
        return _Compact(
            self.mags[start:stop], self.offset, self.zeros[start:stop], self.nonfinite[start:stop]
        )


def _compact(counts: torch.Tensor, span: Span = ALL_CODES, copy: bool = False) -> _Compact:
    """``counts`` [M, N_COLUMNS] cut to the code columns in use. On CPU, where host syncs are free, to ``span``
    when it is known, else to the columns some row uses (``amax`` over rows: one read of the counts); elsewhere
    the full width. ``copy``: own the data (the counts buffer is then free for reuse)."""
    lo, hi = 1, N_BINS - 1  # code 0 has moved to ZERO_COLUMN
    if _host_reads_free(counts.device):
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
    return _Compact(mags, lo, zeros, nonfinite)


def _concat_compact(parts: Sequence[_Compact]) -> _Compact:
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
    return _Compact(mags, lo, torch.cat([p.zeros for p in parts]), torch.cat([p.nonfinite for p in parts]))


def _fit_compact(counts: _Compact, kinds: Sequence[str], reasons: Sequence[str | None]) -> list[WeibullFit]:
    """Fit every row of compact counts; one device-to-host transfer for the whole batch."""
    m = counts.mags.shape[0]
    if m == 0:
        return []
    kind_idx = torch.tensor([KINDS.index(k) for k in kinds], device=counts.mags.device)
    rows = _block_rows(counts.mags.shape[1])
    threads = _pool_size()
    # torch runs these small ops on one thread: the pool's threads fit blocks side by side instead, one block
    # each and one round only. More rounds kept every worker's malloc arena full of fit temporaries: 1000 rows on
    # each of 2 ranks peaked at 130-190 MB of RSS instead of 66-78 MB (measured).
    parallel = (
        counts.mags.device.type == "cpu"
        and threads > 1
        and 2 * PARALLEL_FIT_MIN_ROWS <= m <= threads * rows
        and not threading.current_thread().name.startswith(_POOL_PREFIX)
    )
    if parallel:
        rows = max(PARALLEL_FIT_MIN_ROWS, -(-m // threads))
    work = [(counts.rows(i, i + rows), kind_idx[i : i + rows]) for i in range(0, m, rows)]
    if parallel and len(work) > 1:
        blocks = list(_thread_pool(threads).map(_fit_block_no_grad, work))
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


def _block_rows(width: int) -> int:
    """Rows per fitted block for counts ``width`` code columns wide (FIT_BLOCK_ROWS at most, 8 at least)."""
    return max(8, min(FIT_BLOCK_ROWS, FIT_BLOCK_ELEMENTS // max(1, width)))


def _fit_block_no_grad(block: tuple[_Compact, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():  # a pool thread does not inherit the caller's grad mode
        return _fit_rows_on_device(*block)


def _fit_rows_on_device(counts: _Compact, kind_idx: torch.Tensor) -> torch.Tensor:
    """[rows, 4 + len(SUM_NAMES) + 5] float64 on the counts' device: (n, n_zero, n_nonfinite, codes spanned by
    the middle band), the regression sums, the quantiles. No host sync, except free ones on CPU.
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
    if _host_reads_free(device):  # no wider than the widest row needs
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
    span_codes = torch.searchsorted(cum, torch.stack([lo, hi], dim=1).contiguous()).clamp(max=last_column)
    span = span_codes[:, 1] - span_codes[:, 0] + 1

    # Exact kinds beyond the rank-by-rank size: the step function x(rank) is known exactly, so the sums that
    # involve x are taken bin by bin, with sums of y over each bin's ranks in closed form (_rank_sums_of_y).
    stepped = rounded & ~exact_rows
    if not _host_reads_free(device) or bool(stepped.any()):
        if _host_reads_free(device):  # look only at the codes of the middle band
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
    f, w = _quadrature._nodes(0.0, 1.0)
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
    x = _tables(device)[0][kind_idx[:, None].expand_as(idx), idx + offset]
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
    table = _tables(cum.device).reshape(3, -1)
    # The element at position r is in the first code whose cumulative count reaches ceil(r).
    code = torch.searchsorted(cum, torch.ceil(pos).to(torch.int64)).clamp_(max=cum.shape[1] - 1)
    count = mags.gather(1, code)
    t = (cum.gather(1, code) - count).to(torch.float64).neg_().add_(pos)  # position within the code's bin
    t.div_(count.to(torch.float64).clamp_(min=1.0)).clamp_(0.0, 1.0)
    del count
    flat = code.add_(offset).add_(kind_idx[:, None] * N_BINS).view(-1)
    low = table[1].index_select(0, flat).view_as(pos)
    low.lerp_(table[2].index_select(0, flat).view_as(pos), t)
    return torch.where(step, table[0].index_select(0, flat).view_as(pos), low)


# ---------------------------------------------------------------------------------------------------------------
# Public classes


class WeightHistogram:
    """Counts of the bf16 magnitude code of one matrix (or one shard of it), on the tensor's device.

    ``counts`` is an int64 tensor [N_COLUMNS]. Histograms of shards of one matrix add (``a + b`` or ``merge``)
    to the histogram of the whole. ``reason`` is set when the tensor could not be read (the fit is then not ok).
    """

    def __init__(self, counts: torch.Tensor, kind: str, reason: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if counts.shape != (N_COLUMNS,):
            raise ValueError(f"counts must have shape ({N_COLUMNS},), got {tuple(counts.shape)}")
        self.counts = counts
        self.kind = kind
        self.reason = reason

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> WeightHistogram:
        """Histogram of |tensor| on its own device: chunked, no full-size float copy, any strides."""
        t, reason = readable_tensor(tensor)
        if t is None:
            device = tensor.device if tensor.device.type != "meta" else torch.device("cpu")
            return cls(torch.zeros(N_COLUMNS, dtype=torch.int64, device=device), "fp32", reason)
        kind = histogram_kind(t.dtype)
        with torch.no_grad():
            return cls(_finalise(_raw_counts(t)[None, :], [kind])[0], kind)

    def merge(self, other: WeightHistogram) -> WeightHistogram:
        """Histogram of the union of both tensors' elements (shards of one matrix)."""
        if not isinstance(other, WeightHistogram):
            return NotImplemented
        if self.reason or other.reason:  # an unreadable part makes the whole unreadable, whatever the kinds
            reason = self.reason or other.reason
            return WeightHistogram(self.counts + other.counts.to(self.counts.device), self.kind, reason)
        if other.kind != self.kind:
            raise ValueError(
                f"cannot merge a {self.kind} histogram with a {other.kind} one (different dtypes)"
            )
        return WeightHistogram(
            self.counts + other.counts.to(self.counts.device), self.kind, self.reason or other.reason
        )

    __add__ = merge

    @property
    def n(self) -> int:
        """Finite nonzero elements counted."""
        return int(self.counts[:N_BINS].sum())

    @property
    def n_zero(self) -> int:
        return int(self.counts[ZERO_COLUMN])

    @property
    def n_nonfinite(self) -> int:
        return int(self.counts[NONFINITE_COLUMN])

    def fit(self) -> WeibullFit:
        """The middle-80% Weibull fit of these counts (never raises)."""
        return HistogramBatch(self.counts[None, :], [self.kind], [self.reason]).fit_all()[0]

    def __repr__(self) -> str:
        return f"WeightHistogram(kind={self.kind!r}, n={self.n}, n_zero={self.n_zero}, n_nonfinite={self.n_nonfinite})"


class HistogramBatch:
    """Histograms of many matrices: ``counts`` int64 [M, N_COLUMNS] on the tensors' device.

    All-reduce ``counts`` with SUM across the shards of the same matrices, then ``fit_all()``. ``kinds`` and
    ``reasons`` are per row (a row with a reason could not be read and fits as not ok).
    """

    def __init__(
        self, counts: torch.Tensor, kinds: Sequence[str], reasons: Sequence[str | None] | None = None
    ) -> None:
        if counts.dim() != 2 or counts.shape[1] != N_COLUMNS:
            raise ValueError(f"counts must have shape [M, {N_COLUMNS}], got {tuple(counts.shape)}")
        if len(kinds) != counts.shape[0]:
            raise ValueError("one kind per row")
        self.counts = counts
        self.kinds = list(kinds)
        self.reasons = list(reasons) if reasons is not None else [None] * len(self.kinds)

    def __len__(self) -> int:
        return len(self.kinds)

    def histogram(self, i: int) -> WeightHistogram:
        return WeightHistogram(self.counts[i], self.kinds[i], self.reasons[i])

    def fit_all(self) -> list[WeibullFit]:
        """One WeibullFit per row, with one device-to-host transfer for the whole batch (never raises)."""
        counts = self.counts
        if counts.device.type == "mps":  # no float64 there: fit the (small) counts on the CPU, one transfer
            counts = counts.cpu()
        return _fit_guarded(lambda: _compact(counts), self.kinds, self.reasons, counts.device)


def histogram_batch(tensors: Sequence[torch.Tensor]) -> HistogramBatch:
    """Histograms of many tensors in one [M, N_COLUMNS] count tensor (TypeError for a non-tensor).

    Large tensors are counted chunk by chunk, small ones together. The counts live on the device of the first
    readable tensor; a row that cannot be read carries its reason and zero counts.
    """
    counts, kinds, reasons, _ = _count_batch(tensors)
    return HistogramBatch(counts, kinds, reasons)


def _count_batch(
    tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[str], list[str | None], Span]:
    """(counts [M, N_COLUMNS], kinds, reasons, span): ``span`` holds every code column but ZERO_COLUMN and
    NONFINITE_COLUMN that may be nonzero (ALL_CODES when some row was not counted by the kernel). ``out``: a
    zeroed [M, N_COLUMNS] int64 buffer on the tensors' device to count into, instead of a new one."""
    readable: list[torch.Tensor | None] = []
    kinds: list[str] = []
    reasons: list[str | None] = []
    for tensor in tensors:
        t, reason = readable_tensor(tensor)
        readable.append(t)
        reasons.append(reason)
        kinds.append(histogram_kind(t.dtype) if t is not None else "fp32")
    device = next((t.device for t in readable if t is not None), torch.device("cpu"))
    if out is None or out.device != device:
        out = torch.zeros(len(readable), N_COLUMNS, dtype=torch.int64, device=device)
    counts = out
    raw = counts[:, :N_BINS]  # filled in place: no second [M, N_COLUMNS] copy
    small: list[int] = []  # shared torch bincounts, where the kernel does not count
    cpu_jobs: list[
        tuple[torch.Tensor, torch.Tensor]
    ] = []  # (row, chunk): spread over the pool across matrices
    span = NO_CODES
    with torch.no_grad(), torch_on_one_thread(device):
        for i, t in enumerate(readable):
            if t is None:
                continue
            on_cpu = t.device.type == "cpu" and device.type == "cpu"
            if on_cpu and (_KERNEL is not None or t.numel() > SMALL_ELEMENTS):
                cpu_jobs += [(raw[i], c) for c in _chunks(t, CPU_CHUNK_ELEMENTS)]
            elif t.numel() <= SMALL_ELEMENTS and t.device == device:
                small.append(i)
                span = ALL_CODES
            else:
                raw[i] = _raw_counts(t).to(device)
                span = ALL_CODES
        span = _union(span, _run_counts(cpu_jobs))
        for start in range(0, len(small), BATCH_ROWS):
            rows = small[start : start + BATCH_ROWS]
            part = _batched_raw_counts([readable[i] for i in rows])
            raw[torch.tensor(rows, device=device)] = part
        _move_special_columns(counts, kinds)
    return counts, kinds, reasons, span


def fit_tensors(tensors: Sequence[torch.Tensor]) -> list[WeibullFit]:
    """One histogram fit per tensor, in order: the engine of ``fit.fit_many`` (never raises for a tensor).

    Counts SLICE_ROWS tensors at a time into one reused [SLICE_ROWS, N_COLUMNS] buffer; on CPU each slice is cut
    to the codes it used and up to FIT_BLOCK_ROWS rows are fitted together, so a snapshot pays the fit's fixed
    per-op costs once per ~128 matrices, not once per 32 (measured on a 125M model: fit 17 -> ~8 ms of 55).
    Accelerators fit slice by slice at full width (narrowing needs a host sync).
    """
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    with torch.no_grad(), torch_on_one_thread(first.device if first is not None else "cpu"):
        fits: list[WeibullFit] = []
        pending: list[tuple[_Compact, list[str], list[str | None]]] = []
        # the first full slice's counts, zeroed and reused by the next slices (not kept between calls: a
        # long-lived 8 MB block keeps glibc's mmap threshold low, and the fit's temporaries then page-fault: the
        # fit of a 125M model took 12-14 ms instead of 8-10, measured)
        buffer: torch.Tensor | None = None
        counts: torch.Tensor | None = None
        for start in range(0, len(tensors), SLICE_ROWS):
            part = tensors[start : start + SLICE_ROWS]
            out = buffer[: len(part)] if buffer is not None else None
            counts, kinds, reasons, span = _count_batch(part, out)
            if counts.device.type != "cpu":
                fits += HistogramBatch(counts, kinds, reasons).fit_all()
                continue
            pending.append((_compact(counts, span, copy=True), kinds, reasons))
            if len(part) == SLICE_ROWS:
                _zero_span(counts, span)
                buffer = counts
            rows = sum(len(k) for _, k, _ in pending)
            first_code = min(c.offset for c, _, _ in pending)
            width = max(c.offset + c.mags.shape[1] for c, _, _ in pending) - first_code
            if rows >= _block_rows(width):
                fits += _fit_pending(pending)
        buffer = counts = None  # the last fit needs the memory more than the count buffer
        return fits + _fit_pending(pending)


def fit_packed_counts(packed: torch.Tensor, first_code: int, kinds: Sequence[str]) -> list[WeibullFit]:
    """Fits of count rows packed to a code span: ``packed`` [M, width + 2] holds codes ``first_code`` ..
    ``first_code + width - 1``, then ZERO_COLUMN and NONFINITE_COLUMN (every other code column 0), as the
    distributed path reduces them. No full-width rows are built; never raises (failed fits carry the reason)."""

    def build() -> _Compact:
        # int32 rows are fitted as they are (cumulative counts come out int64): no int64 copy of the whole block
        rows, width = packed.shape[0], packed.shape[1] - 2
        if width <= 0:  # no code used by any row: one empty column keeps the shapes valid
            empty = torch.zeros(rows, 1, dtype=packed.dtype, device=packed.device)
            return _Compact(empty, 1, packed[:, 0], packed[:, 1])
        return _Compact(packed[:, :width], first_code, packed[:, width], packed[:, width + 1])

    return _fit_guarded(build, kinds, [None] * packed.shape[0], packed.device)


def _fit_pending(pending: list[tuple[_Compact, list[str], list[str | None]]]) -> list[WeibullFit]:
    """Fit the pending slices together and empty ``pending`` (their counts are freed once concatenated)."""
    if not pending:
        return []
    kinds = [k for _, ks, _ in pending for k in ks]
    reasons = [r for _, _, rs in pending for r in rs]

    def build() -> _Compact:
        parts = [c for c, _, _ in pending]
        pending.clear()
        return _concat_compact(parts)

    return _fit_guarded(build, kinds, reasons, torch.device("cpu"))


def _fit_guarded(
    build: Callable[[], _Compact], kinds: Sequence[str], reasons: Sequence[str | None], device: torch.device
) -> list[WeibullFit]:
    """``_fit_compact`` of the block ``build()`` makes, in inference mode with torch on one thread; never raises:
    a failure becomes one failed fit per row, carrying the row's own reason where it has one."""
    try:
        with torch.inference_mode(), torch_on_one_thread(device):
            return _fit_compact(build(), kinds, reasons)
    except Exception as exc:  # never take training down
        why = f"fit failed: {type(exc).__name__}: {exc}"
        return [failed_fit(r or why, "histogram") for r in reasons]


def _zero_span(counts: torch.Tensor, span: Span) -> None:
    """Zero every column of ``counts`` that a count with this ``span`` may have written."""
    if span == NO_CODES:
        counts[:, N_BINS:] = 0
    elif span == ALL_CODES:
        counts.zero_()
    else:
        counts[:, span[0] : span[1] + 1] = 0
        counts[:, 0] = 0
        counts[:, N_BINS:] = 0
