"""Property-based tests of the fit engine on bad and odd inputs.

Every test draws tensors of random shapes (0 and 1 elements included), float dtypes (fp64, fp32, bf16, fp16 and
every float8 variant this torch has), special values (NaN, +-Inf, +-0, denormals of the dtype), scales from 1e-30
to 1e+30 and constant tensors. What must hold: no exception except the documented TypeError for non-tensors
(and ValueError for merging histograms of different dtypes); ``ok=False`` with a reason wherever no fit exists,
with nan (never inf, never a stale number) in every float field; counts that add up to the element count; the
histogram of a concatenation equal to the merge of the histograms of its pieces.

The example counts below add up to 10,100 generated cases in the default run (docs/reliability.md).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from samefit import assert_same_fit

from weibull_monitor.estimator import MIN_ELEMENTS, WeibullFit, fit_many, fit_weibull
from weibull_monitor.estimator.histogram import (
    N_BINS,
    NONFINITE_COLUMN,
    ZERO_COLUMN,
    WeightHistogram,
    histogram_batch,
    histogram_kind,
)

FLOAT8 = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
# float8_e8m0fnu is left out on purpose: it holds powers of two only (no sign, no zero), so |w| has one code per
# octave; it still goes through the "never raises" property below via the FLOAT8_ALL list.
FLOAT8_ALL = FLOAT8 + ((torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, *FLOAT8_ALL)
EXACT_CODE_DTYPES = (torch.bfloat16, torch.float16)  # histogram == sort-based protocol for these
FLOAT_FIELDS = ("k", "scale", "r2", "k_stderr", "scale_rel_stderr", "q10", "q50", "q90", "q99", "q999")

# Every test is small and deterministic given its draw; no example database in the shared working tree.
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SPECIALS = (math.nan, math.inf, -math.inf, 0.0, -0.0)


def _denormals(dtype: torch.dtype) -> list[float]:
    info = torch.finfo(dtype)
    tiny = info.smallest_normal
    return [tiny / 2, -tiny / 4, tiny * 2.0**-3]


@st.composite
def tensors(draw, dtypes=FLOAT_DTYPES, max_elements: int = 3000) -> torch.Tensor:
    """A float tensor: random shape (0..3 dims, 0 and 1 elements included), a random distribution times a scale
    in [1e-30, 1e30], optionally constant, optionally salted with NaN/Inf/zeros/denormals; maybe a strided view."""
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(0, 3))
    if ndim == 0:
        shape: tuple[int, ...] = ()
    else:
        numel_cap = draw(st.sampled_from([0, 1, 2, 50, 99, 100, 101, 400, max_elements]))
        dims = []
        budget = max(numel_cap, 0)
        for _ in range(ndim):
            d = draw(st.integers(0, max(1, budget)))
            dims.append(d)
            budget = budget // max(d, 1)
        shape = tuple(dims)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    kind = draw(st.sampled_from(["normal", "laplace", "uniform", "constant", "lognormal", "elements"]))
    scale = 10.0 ** draw(st.floats(-30, 30))
    if kind == "elements":
        pool = [*SPECIALS, *_denormals(torch.float32), 1.0, -1.0, 1e-30, 1e30, 3.5, -2.25]
        picks = torch.randint(0, len(pool), (numel,), generator=gen)
        values = torch.tensor(pool, dtype=torch.float64)[picks]
    elif kind == "constant":
        constant = draw(st.sampled_from([0.0, 1.0, -0.5, 7.0, math.nan, math.inf]))
        values = torch.full((numel,), constant, dtype=torch.float64) * scale
    else:
        base = torch.randn(numel, generator=gen, dtype=torch.float64)
        if kind == "laplace":
            base = torch.sign(base) * -torch.log(
                torch.rand(numel, generator=gen, dtype=torch.float64) + 1e-300
            )
        elif kind == "uniform":
            base = torch.rand(numel, generator=gen, dtype=torch.float64) * 2 - 1
        elif kind == "lognormal":
            base = torch.exp(3 * base)
        values = base * scale
    salt = draw(st.sampled_from([0.0, 0.0, 0.01, 0.3, 1.0]))
    if salt and numel:
        special_pool = torch.tensor([*SPECIALS, *_denormals(dtype)], dtype=torch.float64)
        mask = torch.rand(numel, generator=gen) < salt
        picks = torch.randint(0, len(special_pool), (numel,), generator=gen)
        values = torch.where(mask, special_pool[picks], values)
    t = (
        values.reshape(shape).to(dtype)
        if dtype not in FLOAT8_ALL
        else _to_float8(values, dtype).reshape(shape)
    )
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # a non-contiguous view
    elif t.dim() == 1 and t.numel() > 2 and draw(st.booleans()):
        t = t[::2]
    return t


def _to_float8(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # float8 casts of out-of-range values are implementation-defined; clamp to the dtype's range first, keeping
    # NaN (and Inf where the dtype has it) as the special values they are.
    info = torch.finfo(dtype)
    finite = torch.isfinite(values)
    clamped = torch.where(finite, values.clamp(-info.max, info.max), values)
    return clamped.to(torch.float32).to(dtype)


def _reference_counts(t: torch.Tensor, method: str) -> tuple[int, int, int]:
    """(n, n_zero, n_nonfinite) computed independently of the package, as each method defines them."""
    if method == "exact":
        a = t.detach().reshape(-1).to(torch.float64).abs()
        nonfinite = ~torch.isfinite(a)
        zero = a == 0
    else:
        kind = histogram_kind(t.dtype)
        if kind == "bf16":
            a = t.reshape(-1).to(torch.bfloat16).to(torch.float64).abs()
            zero = a == 0
        elif kind == "fp16":
            a = t.reshape(-1).to(torch.float64).abs()
            zero = a == 0
        else:  # fp32 kind: fp64 rounds to fp32; fp32 subnormals below 2**-133 share the zero column (documented)
            a = t.reshape(-1).to(torch.float32).to(torch.float64).abs()
            zero = a < 2.0**-133
        nonfinite = ~torch.isfinite(a)
    n_nonfinite = int(nonfinite.sum())
    n_zero = int((zero & ~nonfinite).sum())
    return t.numel() - n_zero - n_nonfinite, n_zero, n_nonfinite


def _check_fit(fit: WeibullFit, t: torch.Tensor, method: str) -> None:
    assert isinstance(fit, WeibullFit)
    assert fit.method == method
    n, n_zero, n_nonfinite = _reference_counts(t, method)
    assert (fit.n, fit.n_zero, fit.n_nonfinite) == (n, n_zero, n_nonfinite)
    if fit.ok:
        assert fit.reason is None
        assert fit.n >= MIN_ELEMENTS
        assert math.isfinite(fit.k) and fit.k > 0
        assert math.isfinite(fit.scale) and fit.scale > 0
        assert 0.0 <= fit.r2 <= 1.0
        assert math.isfinite(fit.k_stderr) and fit.k_stderr >= 0
        assert math.isfinite(fit.scale_rel_stderr) and fit.scale_rel_stderr >= 0
        qs = [fit.q10, fit.q50, fit.q90, fit.q99, fit.q999]
        assert all(math.isfinite(q) and q > 0 for q in qs), qs
        # non-decreasing up to rounding of the within-bin interpolation (one ulp seen in a float8 draw)
        assert all(b >= a * (1 - 1e-12) for a, b in itertools.pairwise(qs)), qs
    else:
        assert isinstance(fit.reason, str) and fit.reason
        for name in FLOAT_FIELDS:
            assert math.isnan(getattr(fit, name)), (name, getattr(fit, name), fit.reason)
        if n < MIN_ELEMENTS:
            assert any(word in fit.reason for word in ("only", "zero", "non-finite", "empty", "no finite"))
    for name, value in fit.to_dict().items():  # the ratios are checked in their own test below
        if not name.endswith(("_over_q10", "_over_q50")):
            assert not (isinstance(value, float) and math.isinf(value)), (name, value)


# ---------------------------------------------------------------------------------------------------------------
# Never raises; counts add up; ok=False carries a reason and nan


@settings(max_examples=1500, **FUZZ)
@given(t=tensors())
def test_histogram_fit_never_raises_and_accounts_for_every_element(t):
    _check_fit(fit_weibull(t), t, "histogram")


@settings(max_examples=2900, **FUZZ)
@given(t=tensors())
def test_exact_fit_never_raises_and_accounts_for_every_element(t):
    _check_fit(fit_weibull(t, method="exact"), t, "exact")


@settings(max_examples=500, **FUZZ)
@given(t=tensors(dtypes=EXACT_CODE_DTYPES, max_elements=5000))
def test_histogram_reproduces_the_sort_for_bf16_and_fp16(t):
    # bf16/fp16 elements equal their code's value; with <= 4096 middle ranks every rank is a regression point,
    # so both methods solve the same least-squares problem.
    hist, exact = fit_weibull(t), fit_weibull(t, method="exact")
    assert hist.ok == exact.ok, (hist.reason, exact.reason)
    if hist.ok:
        assert hist.k == pytest.approx(exact.k, rel=1e-9)
        assert hist.scale == pytest.approx(exact.scale, rel=1e-9)
        assert hist.r2 == pytest.approx(exact.r2, rel=1e-9, abs=1e-12)
        assert hist.q50 == pytest.approx(exact.q50, rel=1e-9)


@settings(max_examples=400, **FUZZ)
@given(
    t=tensors(dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16)),
    power=st.integers(-60, 60),
    negate=st.booleans(),
)
def test_power_of_two_scale_and_sign_leave_k_alone(t, power, negate):
    # Multiplying by 2**p and flipping signs is exact in floating point while nothing over- or underflows: the
    # fit is the same, the scale and quantiles move by 2**p exactly.
    factor = (-1.0 if negate else 1.0) * 2.0**power
    # the histogram reads fp64 through fp32 codes, so the exact range is that of fp32 there
    info = torch.finfo(torch.float32 if t.dtype == torch.float64 else t.dtype)
    finite = t[torch.isfinite(t)].abs()
    finite = finite[finite > 0]
    if finite.numel():
        lo, hi = float(finite.min()) * 2.0**power, float(finite.max()) * 2.0**power
        # both tensors must sit in the normal range: subnormal bins are wider, so 2**p invariance fails there
        unscaled_lo = float(finite.min())
        if not (info.smallest_normal <= min(lo, unscaled_lo) and hi < info.max and lo >= 2.0**-133):
            return  # the original or the scaled tensor leaves the normal range: not an exact rescaling
    scaled = (t.double() * factor).to(t.dtype)
    for method in ("histogram", "exact"):
        a, b = fit_weibull(t, method=method), fit_weibull(scaled, method=method)
        assert (a.ok, a.reason, a.n, a.n_zero, a.n_nonfinite) == (
            b.ok,
            b.reason,
            b.n,
            b.n_zero,
            b.n_nonfinite,
        )
        if a.ok:
            assert b.k == pytest.approx(a.k, rel=1e-9)
            assert b.r2 == pytest.approx(a.r2, rel=1e-9, abs=1e-12)
            assert b.scale == pytest.approx(a.scale * 2.0**power, rel=1e-9)


@settings(max_examples=300, **FUZZ)
@given(
    value=st.floats(allow_nan=True, allow_infinity=True, width=32),
    n=st.integers(0, 2000),
    dtype=st.sampled_from((torch.float64, torch.float32, torch.bfloat16, torch.float16)),
)
def test_constant_tensors_have_no_fit(value, n, dtype):
    t = torch.full((n,), value, dtype=torch.float64).to(dtype)
    for method in ("histogram", "exact"):
        fit = fit_weibull(t, method=method)
        _check_fit(fit, t, method)
        assert not fit.ok
        if fit.n >= MIN_ELEMENTS:  # no spread (exact kinds) or one code in the band (interpolated kinds)
            assert "spread" in fit.reason or "codes" in fit.reason, fit.reason


# ---------------------------------------------------------------------------------------------------------------
# Merge: histogram of the concatenation == merge of the histograms of its pieces


@settings(max_examples=2400, **FUZZ)
@given(
    t=tensors(dtypes=(torch.float32, torch.bfloat16, torch.float16, *FLOAT8), max_elements=2000),
    cuts=st.lists(st.integers(0, 2000), max_size=5),
    data=st.data(),
)
def test_merge_of_pieces_equals_histogram_of_the_whole(t, cuts, data):
    flat = t.reshape(-1)
    bounds = sorted({0, flat.numel(), *(c for c in cuts if c <= flat.numel())})
    pieces = [flat[a:b] for a, b in itertools.pairwise(bounds)] or [flat]
    hists = [WeightHistogram.from_tensor(p) for p in pieces]
    order = data.draw(st.permutations(range(len(hists))))
    merged = hists[order[0]]
    for i in order[1:]:
        merged = merged + hists[i]
    whole = WeightHistogram.from_tensor(t)
    assert merged.kind == whole.kind
    assert torch.equal(merged.counts, whole.counts)
    assert merged.n + merged.n_zero + merged.n_nonfinite == t.numel()
    assert int(whole.counts[:N_BINS].sum()) == whole.n
    assert whole.n_zero == int(whole.counts[ZERO_COLUMN]) and whole.n_nonfinite == int(
        whole.counts[NONFINITE_COLUMN]
    )
    if data.draw(st.integers(0, 9)) == 0:  # the fits agree too (a fit costs ~5 ms: one draw in ten)
        a, b = merged.fit(), whole.fit()
        assert (a.ok, a.reason, a.n) == (b.ok, b.reason, b.n)
        if a.ok:
            assert a.k == b.k and a.scale == b.scale


@settings(max_examples=600, **FUZZ)
@given(
    a=tensors(dtypes=(torch.float32, torch.bfloat16, torch.float16), max_elements=400),
    b=tensors(dtypes=(torch.float32, torch.bfloat16, torch.float16), max_elements=400),
)
def test_merge_of_different_dtypes_is_refused_with_a_clear_error(a, b):
    ha, hb = WeightHistogram.from_tensor(a), WeightHistogram.from_tensor(b)
    if ha.kind == hb.kind:
        assert torch.equal((ha + hb).counts, (hb + ha).counts)  # and merge commutes
        return
    with pytest.raises(ValueError, match="cannot merge"):
        ha.merge(hb)


# ---------------------------------------------------------------------------------------------------------------
# Batched fits equal one-at-a-time fits, unreadable tensors included


def _unreadable(kind: str) -> torch.Tensor:
    if kind == "int":
        return torch.arange(200, dtype=torch.int32).reshape(10, 20)
    if kind == "bool":
        return torch.ones(300, dtype=torch.bool)
    if kind == "complex":
        return torch.randn(200, dtype=torch.complex64)
    if kind == "meta":
        return torch.empty(64, 64, device="meta")
    if kind == "sparse":
        return torch.randn(20, 20).to_sparse()
    if kind == "quantized":
        return torch.quantize_per_tensor(torch.randn(300), 0.1, 0, torch.qint8)
    return torch.empty(0, 5)


@settings(max_examples=200, **FUZZ)
@given(
    items=st.lists(
        st.one_of(
            tensors(max_elements=600).map(lambda t: ("tensor", t)),
            st.sampled_from(["int", "bool", "complex", "meta", "sparse", "quantized", "empty"]).map(
                lambda k: (k, _unreadable(k))
            ),
        ),
        min_size=0,
        max_size=5,
    )
)
def test_fit_many_equals_fitting_one_at_a_time(items):
    named = [(f"m{i}", t) for i, (_, t) in enumerate(items)]
    batched = fit_many(named)
    assert list(batched) == [name for name, _ in named]
    for (name, t), (what, _) in zip(named, items):
        one = fit_weibull(t)
        got = batched[name]
        assert_same_fit(got, one, fields=("k", "scale"))
        if what != "tensor":
            assert not got.ok and got.reason


@settings(max_examples=1300, **FUZZ)
@given(
    value=st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.text(max_size=5),
        st.lists(st.floats(), max_size=5),
        st.builds(lambda n: np.zeros(n, dtype=np.float32), st.integers(0, 10)),
        st.builds(dict),
    )
)
def test_non_tensors_raise_type_error_only(value):
    for call in (
        lambda: fit_weibull(value),
        lambda: fit_weibull(value, method="exact"),
        lambda: WeightHistogram.from_tensor(value),
        lambda: histogram_batch([torch.randn(10), value]),
        lambda: fit_many({"a": value}),
    ):
        with pytest.raises(TypeError):
            call()


@pytest.mark.parametrize("kind", ["int", "bool", "complex", "meta", "sparse", "quantized", "empty"])
def test_unreadable_tensors_give_a_reason_never_an_exception(kind):
    t = _unreadable(kind)
    for method in ("histogram", "exact"):
        fit = fit_weibull(t, method=method)
        assert not fit.ok and fit.reason
        assert all(math.isnan(getattr(fit, name)) for name in FLOAT_FIELDS)
    hist = WeightHistogram.from_tensor(t)
    fit = hist.fit()
    assert not fit.ok and fit.reason
    if kind == "empty":  # an empty shard is a valid (all-zero) histogram that merges with the others
        assert hist.n == hist.n_zero == hist.n_nonfinite == 0
    else:
        assert hist.reason and fit.reason == hist.reason


def test_quantile_ratios_are_never_inf():
    t = torch.randn(1000, dtype=torch.float64)
    t[:150] = 5e-309  # fp64 denormals: q10 lands on one of them
    fit = fit_weibull(t, method="exact")
    assert fit.ok and 0 < fit.q10 < 1e-300
    for value in (fit.q90_over_q10, fit.q99_over_q50, fit.q999_over_q50):
        assert not math.isinf(value)
