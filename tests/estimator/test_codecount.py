"""The compiled counting kernel (weibull_monitor/estimator/histogram/_codecount.c) against the torch route, thread safety, fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from samefit import assert_same_fit

from weibull_monitor.estimator import histogram as H
from weibull_monitor.estimator.histogram import (
    N_BINS,
    NONFINITE_COLUMN,
    ZERO_COLUMN,
    WeightHistogram,
    counting_backend,
    histogram_batch,
)
from weibull_monitor.estimator.histogram import runtime as R

kernel = pytest.mark.skipif(
    os.environ.get("WEIBULL_MONITOR_COUNTING", "").lower() == "torch",
    reason="WEIBULL_MONITOR_COUNTING=torch asks for the torch route in this run",
)


@kernel
def test_the_kernel_is_built_and_in_use():
    # pip builds it from the sdist with any C compiler; without one the install still works, more slowly. In this
    # project's CI a compiler is present, so a missing kernel is a packaging defect, not a choice.
    assert H.COUNTING_BACKEND == "c-extension", "the counting kernel was not built (no C compiler?)"


def _counts(view: torch.Tensor) -> torch.Tensor:
    row = torch.zeros(N_BINS, dtype=torch.int64)
    R.count_into(row, view)
    return row


def _special_values(dtype: torch.dtype, rows: int = 96, cols: int = 80) -> torch.Tensor:
    w = torch.randn(rows, cols) * 0.02
    w[0, :6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40])
    w[1, :3] = torch.tensor([3.0e38, -1e-30, 65504.0])
    return w.to(dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


@kernel
@pytest.mark.parametrize("rows", [96, 960])  # views of up to 64K elements track their span; larger ones scan
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_counts_equal_the_torch_route_on_every_view(dtype, rows):
    base = _special_values(dtype, rows)
    cube = base.reshape(6, rows // 6, 80)
    views = {
        "contiguous": base,
        "column block": base[:, 16:48],
        "transposed": base.t(),
        "every other row": base[::2],
        "every third column": base[:, ::3],
        "one row": base[3],
        "one column": base[:, 5],
        "scalar": base[2, 2],
        "empty": base[:0],
        "3-D contiguous": cube,
        "3-D permuted (torch route)": cube.permute(2, 0, 1),
    }
    for label, view in views.items():
        with_kernel = _counts(view)
        with counting_backend("torch"):
            without = _counts(view)
        assert torch.equal(with_kernel, without), label
        assert int(with_kernel.sum()) == view.numel(), label


@kernel
def test_every_bf16_pattern_through_the_kernel_and_the_torch_route():
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    with counting_backend("torch"):
        torch_counts = WeightHistogram.from_tensor(patterns).counts
    assert torch.equal(WeightHistogram.from_tensor(patterns).counts, torch_counts)
    assert int(torch_counts[ZERO_COLUMN]) == 2 and int(torch_counts[NONFINITE_COLUMN]) == 2 * (
        N_BINS - 0x7F80
    )


@kernel
def test_threads_counting_chunks_of_one_matrix_into_one_row_lose_nothing():
    w = torch.randn(2048, 512) * 0.02
    with counting_backend("torch"):
        expected = _counts(w)
    row = torch.zeros(N_BINS, dtype=torch.int64)
    chunks = R.chunks(w, 4096)  # 256 chunks, one row: every drain races with another thread's
    barrier = threading.Barrier(4)

    def work(part):
        barrier.wait()
        for chunk in part:
            R.count_into(row, chunk)

    threads = [threading.Thread(target=work, args=(chunks[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(row, expected)


@kernel
def test_the_scratch_row_is_left_zeroed():
    R.count_into(torch.zeros(N_BINS, dtype=torch.int64), torch.randn(300, 300))
    scratch = R.code_buffer(torch.Size([N_BINS]), torch.int32, torch.device("cpu"), zeroed=True)
    assert int(scratch.count_nonzero()) == 0


@kernel
def test_the_kernel_refuses_a_count_that_could_overflow_its_scratch():
    from weibull_monitor.estimator.histogram import _codecount

    row = torch.zeros(N_BINS, dtype=torch.int64)
    scratch = torch.zeros(N_BINS, dtype=torch.int32)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        _codecount.count_codes(0, 1 << 16, 1 << 16, 0, 1, scratch.data_ptr(), row.data_ptr())
    with pytest.raises(ValueError):
        _codecount.count_codes(0, -1, 4, 0, 1, scratch.data_ptr(), row.data_ptr())
    with pytest.raises(TypeError):
        _codecount.count_codes("not an address", 1, 1, 0, 1, 0, 0)


def test_batches_agree_between_the_two_routes():
    tensors = [
        _special_values(torch.float32),
        _special_values(torch.bfloat16)[:, ::2],
        torch.zeros(4, 4),
        torch.empty(0),
        torch.randn(4096, 600) * 0.02,  # several chunks
    ]
    with counting_backend("torch"):
        without = histogram_batch(tensors).counts
        torch_fits = histogram_batch(tensors).fit_all()
    assert torch.equal(histogram_batch(tensors).counts, without)
    fits = histogram_batch(tensors).fit_all()
    assert [f.to_dict() for f in torch_fits] == [f.to_dict() for f in fits]


def test_an_environment_variable_selects_the_torch_route():
    code = (
        "import torch; from weibull_monitor.estimator import histogram as H; from weibull_monitor.estimator import fit_weibull; "
        "w = torch.randn(512, 512) * 0.02; print(H.COUNTING_BACKEND, fit_weibull(w).k)"
    )
    env = {**os.environ, "WEIBULL_MONITOR_COUNTING": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    backend, k = out.stdout.split()
    assert backend == "torch" and 1.1 < float(k) < 1.3


def test_torch_runs_one_thread_inside_the_block_and_the_pool_keeps_the_callers_count():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with H.torch_on_one_thread():
            assert torch.get_num_threads() == 1
            assert R.pool_size() == 2
            with H.torch_on_one_thread():  # nested: no change, no early restore
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2 and R.pool_size() == 2
        with H.torch_on_one_thread("meta"):  # not a CPU: left alone
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), H.torch_on_one_thread():
            raise RuntimeError("a failing fit")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def _mixed_tensors(count: int) -> list:
    torch.manual_seed(1)
    makers = [
        lambda: torch.randn(64, 48) * 0.02,
        lambda: (torch.randn(40, 40) * 3).to(torch.bfloat16),
        lambda: (torch.randn(30, 20) * 1e-4).to(torch.float16),
        lambda: torch.zeros(5, 5),
        lambda: torch.empty(0, 3),
        lambda: torch.ones(4, 4, dtype=torch.int8),  # unreadable: a reason, no counts
        lambda: _special_values(torch.float32),
        lambda: (torch.rand(300, 70) + 1.0).t(),
    ]
    return [makers[i % len(makers)]() for i in range(count)]


@pytest.mark.parametrize("count", [0, 3, 33, 150])  # none; one slice; two slices; more than one fit block
def test_fit_tensors_equals_fitting_each_slice_alone(count):
    tensors = _mixed_tensors(count)
    together = H.fit_tensors(tensors)
    alone = [fit for i in range(0, count, 32) for fit in histogram_batch(tensors[i : i + 32]).fit_all()]
    assert len(together) == count
    for i, (a, b) in enumerate(zip(together, alone)):
        assert_same_fit(a, b, label=i)


def test_fit_tensors_reuses_its_buffer_without_leaking_counts_between_slices():
    # the torch route writes whole rows (span unknown): the reused buffer must be zeroed in full between slices
    tensors = _mixed_tensors(70)
    with_kernel = H.fit_tensors(tensors)
    with counting_backend("torch"):
        assert [f.n for f in H.fit_tensors(tensors)] == [f.n for f in with_kernel]
    assert [f.n for f in with_kernel] == [
        WeightHistogram.from_tensor(t).n if t.is_floating_point() else 0 for t in tensors
    ]


def test_the_accelerator_fit_path_gives_the_cpu_answers():
    # Accelerators fit at full code width with no host reads before the one transfer; no GPU is needed to check
    # that path's arithmetic: run it on CPU counts and compare with the narrowed CPU fit.
    torch.manual_seed(2)
    tensors = [
        *_mixed_tensors(12),
        (torch.randn(300, 200) * 0.02).to(torch.bfloat16),  # > EXACT_RANKS middle ranks: bin-by-bin sums
        (torch.randn(500, 100) * 1e-3).to(torch.float16),
        torch.randn(1000, 300) * 0.02,
    ]
    cpu_fits = H.fit_tensors(tensors)
    accelerator_fits = H.fit_tensors(tensors, host_reads=False)
    batch_fits = histogram_batch(tensors).fit_all(host_reads=False)
    for i, (a, b, c) in enumerate(zip(accelerator_fits, cpu_fits, batch_fits)):
        assert_same_fit(a, b, rel=1e-11, label=i)
        assert_same_fit(c, b, rel=1e-11, label=i)


@pytest.mark.parametrize("accelerator_path", [False, True])
def test_packed_counts_fit_like_full_rows(accelerator_path):
    # The distributed path fits rows packed to a code span (reduced across ranks, maybe as int32), on CPU or on
    # the ranks' accelerators (whose path, with no host reads, runs here on CPU).
    tensors = [t for t in _mixed_tensors(20) if t.is_floating_point()]  # unreadable rows are never packed
    batch = histogram_batch(tensors)
    used = torch.nonzero(batch.counts[:, :N_BINS].amax(0)).reshape(-1)
    first, last = int(used[0]), int(used[-1])
    packed = torch.cat([batch.counts[:, first : last + 1], batch.counts[:, N_BINS:]], dim=1).to(torch.int32)
    expected = batch.fit_all()
    fitted = H.fit_packed_counts(packed, first, batch.kinds, host_reads=not accelerator_path)
    for i, (got, want) in enumerate(zip(fitted, expected)):
        assert_same_fit(got, want, label=i)
    empty = H.fit_packed_counts(torch.tensor([[3, 0], [0, 2]]), N_BINS, ["fp32", "bf16"])  # no code used
    assert [(f.ok, f.n_zero, f.n_nonfinite) for f in empty] == [(False, 3, 0), (False, 0, 2)]
    assert all(f.reason for f in empty)


@kernel
def test_count_many_equals_one_call_per_job_and_reports_each_span():
    from weibull_monitor.estimator.histogram import _codecount

    views = [
        _special_values(torch.bfloat16, 960),  # scanned (> 64K elements)
        _special_values(torch.float32)[:, ::3],  # tracked span, strided fp32 high halves
        _special_values(torch.float16).t(),
        torch.zeros(3, 3),  # only code 0: no span
        torch.randn(700, 300)[::2],  # several rows, stride 2 rows
    ]
    rows = torch.zeros(len(views), N_BINS, dtype=torch.int64)
    jobs, keep, expected = [], [], []
    for i, view in enumerate(views):
        t, address, n_rows, cols, row_stride, col_stride = R._kernel_words(view)
        keep.append(t)
        jobs.append((address, n_rows, cols, row_stride, col_stride, rows[i].data_ptr()))
        row = torch.zeros(N_BINS, dtype=torch.int64)
        expected.append((row, R.count_into(row, view)))
    scratch = torch.zeros(N_BINS, dtype=torch.int32)
    spans = _codecount.count_many(jobs, scratch.data_ptr())
    assert int(scratch.count_nonzero()) == 0
    for i, (span, (row, want)) in enumerate(zip(spans, expected)):
        assert torch.equal(rows[i], row), i
        assert (span if span is not None else R.NO_CODES) == want, i
    assert _codecount.count_many([], scratch.data_ptr()) == []
    with pytest.raises(ValueError, match="2\\*\\*32"):
        _codecount.count_many([(0, 1 << 16, 1 << 16, 0, 1, rows[0].data_ptr())], scratch.data_ptr())
    with pytest.raises(TypeError):
        _codecount.count_many([("not an address", 1, 1, 0, 1, 0)], scratch.data_ptr())


def test_the_rank_search_equals_torch_searchsorted():
    # with the kernel (search_rows) and without it (torch): the same integers, sorted runs of keys or not
    g = torch.Generator().manual_seed(3)
    for trial in range(200):
        rows, width, n = (int(torch.randint(0, hi, (1,), generator=g)) for hi in (5, 50, 30))
        cum = torch.randint(0, 4, (rows, width), generator=g).cumsum(1)
        keys = torch.randint(-3, 4 * width + 5, (rows, n), generator=g)
        if trial % 2:
            keys = keys.sort(1).values
        expected = torch.searchsorted(cum, keys)
        assert torch.equal(R.search_sorted_rows(cum, keys), expected), trial
        with counting_backend("torch"):
            assert torch.equal(R.search_sorted_rows(cum, keys), expected), trial


def test_the_kernel_counts_exact_zeros_of_fp32_rows_and_the_range_check_uses_them():
    from weibull_monitor.estimator import fit_many
    from weibull_monitor.estimator.fallbacks import in_histogram_range

    g = torch.Generator().manual_seed(4)
    w = torch.randn(1200, 700, generator=g) * 0.02
    w[5, :7] = 0.0
    w[9, 3] = -0.0
    tiny = w.clone()
    tiny[100, :4] = 2.0**-140  # nonzero, but code 0: the histogram cannot place it
    tensors = [w, w.t(), tiny, tiny.t(), w.reshape(12, 100, 700), w.to(torch.bfloat16), w.double()]
    counted = R.count_batch(tensors)
    if R._KERNEL is None:
        assert counted.exact_zeros == [None] * len(tensors)
    else:  # fp32 rows the kernel reads whole: their exact zeros; other dtypes: not asked
        assert counted.exact_zeros == [8, 8, 8, 8, 8, None, None]
    assert [int(c) for c in counted.counts[:, ZERO_COLUMN]] == [8, 8, 12, 12, 8, 8, 8]
    fits = fit_many([(str(i), t) for i, t in enumerate(tensors)])
    with counting_backend("torch"):  # no kernel: the range check makes its own pass
        torch_fits = fit_many([(str(i), t) for i, t in enumerate(tensors)])
    assert [f.to_dict() for f in fits.values()] == [f.to_dict() for f in torch_fits.values()]
    assert [f.method for f in fits.values()] == ["histogram", "histogram", "exact", "exact", "histogram"] + [
        "histogram"
    ] * 2
    # a count that disagrees with the zero column sends the fit to the exact method, as a pass would
    histogram_fit = H.WeightHistogram.from_tensor(tiny).fit()
    assert in_histogram_range(tiny, histogram_fit, exact_zeros=8).method == "exact"
    assert in_histogram_range(tiny, histogram_fit, exact_zeros=12) is histogram_fit
