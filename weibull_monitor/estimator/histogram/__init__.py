"""Histograms of the bf16 magnitude code of weights: one cheap read pass per matrix, counts that add across shards.

Pipeline inside: ``codes`` (what a code is, the code tables) -> ``runtime`` (counting on CPU: the C kernel or
torch ops, the thread pool, reusable buffers; :func:`count_batch` is the counting API the distributed path uses)
-> ``fit_counts`` (the protocol's regression on count rows) -> ``batch`` (the public classes and engines).
"""

from weibull_monitor.estimator.histogram.batch import (
    SLICE_ROWS,
    HistogramBatch,
    WeightHistogram,
    fit_packed_counts,
    fit_tensors,
    histogram_batch,
)
from weibull_monitor.estimator.histogram.codes import (
    N_BINS,
    N_COLUMNS,
    NONFINITE_COLUMN,
    ZERO_COLUMN,
    histogram_kind,
    pack_used_codes,
)
from weibull_monitor.estimator.histogram.runtime import (
    COUNTING_BACKEND,
    CountBuffer,
    Counted,
    count_batch,
    counting_backend,
    torch_on_one_thread,
)

__all__ = [
    "COUNTING_BACKEND",
    "NONFINITE_COLUMN",
    "N_BINS",
    "N_COLUMNS",
    "SLICE_ROWS",
    "ZERO_COLUMN",
    "CountBuffer",
    "Counted",
    "HistogramBatch",
    "WeightHistogram",
    "count_batch",
    "counting_backend",
    "fit_packed_counts",
    "fit_tensors",
    "histogram_batch",
    "histogram_kind",
    "pack_used_codes",
    "torch_on_one_thread",
]
