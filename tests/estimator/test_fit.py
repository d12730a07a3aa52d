"""The fit engine against the protocol (docs/estimator.md): anchors, recovery, methods agreeing, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weibull_monitor.estimator import (
    K_GAUSSIAN,
    LAMBDA_PER_SIGMA,
    MIN_ELEMENTS,
    R2_GAUSSIAN,
    WeibullFit,
    fit_many,
    fit_weibull,
)
from weibull_monitor.estimator import quadrature as _quadrature

SIGMA = 0.02


def draw(kind: str, shape: tuple[int, ...], seed: int, scale: float = SIGMA) -> torch.Tensor:
    """Weights of a given law, generated cheaply from uniforms / normals (float32)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(shape, generator=g) * scale
    if kind == "laplace":
        u = torch.rand(shape, generator=g).clamp_min(1e-12)
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        return sign * -torch.log(u) * scale
    if kind == "student_t4":  # Z / sqrt(chi2_4 / 4), chi2_4 = -2 ln(U1 U2)
        z = torch.randn(shape, generator=g)
        chi2 = -2.0 * torch.log(
            torch.rand(shape, generator=g).clamp_min(1e-12) * torch.rand(shape, generator=g)
        )
        return z / torch.sqrt(chi2 / 4.0) * scale
    if kind == "uniform":
        return (torch.rand(shape, generator=g) * 2 - 1) * scale
    if kind == "outliers":  # 1% of the elements 10x wider
        w = torch.randn(shape, generator=g) * scale
        return torch.where(torch.rand(shape, generator=g) < 0.01, w * 10, w)
    raise ValueError(kind)


def weibull_sample(k: float, lam: float, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """|w| ~ Weibull(k, lam) by inverse CDF, with random signs."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64).clamp_min(1e-300)
    mag = lam * (-torch.log(u)) ** (1.0 / k)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return (sign * mag).to(torch.float32)


def assert_close_fits(hist: WeibullFit, exact: WeibullFit, label: str) -> None:
    assert hist.ok and exact.ok, (label, hist.reason, exact.reason)
    assert hist.n == exact.n and hist.n_zero == exact.n_zero and hist.n_nonfinite == exact.n_nonfinite, label
    assert abs(hist.k - exact.k) <= 5e-4, (label, hist.k, exact.k)
    assert abs(hist.scale / exact.scale - 1) <= 5e-4, (label, hist.scale, exact.scale)
    assert abs(hist.r2 - exact.r2) <= 1e-3, (label, hist.r2, exact.r2)


# --------------------------------------------------------------------------------------------------------------
# Anchors


def test_anchors_are_computed_and_match_the_measured_constants():
    assert abs(K_GAUSSIAN - 1.2054) <= 1e-4
    assert abs(LAMBDA_PER_SIGMA / 0.8875 - 1) <= 2e-3
    assert abs(R2_GAUSSIAN - 0.9977) <= 1e-4
    # The same quadrature gives the other measured anchors of docs/estimator.md ...
    k_uniform, _, _ = _quadrature.line_fit_limit(np.log)  # |w| uniform on (0, 1): quantile F
    assert abs(k_uniform - 1.3751) <= 1e-4
    k_exp, ln_scale_exp, r2_exp = _quadrature.line_fit_limit(lambda f: np.log(-np.log1p(-f)))
    assert abs(k_exp - 1.0) <= 1e-12 and abs(ln_scale_exp) <= 1e-12 and abs(r2_exp - 1) <= 1e-12
    # ... and does not depend on the panel count: the constants are converged, not fitted.
    f, w = _quadrature.nodes(panels=64)
    x, y = np.log(_quadrature.half_normal_quantile(f)), _quadrature.weibull_y(f)
    mx, my = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
    assert abs((w * (x - mx) * (y - my)).sum() / (w * (x - mx) ** 2).sum() - K_GAUSSIAN) <= 1e-12


def test_half_normal_quantile_inverts_erf():
    f = np.linspace(0.01, 0.99, 99)
    q = _quadrature.half_normal_quantile(f)
    assert np.max(np.abs([math.erf(v / math.sqrt(2)) for v in q] - f)) <= 1e-14


def test_delta_method_reproduces_the_measured_gaussian_noise_constants():
    c_k, c_scale = _quadrature.half_normal_stderr_constants()
    assert abs(c_k - 1.365) <= 0.002 and abs(c_scale - 0.862) <= 0.002


@pytest.fixture(scope="module")
def gaussian_4096():
    w = draw("gaussian", (4096, 4096), seed=1)
    return w, fit_weibull(w), fit_weibull(w, method="exact")


@pytest.mark.slow
def test_gaussian_4096_both_methods_hit_the_anchor(gaussian_4096):
    w, hist, exact = gaussian_4096
    for fit in (hist, exact):
        assert fit.ok and fit.n == w.numel() - fit.n_zero
        assert abs(fit.k - K_GAUSSIAN) < 0.002, fit
        assert abs(fit.scale / (LAMBDA_PER_SIGMA * SIGMA) - 1) <= 2e-3, fit
        assert abs(fit.r2 - R2_GAUSSIAN) < 5e-4
        # The stderr is the Gaussian 1.365/sqrt(n) and 0.862/sqrt(n) measured on Gaussian samples (docs/estimator.md §4).
        assert abs(fit.k_stderr * math.sqrt(fit.n) - 1.365) < 0.01
        assert abs(fit.scale_rel_stderr * math.sqrt(fit.n) - 0.862) < 0.01
    assert_close_fits(hist, exact, "gaussian fp32 4096x4096")
    # Quantiles of |w| agree with the half-normal ones.
    assert abs(exact.q50 / (0.6744897501960817 * SIGMA) - 1) < 2e-3
    assert abs(hist.q50 / exact.q50 - 1) < 1e-3 and abs(hist.q999 / exact.q999 - 1) < 5e-3


def test_laplace_weights_give_k_one():
    fit = fit_weibull(draw("laplace", (2048, 2048), seed=2))
    assert abs(fit.k - 1.0) <= 0.003, fit
    assert abs(fit.scale / SIGMA - 1) <= 3 * fit.scale_rel_stderr + 1e-4


@pytest.mark.parametrize("k", [0.6, 0.8, 1.0, 1.5, 2.5])
def test_weibull_samples_are_recovered_within_three_stderr(k):
    lam = 0.013
    w = weibull_sample(k, lam, (512, 512), seed=int(k * 10))
    for method in ("histogram", "exact"):
        fit = fit_weibull(w, method=method)
        assert fit.ok and fit.r2 > 0.999
        assert abs(fit.k - k) <= 3 * fit.k_stderr, (method, fit.k, fit.k_stderr)
        assert abs(fit.scale / lam - 1) <= 3 * fit.scale_rel_stderr, (method, fit.scale, fit.scale_rel_stderr)
        # For Weibull data the delta method reduces to the closed-form constants.
        c_k, c_scale = _quadrature.weibull_stderr_constants()
        assert abs(fit.k_stderr / (c_k * fit.k / math.sqrt(fit.n)) - 1) < 0.02
        assert abs(fit.scale_rel_stderr / (c_scale / (fit.k * math.sqrt(fit.n))) - 1) < 0.02


def test_stderr_matches_the_scatter_of_repeated_fits():
    # 400 independent 64x64 Gaussian matrices in one batched call: the spread of k is what k_stderr says.
    g = torch.Generator().manual_seed(3)
    named = [(f"m{i}", torch.randn(64, 64, generator=g)) for i in range(400)]
    fits = list(fit_many(named).values())
    ks = np.array([f.k for f in fits])
    scales = np.array([f.scale for f in fits])
    assert 0.85 < ks.std(ddof=1) / np.mean([f.k_stderr for f in fits]) < 1.15
    assert 0.85 < (scales.std(ddof=1) / scales.mean()) / np.mean([f.scale_rel_stderr for f in fits]) < 1.15
    # The protocol's small-n bias is well inside the noise of one matrix.
    assert abs(ks.mean() - K_GAUSSIAN) < 0.2 * np.mean([f.k_stderr for f in fits])


# --------------------------------------------------------------------------------------------------------------
# Histogram method vs the exact sort


KINDS = ("gaussian", "laplace", "student_t4", "uniform", "outliers")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("shape", [(64, 64), (96, 160), (256, 256)])
def test_histogram_matches_exact_on_small_matrices(shape):
    for i, kind in enumerate(KINDS):
        base = draw(kind, shape, seed=10 + i)
        for dtype in DTYPES:
            w = base.to(dtype)
            assert_close_fits(fit_weibull(w), fit_weibull(w, method="exact"), f"{kind} {dtype} {shape}")


def test_histogram_matches_exact_on_1024_matrices():
    for i, kind in enumerate(KINDS):
        dtype = DTYPES[i % 3]
        w = draw(kind, (1024, 1024), seed=20 + i).to(dtype)
        assert_close_fits(fit_weibull(w), fit_weibull(w, method="exact"), f"{kind} {dtype} 1024")


@pytest.mark.slow
def test_histogram_matches_exact_on_4096x11008():
    # The largest shape, two precisions of one draw (each exact sort of 45M values costs seconds on 2 cores).
    w = draw("student_t4", (4096, 11008), seed=30)
    for dtype in (torch.float32, torch.bfloat16):
        v = w.to(dtype)
        assert_close_fits(fit_weibull(v), fit_weibull(v, method="exact"), f"student_t4 {dtype} 4096x11008")


@pytest.mark.slow
def test_histogram_matches_exact_on_4096x4096_fp16(gaussian_4096):
    w = gaussian_4096[0]
    outliers = torch.where(draw("uniform", w.shape, seed=31).abs() > 0.0198, w * 10, w)  # ~1% outliers
    v = outliers.to(torch.float16)
    assert_close_fits(fit_weibull(v), fit_weibull(v, method="exact"), "outliers fp16 4096x4096")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(min_value=MIN_ELEMENTS, max_value=5000),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    spread=st.floats(min_value=0.05, max_value=3.0),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_bf16_and_fp16_histograms_reproduce_the_sort_exactly(n, seed, spread, dtype):
    # Every bf16 / fp16 element equals its code's value, so up to ~4096 middle ranks the histogram fit is the
    # exact protocol, not an approximation of it.
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * spread).exp().to(dtype) * 0.01
    hist, exact = fit_weibull(w), fit_weibull(w, method="exact")
    assert hist.ok == exact.ok
    if exact.ok:
        assert abs(hist.k - exact.k) <= 1e-9 * exact.k
        assert abs(hist.scale / exact.scale - 1) <= 1e-9
        assert abs(hist.r2 - exact.r2) <= 1e-9
        for q in ("q10", "q50", "q90", "q99", "q999"):
            assert getattr(hist, q) == pytest.approx(getattr(exact, q), rel=1e-12)


def test_float64_and_float8_weights():
    w = draw("gaussian", (300, 300), seed=40)
    w64 = w.to(torch.float64)
    assert_close_fits(fit_weibull(w64), fit_weibull(w64, method="exact"), "fp64")
    w8 = w.to(torch.float8_e4m3fn)
    hist, exact = fit_weibull(w8), fit_weibull(w8, method="exact")
    assert hist.ok and abs(hist.k - exact.k) < 1e-9


# --------------------------------------------------------------------------------------------------------------
# A real model


def test_fresh_tiny_llama_projections_sit_at_the_gaussian_anchor():
    from weibull_monitor.demos.toy import tiny_llama

    model = tiny_llama(
        seed=0, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2
    )
    named = [(name, p) for name, p in model.named_parameters() if p.dim() == 2 and "proj" in name]
    assert len(named) == 2 * 7
    fits = fit_many(named)
    for name, fit in fits.items():
        assert fit.ok, (name, fit.reason)
        assert abs(fit.k - K_GAUSSIAN) <= 3 * fit.k_stderr, (name, fit.k, fit.k_stderr)
        assert abs(fit.scale / (LAMBDA_PER_SIGMA * 0.02) - 1) <= 3 * fit.scale_rel_stderr + 1e-3, name
    # fit_many returns the same numbers as fitting one matrix at a time.
    name, p = named[0]
    assert fit_weibull(p).to_dict() == pytest.approx(fits[name].to_dict())


# --------------------------------------------------------------------------------------------------------------
# fit_many


def test_fit_many_equals_single_fits_for_mixed_inputs():
    tensors = {
        "small_fp32": draw("gaussian", (64, 64), 50),
        "small_bf16": draw("laplace", (32, 200), 51).to(torch.bfloat16),
        "large_fp16": draw("uniform", (400, 300), 52).to(torch.float16),
        "strided": draw("student_t4", (128, 300), 53)[:, 100:250],
        "zeros": torch.zeros(10, 10),
        "ints": torch.ones(10, 10, dtype=torch.int32),
    }
    many = fit_many(tensors)
    assert list(many) == list(tensors)
    for name, t in tensors.items():
        assert many[name].to_dict() == pytest.approx(fit_weibull(t).to_dict(), nan_ok=True), name
    assert fit_many(list(tensors.items()), method="exact")["small_fp32"] == fit_weibull(
        tensors["small_fp32"], method="exact"
    )
    assert fit_many({}) == {}


def test_fit_many_rejects_non_tensors_and_unknown_methods():
    with pytest.raises(TypeError):
        fit_many({"a": torch.randn(10, 10), "b": [1.0, 2.0]})
    with pytest.raises(TypeError):
        fit_many([torch.randn(10, 10)])
    with pytest.raises(ValueError):
        fit_many({"a": torch.randn(10, 10)}, method="median")
    with pytest.raises(ValueError):
        fit_weibull(torch.randn(10, 10), method="median")


# --------------------------------------------------------------------------------------------------------------
# Bad input: never raises, never a silently wrong number


def _assert_not_ok(fit: WeibullFit, words: str) -> None:
    assert not fit.ok
    assert fit.reason and words in fit.reason, fit.reason
    floats = [fit.k, fit.scale, fit.r2, fit.k_stderr, fit.scale_rel_stderr, fit.q10, fit.q50, fit.q999]
    assert all(math.isnan(v) for v in floats)
    assert all(math.isnan(v) for k, v in fit.to_dict().items() if isinstance(v, float))


class _Subclass(torch.Tensor):
    pass


BAD_INPUTS = {
    "empty": (lambda: torch.empty(0, 16), "empty"),
    "all zero": (lambda: torch.zeros(64, 64), "zero"),
    "too few nonzero": (lambda: torch.cat([torch.randn(MIN_ELEMENTS - 1), torch.zeros(4000)]), "minimum"),
    "all nan": (lambda: torch.full((32, 32), float("nan")), "non-finite"),
    "all inf": (lambda: torch.full((32, 32), float("-inf")), "non-finite"),
    "int8": (lambda: torch.randint(-100, 100, (64, 64), dtype=torch.int8), "not floating point"),
    "int64": (lambda: torch.randint(-100, 100, (64, 64)), "not floating point"),
    "bool": (lambda: torch.ones(64, 64, dtype=torch.bool), "not floating point"),
    "quantized": (
        lambda: torch.quantize_per_tensor(torch.randn(64, 64), 0.01, 0, torch.qint8),
        "quantized",
    ),
    "complex": (lambda: torch.randn(64, 64, dtype=torch.complex64), "complex"),
    "meta": (lambda: torch.empty(64, 64, device="meta"), "meta"),
    "sparse": (lambda: torch.randn(64, 64).to_sparse(), "layout"),
    "subclass": (lambda: torch.randn(64, 64).as_subclass(_Subclass), "subclass"),
    "constant": (lambda: torch.full((64, 64), 0.02), "spread"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("method", ["histogram", "exact"])
@pytest.mark.filterwarnings("ignore:.*quantized tensor creation.*:UserWarning")
def test_bad_input_gives_a_reason_not_a_number(case, method):
    make, words = BAD_INPUTS[case]
    tensor = make()
    fit = fit_weibull(tensor, method=method)
    if case == "constant" and method == "histogram":
        words = "codes"  # an fp32 histogram cannot see inside one code: it says so instead of guessing
    _assert_not_ok(fit, words)
    assert fit.method == method
    many = fit_many({"x": tensor}, method=method)["x"]
    assert not many.ok and many.reason == fit.reason


def test_counts_survive_a_failed_fit():
    fit = fit_weibull(torch.cat([torch.randn(10), torch.zeros(5), torch.tensor([float("nan")] * 3)]))
    assert (fit.n, fit.n_zero, fit.n_nonfinite) == (10, 5, 3) and not fit.ok


@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_nonfinite_elements_are_counted_and_left_out(method):
    w = draw("gaussian", (128, 128), 60)
    dirty = w.clone()
    dirty[0, :7] = float("nan")
    dirty[1, :3] = float("inf")
    dirty[2, :2] = float("-inf")
    dirty[3, :5] = 0.0
    clean = torch.cat([w[4:].reshape(-1), w[:4, 7:].reshape(-1), w[1:3, :7][w[1:3, :7] != 0][:0]])
    clean = torch.cat([w[0, 7:], w[1, 3:], w[1, :3].new_tensor([]), w[2, 2:], w[3, 5:], w[4:].reshape(-1)])
    fit, ref = fit_weibull(dirty, method=method), fit_weibull(clean, method=method)
    assert fit.ok and (fit.n_nonfinite, fit.n_zero) == (12, 5)
    assert fit.n == ref.n and fit.k == pytest.approx(ref.k, rel=1e-12)


@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_vectors_and_higher_rank_tensors_are_fitted_flattened(method):
    w = draw("gaussian", (8, 64, 32), 61)
    flat = fit_weibull(w.reshape(-1), method=method)
    assert flat.ok
    assert fit_weibull(w, method=method).to_dict() == flat.to_dict()
    assert fit_weibull(w.reshape(512, 32), method=method).to_dict() == flat.to_dict()
    scalar = fit_weibull(torch.tensor(0.5), method=method)
    assert not scalar.ok and "minimum" in scalar.reason


def test_parameters_with_grad_and_non_tensors():
    p = torch.nn.Parameter(draw("gaussian", (64, 64), 62))
    fit = fit_weibull(p)
    assert fit.ok and fit.to_dict() == fit_weibull(p.detach()).to_dict()
    for bad in (None, 1.0, [1.0, 2.0], np.ones((4, 4))):
        with pytest.raises(TypeError):
            fit_weibull(bad)


def test_to_dict_is_plain_and_ratios_are_defined():
    fit = fit_weibull(draw("gaussian", (200, 200), 63))
    d = fit.to_dict()
    assert {type(v) for v in d.values()} <= {float, int, bool, str, type(None)}
    assert d["q90_over_q10"] == pytest.approx(fit.q90 / fit.q10)
    assert d["q99_over_q50"] > 1 and d["q999_over_q50"] > d["q99_over_q50"]


def test_fit_many_in_slices_equals_single_fits(monkeypatch):
    from weibull_monitor.estimator.histogram import batch

    monkeypatch.setattr(batch, "SLICE_ROWS", 3)  # 8 matrices: slices of 3, 3 and 2
    named = [(f"m{i}", draw("gaussian", (40 + 30 * i, 50), 60 + i) * 10.0 ** (i % 3 - 2)) for i in range(8)]
    named[4] = ("m4", named[4][1].to(torch.bfloat16))
    many = fit_many(named)
    assert list(many) == [name for name, _ in named]
    for name, t in named:
        assert many[name].to_dict() == pytest.approx(fit_weibull(t).to_dict(), nan_ok=True), name


@pytest.mark.parametrize("n", [6_000, 50_000, 400_000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounded_histograms_beyond_rank_by_rank_still_reproduce_the_sort(n, dtype):
    # Above EXACT_RANKS middle ranks the bf16/fp16 sums run bin by bin with closed-form sums of y (Euler-Maclaurin):
    # still the sort's answer to float64 rounding, not an approximation of it.
    for i, kind in enumerate(("gaussian", "laplace", "outliers")):
        w = draw(kind, (n,), seed=60 + i).to(dtype)
        hist, exact = fit_weibull(w), fit_weibull(w, method="exact")
        assert hist.ok and exact.ok
        assert abs(hist.k - exact.k) <= 1e-11 * exact.k, (kind, hist.k, exact.k)
        assert abs(hist.scale / exact.scale - 1) <= 1e-11, kind
        assert abs(hist.r2 - exact.r2) <= 1e-11, kind
