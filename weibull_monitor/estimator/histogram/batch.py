"""The histogram API: :class:`WeightHistogram` (one matrix, mergeable across shards), :class:`HistogramBatch` (many,
one all-reduce, one fit), and the engines behind ``fit_many`` and the distributed path."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weibull_monitor.estimator.histogram.codes import (
    KINDS,
    N_BINS,
    N_COLUMNS,
    NONFINITE_COLUMN,
    ZERO_COLUMN,
    finalise,
    histogram_kind,
)
from weibull_monitor.estimator.histogram.fit_counts import (
    Compact,
    block_rows,
    compact,
    concat_compact,
    fit_guarded,
    host_reads_by_default,
)
from weibull_monitor.estimator.histogram.runtime import (
    CountBuffer,
    count_batch,
    raw_counts,
    torch_on_one_thread,
)
from weibull_monitor.estimator.protocol import readable_tensor
from weibull_monitor.estimator.record import WeibullFit

__all__ = [
    "SLICE_ROWS",
    "HistogramBatch",
    "WeightHistogram",
    "fit_packed_counts",
    "fit_tensors",
    "histogram_batch",
]

SLICE_ROWS = 32
"""Matrices per count block in ``fit_many`` (``fit_tensors``): the int64 counts of a slice take 8 MB whatever
the matrices' sizes, and its fit temporaries no more (so a snapshot's extra memory does not grow with the model)."""


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
            return cls(finalise(raw_counts(t)[None, :], [kind])[0], kind)

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

    def fit_all(self, *, host_reads: bool | None = None) -> list[WeibullFit]:
        """One WeibullFit per row, with one device-to-host transfer for the whole batch (never raises).

        ``host_reads``: whether the fit may read values back mid-way to narrow its work (None: only on CPU, where
        that is free; False runs the accelerator path). The answers are the same either way.
        """
        counts = self.counts
        if counts.device.type == "mps":  # no float64 there: fit the (small) counts on the CPU, one transfer
            counts = counts.cpu()
        return fit_guarded(
            lambda: compact(counts, host_reads=host_reads),
            self.kinds,
            self.reasons,
            counts.device,
            host_reads,
        )


def histogram_batch(tensors: Sequence[torch.Tensor]) -> HistogramBatch:
    """Histograms of many tensors in one [M, N_COLUMNS] count tensor (TypeError for a non-tensor).

    Large tensors are counted chunk by chunk, small ones together. The counts live on the device of the first
    readable tensor; a row that cannot be read carries its reason and zero counts.
    """
    counted = count_batch(tensors)
    return HistogramBatch(counted.counts, counted.kinds, counted.reasons)


def fit_tensors(
    tensors: Sequence[torch.Tensor],
    *,
    host_reads: bool | None = None,
    exact_zeros: list[int | None] | None = None,
) -> list[WeibullFit]:
    """One histogram fit per tensor, in order: the engine of ``fit_many`` (never raises for a tensor).

    Counts SLICE_ROWS tensors at a time into one reused [SLICE_ROWS, N_COLUMNS] block; on CPU each slice is cut
    to the codes it used and up to FIT_BLOCK_ROWS rows are fitted together, so a snapshot pays the fit's fixed
    per-op costs once per ~128 matrices, not once per 32 (measured on a 125M model: fit 17 -> ~8 ms of 55).
    Accelerators fit slice by slice at full width (narrowing needs a host sync). ``host_reads``: as in
    :meth:`HistogramBatch.fit_all`. ``exact_zeros``: a list to extend with each tensor's exact zeros where the
    kernel counted them, else None (for ``in_histogram_range``).
    """
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    narrow = host_reads_by_default(device) if host_reads is None else host_reads
    with torch.no_grad(), torch_on_one_thread(device):
        fits: list[WeibullFit] = []
        pending: list[tuple[Compact, list[str], list[str | None]]] = []
        # one count block reused slice after slice (not kept between calls: a long-lived 8 MB block keeps
        # glibc's mmap threshold low, and the fit's temporaries then page-fault: the fit of a 125M model took
        # 12-14 ms instead of 8-10, measured)
        buffer = CountBuffer(SLICE_ROWS)
        for start in range(0, len(tensors), SLICE_ROWS):
            counted = buffer.count(tensors[start : start + SLICE_ROWS])
            if exact_zeros is not None:
                exact_zeros += counted.exact_zeros or [None] * len(counted.kinds)
            if not narrow:
                fits += HistogramBatch(counted.counts, counted.kinds, counted.reasons).fit_all(
                    host_reads=False
                )
                continue
            pending.append((compact(counted.counts, counted.span, copy=True), counted.kinds, counted.reasons))
            buffer.recycle(counted)
            rows = sum(len(k) for _, k, _ in pending)
            first_code = min(c.offset for c, _, _ in pending)
            width = max(c.offset + c.mags.shape[1] for c, _, _ in pending) - first_code
            if rows >= block_rows(width):
                fits += _fit_pending(pending)
        buffer.clear()  # the last fit needs the memory more than the count block
        return fits + _fit_pending(pending)


def fit_packed_counts(
    packed: torch.Tensor, first_code: int, kinds: Sequence[str], *, host_reads: bool | None = None
) -> list[WeibullFit]:
    """Fits of count rows packed to a code span: ``packed`` [M, width + 2] holds codes ``first_code`` ..
    ``first_code + width - 1``, then ZERO_COLUMN and NONFINITE_COLUMN (every other code column 0), as the
    distributed path reduces them. No full-width rows are built; never raises (failed fits carry the reason)."""

    def build() -> Compact:
        # int32 rows are fitted as they are (cumulative counts come out int64): no int64 copy of the whole block
        rows, width = packed.shape[0], packed.shape[1] - 2
        if width <= 0:  # no code used by any row: one empty column keeps the shapes valid
            empty = torch.zeros(rows, 1, dtype=packed.dtype, device=packed.device)
            return Compact(empty, 1, packed[:, 0], packed[:, 1])
        return Compact(packed[:, :width], first_code, packed[:, width], packed[:, width + 1])

    return fit_guarded(build, kinds, [None] * packed.shape[0], packed.device, host_reads)


def _fit_pending(pending: list[tuple[Compact, list[str], list[str | None]]]) -> list[WeibullFit]:
    """Fit the pending slices together and empty ``pending`` (their counts are freed once concatenated)."""
    if not pending:
        return []
    kinds = [k for _, ks, _ in pending for k in ks]
    reasons = [r for _, _, rs in pending for r in rs]

    def build() -> Compact:
        parts = [c for c, _, _ in pending]
        pending.clear()
        return concat_compact(parts)

    return fit_guarded(build, kinds, reasons, torch.device("cpu"), True)
