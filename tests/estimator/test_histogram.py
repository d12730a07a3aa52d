"""bf16 / fp16 / fp32 magnitude-code histograms: coding, special values, chunking, strided views, merging, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weibull_monitor.estimator import fit_weibull
from weibull_monitor.estimator import histogram as H
from weibull_monitor.estimator.histogram import (
    N_BINS,
    N_COLUMNS,
    NONFINITE_COLUMN,
    ZERO_COLUMN,
    HistogramBatch,
    WeightHistogram,
    histogram_batch,
)
from weibull_monitor.estimator.histogram import codes as C
from weibull_monitor.estimator.histogram import fit_counts as F
from weibull_monitor.estimator.histogram import runtime as R


def counts_of(t: torch.Tensor) -> torch.Tensor:
    return WeightHistogram.from_tensor(t).counts


def test_layout():
    assert N_BINS == 32768 and N_COLUMNS == N_BINS + 2
    assert (ZERO_COLUMN, NONFINITE_COLUMN) == (N_BINS, N_BINS + 1)


@pytest.mark.parametrize(("dtype", "first_nonfinite"), [(torch.bfloat16, 0x7F80), (torch.float16, 0x7C00)])
def test_every_bit_pattern_lands_in_its_code(dtype, first_nonfinite):
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)  # both signs of every magnitude
    counts = counts_of(patterns.view(dtype))
    assert counts.shape == (N_COLUMNS,) and counts.dtype == torch.int64
    assert int(counts[ZERO_COLUMN]) == 2  # +0 and -0
    assert int(counts[NONFINITE_COLUMN]) == 2 * (N_BINS - first_nonfinite)  # +-Inf and every NaN
    assert torch.all(counts[1:first_nonfinite] == 2)  # subnormals are finite nonzero, one code each
    assert int(counts[0]) == 0 and torch.all(counts[first_nonfinite:N_BINS] == 0)


def test_codes_are_monotone_in_magnitude():
    values = torch.logspace(-30, 30, 20001, dtype=torch.float64).to(torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        v = values.to(dtype)
        v = v[torch.isfinite(v) & (v != 0)]
        codes = R.codes_of(v).to(torch.int64)
        assert torch.all(codes[1:] >= codes[:-1]), dtype
        assert torch.equal(codes, R.codes_of(-v).to(torch.int64))  # the sign is not part of the code


def test_fp32_codes_truncate_with_exact_edges():
    table = C.code_values("fp32")
    for code in (0x3C00, 0x3F80, 0x3F81, 0x4000, 0x0080):
        edge = torch.tensor([table[code].item()], dtype=torch.float32)
        below = torch.nextafter(edge, torch.zeros(1))
        top = torch.nextafter(torch.tensor([table[code + 1].item()], dtype=torch.float32), torch.zeros(1))
        assert int(R.codes_of(edge)[0]) == code
        assert int(R.codes_of(below)[0]) == code - 1
        assert int(R.codes_of(top)[0]) == code


def test_bf16_bins_reach_halfway_to_the_neighbours():
    # A bf16 cast rounds to nearest: the values that become code c lie between the midpoints to c-1 and c+1,
    # which is the bin the interpolating quantile lookup uses for the exact kinds.
    table = C.tables(torch.device("cpu"))
    kind = C.KINDS.index("bf16")
    for code in (0x3C10, 0x3F80, 0x4001):
        value, low, high = (float(np.exp(table[i, kind, code].item())) for i in range(3))
        eps = 1e-7 * value
        inside = torch.tensor([low + eps, high - eps], dtype=torch.float64).to(torch.bfloat16)
        outside = torch.tensor([low - eps, high + eps], dtype=torch.float64).to(torch.bfloat16)
        assert [int(c) for c in R.codes_of(inside)] == [code, code]
        assert [int(c) for c in R.codes_of(outside)] == [code - 1, code + 1]


def test_special_values_and_documented_corners():
    tiny = 2.0**-140  # fp32 subnormal whose high 16 bits are zero: counted as zero (documented)
    small = 2.0**-130  # fp32 subnormal that keeps a nonzero code
    w = torch.tensor([0.0, -0.0, tiny, small, 1.0, -2.0, float("inf"), float("-inf"), float("nan")])
    h = WeightHistogram.from_tensor(w)
    assert (h.n, h.n_zero, h.n_nonfinite) == (3, 3, 3)
    w64 = torch.tensor(
        [1e300, 1.0, 0.0], dtype=torch.float64
    )  # beyond fp32: rounds to Inf, reported non-finite
    h64 = WeightHistogram.from_tensor(w64)
    assert (h64.n, h64.n_zero, h64.n_nonfinite) == (1, 1, 1)


def test_unreadable_tensors_give_an_empty_histogram_with_a_reason():
    h = WeightHistogram.from_tensor(torch.ones(4, 4, dtype=torch.int8))
    assert h.reason and "floating point" in h.reason and h.n == 0
    fit = h.fit()
    assert not fit.ok and fit.reason == h.reason
    with pytest.raises(TypeError):
        WeightHistogram.from_tensor("weights")


# --------------------------------------------------------------------------------------------------------------
# Chunks, threads and strided views


def _reference_counts(t: torch.Tensor) -> torch.Tensor:
    raw = torch.bincount(R.codes_of(t.contiguous().reshape(-1)).to(torch.int64), minlength=N_BINS)
    return C.finalise(raw[None, :], [H.histogram_kind(t.dtype)])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_chunked_threaded_counting_equals_one_bincount(monkeypatch, dtype):
    w = (torch.randn(300, 257) * 0.02).to(dtype)
    w[0, 0] = float("nan")
    w[5, 7] = 0.0
    monkeypatch.setattr(R, "CPU_CHUNK_ELEMENTS", 1000)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # the thread pool spreads the chunks
    try:
        threaded = counts_of(w)
        assert torch.get_num_threads() == 2  # the caller's own setting is left as it was
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(threaded, _reference_counts(w))
    assert torch.equal(counts_of(w), threaded)


def test_chunks_are_views_not_copies():
    w = torch.randn(512, 384)
    for view in (w, w[:, 128:256], w.t(), w[::2], w[100:300]):
        chunks = R.chunks(view, 4096)
        assert sum(c.numel() for c in chunks) == view.numel()
        assert all(c.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for c in chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_views_of_a_fused_matrix(monkeypatch, dtype):
    monkeypatch.setattr(R, "CPU_CHUNK_ELEMENTS", 5000)
    fused = (torch.randn(3 * 128, 96) * 0.02).to(dtype)  # a QKV projection: rows [q; k; v]
    views = {
        "q rows": fused[:128],
        "k rows": fused[128:256],
        "column block": fused[:, 32:64],
        "transposed": fused.t(),
        "every other row": fused[::2],
        "interleaved heads": fused.view(3, 4, 32, 96)[:, 1].reshape(-1, 96)[::1],
    }
    for label, view in views.items():
        assert torch.equal(counts_of(view), _reference_counts(view)), label
        assert fit_weibull(view).to_dict() == fit_weibull(view.contiguous()).to_dict(), label


# --------------------------------------------------------------------------------------------------------------
# Merging: the counts of shards add up to the counts of the whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_of_two_halves_equals_the_whole(dtype):
    w = (torch.randn(256, 200) * 0.02).to(dtype)
    w[3, 4] = float("inf")
    w[100, 9] = 0.0
    whole = WeightHistogram.from_tensor(w)
    for a, b in ((w[:100], w[100:]), (w[:, :77], w[:, 77:])):
        ha, hb = WeightHistogram.from_tensor(a), WeightHistogram.from_tensor(b)
        merged = ha + hb
        assert torch.equal(merged.counts, whole.counts)
        assert torch.equal(ha.merge(hb).counts, whole.counts)
        assert (merged.n, merged.n_zero, merged.n_nonfinite) == (whole.n, 1, 1)
        assert merged.fit().to_dict() == whole.fit().to_dict()


def test_merge_refuses_different_dtypes():
    a = WeightHistogram.from_tensor(torch.randn(16, 16))
    b = WeightHistogram.from_tensor(torch.randn(16, 16).to(torch.bfloat16))
    with pytest.raises(ValueError, match="different dtypes"):
        a.merge(b)
    with pytest.raises(ValueError):
        WeightHistogram(torch.zeros(10, dtype=torch.int64), "fp32")
    with pytest.raises(ValueError):
        WeightHistogram(torch.zeros(N_COLUMNS, dtype=torch.int64), "int8")


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 60),
    cols=st.integers(1, 60),
    cut=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 10_000),
)
def test_any_split_merges_back(rows, cols, cut, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    i = int(cut * rows)
    merged = WeightHistogram.from_tensor(w[:i]) + WeightHistogram.from_tensor(w[i:])
    assert torch.equal(merged.counts, counts_of(w))


# --------------------------------------------------------------------------------------------------------------
# Batches


def test_batch_equals_single_histograms_and_fits(monkeypatch):
    monkeypatch.setattr(R, "SMALL_ELEMENTS", 5000)  # some rows share a bincount, others are counted alone
    monkeypatch.setattr(R, "BATCH_ROWS", 2)
    monkeypatch.setattr(F, "FIT_BLOCK_ROWS", 3)  # the fit runs in row blocks, still one transfer at the end
    tensors = [
        torch.randn(40, 40),
        (torch.randn(30, 50) * 3).to(torch.bfloat16),
        torch.randn(100, 100).to(torch.float16),
        torch.randn(64, 64)[:, ::2],
        torch.zeros(8, 8),
        torch.ones(5, dtype=torch.int16),
        torch.randn(20, 20, dtype=torch.float64),
    ]
    batch = histogram_batch(tensors)
    assert batch.counts.shape == (len(tensors), N_COLUMNS) and len(batch) == len(tensors)
    fits = batch.fit_all()
    for i, t in enumerate(tensors):
        single = WeightHistogram.from_tensor(t)
        assert torch.equal(batch.counts[i], single.counts), i
        assert batch.kinds[i] == single.kind and batch.reasons[i] == single.reason
        assert fits[i].to_dict() == pytest.approx(single.fit().to_dict(), nan_ok=True), i
        assert batch.histogram(i).n == single.n
    assert histogram_batch([]).fit_all() == []


def test_batch_counts_add_like_an_all_reduce():
    # Two "ranks" each histogram their half of every matrix; the summed counts fit like the whole matrices.
    mats = [torch.randn(64, 96) * 0.02, (torch.randn(128, 32) * 0.01).to(torch.bfloat16)]
    rank0 = histogram_batch([m[: m.shape[0] // 2] for m in mats])
    rank1 = histogram_batch([m[m.shape[0] // 2 :] for m in mats])
    reduced = HistogramBatch(rank0.counts + rank1.counts, rank0.kinds)
    whole = histogram_batch(mats)
    assert torch.equal(reduced.counts, whole.counts)
    assert [f.to_dict() for f in reduced.fit_all()] == [f.to_dict() for f in whole.fit_all()]


def test_batch_validation():
    with pytest.raises(ValueError):
        HistogramBatch(torch.zeros(2, 5, dtype=torch.int64), ["fp32", "fp32"])
    with pytest.raises(ValueError):
        HistogramBatch(torch.zeros(2, N_COLUMNS, dtype=torch.int64), ["fp32"])
    with pytest.raises(TypeError):
        histogram_batch([torch.randn(3), 3.0])


def test_fit_all_never_raises_on_corrupt_counts():
    counts = torch.zeros(2, N_COLUMNS, dtype=torch.int64)
    counts[0, 0x3F80] = 5000  # a single code: no spread
    counts[1, 0x3C00:0x3C40] = -3  # negative counts (a broken reduction)
    fits = HistogramBatch(counts, ["bf16", "fp32"]).fit_all()
    assert [f.ok for f in fits] == [False, False]
    assert all(f.reason for f in fits)


def test_shared_bincount_over_the_used_codes_keeps_every_special_value():
    # On CPU small tensors share one bincount over only the codes they use; zeros, Inf/NaN, subnormals, mixed
    # kinds and empty tensors must still land in the columns a tensor counted alone gives.
    fp32 = torch.randn(30, 30) * 0.02
    fp32[0, :3] = torch.tensor([float("inf"), float("nan"), 0.0])
    fp32[1, :2] = torch.tensor([1e-40, -3e-39])  # fp32 subnormals
    bf16 = (torch.randn(20, 20) * 5).to(torch.bfloat16)
    bf16[0, 0] = float("-inf")
    tensors = [fp32, bf16, torch.zeros(4, 4), torch.empty(0), torch.randn(50).to(torch.float16) * 1e-3]
    batch = histogram_batch(tensors)
    for i, t in enumerate(tensors):
        assert torch.equal(batch.counts[i], counts_of(t)), i
    assert int(batch.counts[0, NONFINITE_COLUMN]) == 2 and int(batch.counts[1, NONFINITE_COLUMN]) == 1


def test_fit_of_a_row_does_not_depend_on_the_rows_beside_it():
    # The CPU fit narrows every row of a batch to the codes some row uses: a row's fit must not change when
    # rows of very different scales (a wider span) join it.
    alone = torch.randn(300, 200) * 0.02
    others = [torch.randn(100, 100) * 1e-6, (torch.randn(64, 64) * 100).to(torch.bfloat16)]
    single = histogram_batch([alone]).fit_all()[0]
    together = histogram_batch([others[0], alone, others[1]]).fit_all()[1]
    assert single.ok and together.to_dict() == pytest.approx(single.to_dict())
