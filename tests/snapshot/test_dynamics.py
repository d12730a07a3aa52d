"""Dynamics on plain data: T/τ budget, metric keys, per-matrix stats and class aggregates."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from weibull_monitor.estimator import K_GAUSSIAN, fit_weibull
from weibull_monitor.models import Role, view_role
from weibull_monitor.snapshot import dynamics, keys
from weibull_monitor.snapshot.budget import TimescaleBudget


def test_budget_sums_lr_times_wd_per_group_and_peak():
    budget = TimescaleBudget()
    lrs = [1e-3 * (1 - i / 10) for i in range(10)]
    for lr in lrs:
        budget.record([(lr, 0.1), (lr * 2, 0.0)])
    assert budget.budget(0) == pytest.approx(sum(lr * 0.1 for lr in lrs), rel=1e-12)
    assert math.isnan(budget.budget(1))  # no weight decay: undefined, not 0 and not inf
    assert math.isnan(budget.budget(7))  # unknown group
    assert budget.peak_lr(0) == pytest.approx(1e-3) and budget.peak_lr(1) == pytest.approx(2e-3)
    restored = TimescaleBudget()
    restored.load_state_dict(budget.state_dict())
    assert restored.budget(0) == budget.budget(0) and restored.updates == 10


def test_budget_counts_skipped_updates_and_keeps_tensor_lr_lazy():
    budget = TimescaleBudget()
    budget.record([(1e-3, 0.1)], updates=5)
    budget.record([(torch.tensor(2e-3, dtype=torch.float64), 0.1)])
    assert budget.budget(0) == pytest.approx(5e-4 + 2e-4, rel=1e-12)
    assert budget.peak_lr(0) == pytest.approx(2e-3)


def test_metric_keys_are_stable_and_disambiguated():
    qkv = Role(layer=3, component="qkv", klass="mixed", parts=("q", "k", "v"))
    roles = {
        "gpt_neox.layers.3.attention.query_key_value.weight": qkv,
        "gpt_neox.layers.3.attention.query_key_value.weight[q]": view_role("p", qkv, "q"),
        "m.layers.3.mlp.experts.2.up_proj.weight": Role(
            layer=3, component="ffn_up", klass="transmission", expert=2
        ),
        "enc.block.1.layer.0.SelfAttention.q.weight": Role(
            layer=1, component="q", klass="selection", stack="encoder"
        ),
        "embed.weight": Role(layer=None, component="embed", klass="other"),
        "a.layers.0.foo.weight": Role(layer=0, component="other", klass="other"),
        "a.layers.0.bar.weight": Role(layer=0, component="other", klass="other"),
    }
    found = keys.matrix_metric_keys(roles)
    assert found["gpt_neox.layers.3.attention.query_key_value.weight"] == "weibull/k/L3/qkv"
    assert found["gpt_neox.layers.3.attention.query_key_value.weight[q]"] == "weibull/k/L3/q"
    assert found["m.layers.3.mlp.experts.2.up_proj.weight"] == "weibull/k/L3/ffn_up/E2"
    assert found["enc.block.1.layer.0.SelfAttention.q.weight"] == "weibull/k/L1/q/encoder"
    assert found["embed.weight"] == "weibull/k/embed"
    assert found["a.layers.0.foo.weight"] == "weibull/k/L0/other/a.layers.0.foo.weight"
    assert len(set(found.values())) == len(found)
    # order-independent
    assert keys.matrix_metric_keys(dict(reversed(list(roles.items())))) == found


def _fits_and_roles():
    g = torch.Generator().manual_seed(1)
    tensors = {
        "L0.q": torch.distributions.Laplace(0.0, 0.02).sample((64, 64)),
        "L0.k": torch.randn(64, 64, generator=g) * 0.02,
        "L0.o": torch.randn(64, 64, generator=g) * 0.02,
        "L0.up": torch.randn(64, 128, generator=g) * 0.03,
        "L0.v": torch.randn(64, 64, generator=g) * 0.02,
        "tiny": torch.randn(3, 3, generator=g),  # too few elements: not ok
    }
    roles = {
        "L0.q": Role(0, "q", "selection"),
        "L0.k": Role(0, "k", "selection"),
        "L0.o": Role(0, "o", "transmission"),
        "L0.up": Role(0, "ffn_up", "transmission"),
        "L0.v": Role(0, "v", "value"),
        "tiny": Role(1, "o", "transmission"),
    }
    return {key: fit_weibull(t, method="exact") for key, t in tensors.items()}, roles


def test_matrix_stats_and_aggregates_match_hand_computation():
    fits, roles = _fits_and_roles()
    budget = TimescaleBudget()
    budget.record([(1e-3, 0.1), (1e-3, 0.0)], updates=100)
    scale_first = {key: fit.scale / 1.5 for key, fit in fits.items() if fit.ok}
    group_of = {"L0.q": 0, "L0.k": 0, "L0.o": 0, "L0.up": 0, "L0.v": 1, "tiny": 0}
    stats = dynamics.matrix_stats(
        fits,
        roles,
        k_anchor=K_GAUSSIAN,
        scale_first=scale_first,
        group_of=group_of,
        current_rates=[(5e-4, 0.1), (5e-4, 0.0)],
        budget=budget,
    )
    q = stats["L0.q"]
    assert q.drift == pytest.approx(fits["L0.q"].k - K_GAUSSIAN)
    assert q.drift_z == pytest.approx(q.drift / fits["L0.q"].k_stderr)
    assert q.drift_z < -5  # Laplace (k = 1) is far from the Gaussian anchor at 64x64
    assert q.scale_growth == pytest.approx(1.5)
    assert q.T_over_tau == pytest.approx(100 * 1e-4)
    assert q.scale_over_sqrt_lr_wd == pytest.approx(fits["L0.q"].scale / math.sqrt(5e-4 / 0.1))
    assert q.scale_over_sqrt_peak_lr_wd == pytest.approx(fits["L0.q"].scale / math.sqrt(1e-3 / 0.1))
    v = stats["L0.v"]  # no weight decay: every ratio that needs it is undefined (NaN), never inf
    assert math.isnan(v.T_over_tau) and math.isnan(v.scale_over_sqrt_lr_wd)
    assert math.isnan(stats["tiny"].drift)

    t_over_tau = dynamics.representative_budget({k: 4096 for k in fits}, group_of, budget)
    agg = dynamics.aggregates(fits, roles, stats, k_anchor=K_GAUSSIAN, T_over_tau=t_over_tau)
    assert all(math.isfinite(v) for v in agg.values())
    sel = statistics.median([fits["L0.q"].k, fits["L0.k"].k])
    trans = statistics.median([fits["L0.o"].k, fits["L0.up"].k])  # the not-ok "tiny" is left out
    assert agg["weibull/selection/k_median"] == pytest.approx(sel)
    assert agg["weibull/selection/k_drift"] == pytest.approx(sel - K_GAUSSIAN)
    assert agg["weibull/transmission/k_median"] == pytest.approx(trans)
    assert agg["weibull/selection_transmission_gap"] == pytest.approx(sel - trans)
    assert agg["weibull/transmission/scale_growth"] == pytest.approx(1.5)
    assert agg["weibull/T_over_tau"] == pytest.approx(0.01)
    assert agg["weibull/k/L0/q"] == fits["L0.q"].k
    assert "weibull/value/scale_over_sqrt_lr_wd" not in agg  # undefined -> absent
    assert "weibull/k/L1/o" not in agg


def test_fused_parent_stays_out_of_class_aggregates():
    fits, roles = _fits_and_roles()
    fits["fused"] = fits["L0.q"]
    roles["fused"] = Role(0, "qkv", "selection", parts=("q", "k", "v"))
    kw = dict(
        k_anchor=K_GAUSSIAN, scale_first={}, group_of={}, current_rates=[], budget=TimescaleBudget()
    )
    stats = dynamics.matrix_stats(fits, roles, aggregate_excluded={"fused"}, **kw)
    agg = dynamics.aggregates(fits, roles, stats, k_anchor=K_GAUSSIAN)
    assert not stats["fused"].in_aggregates
    assert agg["weibull/selection/k_median"] == pytest.approx(
        statistics.median([fits["L0.q"].k, fits["L0.k"].k])
    )
    assert "weibull/k/L0/qkv" in agg and "weibull/T_over_tau" not in agg


def test_median_stderr():
    assert dynamics.median_stderr([0.02] * 4) == pytest.approx(1.2533 * 0.02 / 2)
    assert math.isnan(dynamics.median_stderr([math.nan]))


def test_drift_is_also_measured_from_each_matrix_own_start():
    # PyTorch's default nn.Linear init is uniform (k ~ 1.375, far from the Gaussian anchor): the drift from the
    # matrix's first fit starts at 0 whatever the initialisation, with its significance in combined stderrs.
    from weibull_monitor.distributed import LocalMatrix
    from weibull_monitor.estimator import fit_many
    from weibull_monitor.snapshot import MatrixEntry, SnapshotBuilder

    layer = torch.nn.Linear(256, 256)
    role = Role(layer=0, component="q", klass="selection")
    entries = [MatrixEntry("q", "q", LocalMatrix(layer.weight), role)]
    builder = SnapshotBuilder()
    first = builder.build(0, entries, fit_many({"q": layer.weight.detach()}))
    stats = first.matrices["q"]
    assert stats.drift > 0.1 and stats.drift_z > 10  # far from the Gaussian anchor...
    assert stats.drift_from_first == 0.0 and stats.drift_from_first_z == 0.0  # ...and at its own start
    with torch.no_grad():
        layer.weight.mul_(torch.distributions.Laplace(1.0, 0.3).sample(layer.weight.shape))  # heavier tail
    later = builder.build(10, entries, fit_many({"q": layer.weight.detach()})).matrices["q"]
    assert later.k_first == stats.k_first and later.drift_from_first < -0.05 and later.drift_from_first_z < -5
    restored = SnapshotBuilder()
    restored.load_state_dict(builder.state_dict())
    assert restored.k_first == builder.k_first
