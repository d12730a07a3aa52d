"""The calibrated rules on constructed snapshots (thresholds, levels, gates), the builder state they read surviving a
JSON round trip and a monitor resume, and the weights-only logit bound against a direct computation."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from weibull_monitor.alerts import (
    AlertEngine,
    AttentionLogitBound,
    ScaleJump,
    SelectionCollapse,
    ShapeDriftUp,
    TransmissionOutOfBand,
    default_rules,
)
from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.estimator import WeibullFit
from weibull_monitor.models import Role, model_roles
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.snapshot import SnapshotBuilder, collect_entries
from weibull_monitor.snapshot.dynamics import MatrixStats
from weibull_monitor.snapshot.logit_bound import attention_logit_bounds

NAN = math.nan


def fit(k: float, scale: float = 0.02, stderr: float = 0.002, r2: float = 0.999) -> WeibullFit:
    return WeibullFit(k, scale, r2, 10_000, 0, 0, stderr, 0.01, "test", True, None)


def stats(**values) -> MatrixStats:
    base = dict.fromkeys(
        ("drift", "drift_z", "scale_growth", "lr", "lr_peak", "weight_decay", "T_over_tau"), NAN
    )
    base.update(scale_over_sqrt_lr_wd=NAN, scale_over_sqrt_peak_lr_wd=NAN)
    return MatrixStats(metric_key=None, in_aggregates=True, **{**base, **values})


def snapshot(step=100, ks=(), klass="selection", matrices=None, **fields):
    fits = {f"m{i}": fit(k) for i, k in enumerate(ks)}
    roles = {key: SimpleNamespace(klass=klass, layer=0) for key in fits}
    return SimpleNamespace(
        step=step, fits=fits, roles=roles, matrices=matrices or {}, aggregates={}, **fields
    )


# ------------------------------------------------------------------------------------------ thresholds, levels


@pytest.mark.parametrize(
    ("bound", "start", "fires"),
    [(200.0, 2.0, True), (90.0, 0.5, False), (200.0, 20.0, False), (math.inf, 2.0, True)],
)
def test_logit_bound_needs_growth_and_size(bound, start, fires):
    snap = snapshot(logit_bounds={0: [3.0, bound]}, logit_bounds_first={0: [2.5, start]})
    breaches = AttentionLogitBound().evaluate(snap)
    assert bool(breaches) == fires
    if fires:
        assert breaches[0].values["head"] == 1 and "try a lower peak learning rate" in breaches[0].message


def test_logit_bound_quiet_without_bounds():
    assert AttentionLogitBound().evaluate(snapshot()) == []  # sharded or unknown layout: nothing to judge


def _drifting(drift: float, z: float, n: int = 4) -> dict[str, MatrixStats]:
    return {f"m{i}": stats(drift_from_first=drift, drift_from_first_z=z) for i in range(n)}


@pytest.mark.parametrize(
    ("drift", "z", "qk_norm", "level"),
    [
        (0.08, 6.0, False, "warning"),
        (0.08, 6.0, True, "info"),
        (0.03, 9.0, False, None),
        (0.2, 3.0, False, None),
    ],
)
def test_shape_drift_up(drift, z, qk_norm, level):
    snap = snapshot(ks=[1.3] * 4, matrices=_drifting(drift, z), attention_qk_norm=qk_norm)
    breaches = ShapeDriftUp().evaluate(snap)
    assert [b.level or "warning" for b in breaches] == ([level] if level else [])


def test_shape_drift_down_is_not_up():
    snap = snapshot(ks=[1.0] * 4, matrices=_drifting(-0.2, -20.0))
    assert ShapeDriftUp().evaluate(snap) == []


@pytest.mark.parametrize(
    ("rate", "before", "count", "fires"),
    [
        (math.log(3) / 10, math.log(1.1) / 10, 3, True),  # ×3 per 10 steps, 11x the fastest earlier change
        (math.log(3) / 10, math.log(1.1) / 10, 2, False),  # too little history
        (math.log(1.3) / 10, math.log(1.02) / 10, 5, False),  # under the ×1.5 floor
        (math.log(3) / 10, math.log(2) / 10, 5, False),  # fast, but as fast as this matrix moved before
    ],
)
def test_scale_jump(rate, before, count, fires):
    matrices = {"m0": stats(scale_rate=rate, scale_rate_max_before=before, scale_rate_count=count)}
    breaches = ScaleJump().evaluate(snapshot(ks=[1.2], klass="transmission", matrices=matrices))
    assert bool(breaches) == fires
    if fires:
        assert "roll back" in breaches[0].message


@pytest.mark.parametrize(
    ("expectation", "median", "fires"),
    [("deep", 0.80, False), ("deep", 0.60, True), ("mild", 0.95, True), ("mild", 1.12, False),
     ("transitional", 1.0, False), ("transitional", 0.85, True), (None, 0.8, False)],
)  # fmt: skip
def test_selection_collapse_by_kind(expectation, median, fires):
    snap = snapshot(ks=[median] * 6, expectation=expectation, attention_kind=None)
    assert any(b.key == "median" for b in SelectionCollapse().evaluate(snap)) == fires


def test_selection_collapse_one_matrix_is_critical():
    snap = snapshot(ks=[1.12, 1.13, 1.14, 0.6], expectation="mild", attention_kind="gqa")
    (breach,) = SelectionCollapse().evaluate(snap)
    assert breach.key == "matrix" and breach.level == "critical" and "try" in breach.message


@pytest.mark.parametrize(("t_over_tau", "fires"), [(0.5, False), (None, False), (1.5, True)])
def test_transmission_band_only_for_comparable_runs(t_over_tau, fires):
    snap = snapshot(ks=[1.30] * 4, klass="transmission", T_over_tau=t_over_tau)
    breaches = TransmissionOutOfBand().evaluate(snap)
    assert bool(breaches) == fires
    assert TransmissionOutOfBand().level == "info"


def test_default_levels():
    levels = {rule.rule_name: rule.level for rule in default_rules()}
    assert levels == {
        "attention_logit_bound": "warning",
        "scale_jump": "warning",
        "shape_drift_up": "warning",
        "selection_collapse": "warning",
        "selection_departure_onset": "info",
        "transmission_out_of_band": "info",
        "non_weibull_shape": "info",
        "scale_runaway": "info",
        "non_finite_weights": "critical",
    }


# ------------------------------------------------------------------------------------------ state and resume


def _entries(keys):
    role = Role(layer=0, component="o", klass="transmission")
    matrix = SimpleNamespace(numel=10_000)
    return [SimpleNamespace(key=k, param_name=k, component=None, matrix=matrix, role=role) for k in keys]


def test_scale_rate_state_survives_json_round_trip():
    scales = {0: 0.020, 10: 0.0204, 20: 0.0208, 30: 0.0212, 40: 0.06}  # steady growth, then ×2.8 in 10 steps
    entries = _entries(["m"])
    whole = SnapshotBuilder()
    first_half = SnapshotBuilder()
    for step in (0, 10, 20, 30):
        whole.build(step, entries, {"m": fit(1.2, scales[step])})
        first_half.build(step, entries, {"m": fit(1.2, scales[step])})
    resumed = SnapshotBuilder()
    resumed.load_state_dict(json.loads(json.dumps(first_half.state_dict())))
    a = whole.build(40, entries, {"m": fit(1.2, scales[40])}).matrices["m"]
    b = resumed.build(40, entries, {"m": fit(1.2, scales[40])}).matrices["m"]
    assert (a.scale_rate, a.scale_rate_max_before, a.scale_rate_count) == (
        b.scale_rate,
        b.scale_rate_max_before,
        b.scale_rate_count,
    )
    assert a.scale_rate_count == 3 and a.scale_rate == pytest.approx(math.log(0.06 / 0.0212) / 10)
    assert a.scale_rate_max_before == pytest.approx(math.log(0.0204 / 0.020) / 10)
    # a repeated snapshot of the same step changes nothing
    again = resumed.build(40, entries, {"m": fit(1.2, 0.5)}).matrices["m"]
    assert math.isnan(again.scale_rate) and resumed.state_dict() == json.loads(
        json.dumps(resumed.state_dict())
    )


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * 1e-4)


def test_resumed_monitor_keeps_what_the_rules_compare_against(tmp_path):
    """A monitor resumed from its state_dict fires what the uninterrupted one fires: the first snapshot's bounds
    and the earlier scale rates come from the state, not from the first snapshot after the resume."""

    def sabotage(model):
        with torch.no_grad():
            model.model.layers[1].self_attn.q_proj.weight.mul_(12)
            model.model.layers[1].self_attn.k_proj.weight.mul_(12)

    def run(resume_at):
        model = tiny_llama(0)
        monitor = WeibullMonitor(model, store=None, rules=default_rules())
        fired = []
        for step in range(0, 60, 10):
            if step == resume_at:
                state = json.loads(json.dumps(monitor.state_dict()))
                monitor.close()
                monitor = WeibullMonitor(model, store=None, rules=default_rules())
                monitor.load_state_dict(state)
            if step == 50:
                sabotage(model)
            else:
                _perturb(model, step)
            fired += [(a.step, a.rule, a.level) for a in monitor.snapshot(step).alerts if a.level != "info"]
        monitor.close()
        return fired

    straight = run(resume_at=None)
    assert (50, "attention_logit_bound", "warning") in straight
    assert (50, "scale_jump", "warning") in straight
    assert run(resume_at=50) == straight
    assert run(resume_at=30) == straight


# ------------------------------------------------------------------------------------------ the bound itself


def _direct_bound(q, k, head_dim, gain, hidden):
    """σ_max of the explicit [hidden, hidden] product per head (the definition, formed in full)."""
    qh = q.reshape(-1, head_dim, hidden).double() * gain.double()
    kh = k.reshape(-1, head_dim, hidden).double() * gain.double()
    kh = kh.repeat_interleave(qh.shape[0] // kh.shape[0], dim=0)
    product = qh.transpose(1, 2) @ kh
    return [float(torch.linalg.matrix_norm(m, ord=2)) * head_dim**-0.5 * hidden for m in product]


def test_bound_matches_definition_for_gqa_and_fused():
    import transformers

    llama = tiny_llama(0)
    with torch.no_grad():
        llama.model.layers[0].input_layernorm.weight.uniform_(0.5, 1.5)
    neox = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
        )
    )
    for model, q, k, gain in (
        (llama, *(getattr(llama.model.layers[0].self_attn, n).weight for n in ("q_proj", "k_proj")),
         llama.model.layers[0].input_layernorm.weight),
        (neox, neox.gpt_neox.layers[0].attention.query_key_value.weight.view(4, 3, 16, 64)[:, 0],
         neox.gpt_neox.layers[0].attention.query_key_value.weight.view(4, 3, 16, 64)[:, 1],
         neox.gpt_neox.layers[0].input_layernorm.weight),
    ):  # fmt: skip
        result = attention_logit_bounds(
            model, collect_entries(model, model_roles(model), model.config), model.config
        )
        assert result.skipped == {} and result.qk_norm is False
        expected = _direct_bound(q.detach(), k.detach(), 16, gain.detach(), 64)
        assert result.bounds[0] == pytest.approx(expected, rel=1e-6)


def test_bound_with_qk_norm_and_without_a_layout():
    import transformers

    qwen = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=64,
        )
    )  # fmt: skip
    with torch.no_grad():
        qwen.model.layers[0].self_attn.q_norm.weight.fill_(2.0)
    result = attention_logit_bounds(qwen, collect_entries(qwen, model_roles(qwen), qwen.config), qwen.config)
    assert result.qk_norm is True and result.bounds[0] == pytest.approx([16**-0.5 * 16 * 2.0 * 1.0] * 4)

    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    roles = model_roles(encoder)
    result = attention_logit_bounds(encoder, collect_entries(encoder, roles, None), None)
    assert result.bounds == {}
    assert all("head count unknown" in reason for reason in result.skipped.values()) and result.skipped


def test_engine_state_round_trip_with_new_rules():
    engine = AlertEngine(default_rules())
    snap = snapshot(step=10, logit_bounds={0: [500.0]}, logit_bounds_first={0: [2.0]}, expectation="mild")
    assert [a.rule for a in engine(snap)] == ["attention_logit_bound"]
    resumed = AlertEngine(default_rules())
    resumed.load_state_dict(json.loads(json.dumps(engine.state_dict())))
    snap.step = 20
    assert resumed(snap) == []  # cooling down after a resume as it would without one


def test_bound_of_a_zero_head_is_zero_and_the_others_unchanged():
    model = tiny_llama(0)
    q = model.model.layers[0].self_attn.q_proj.weight
    entries = collect_entries(model, model_roles(model), model.config)
    before = attention_logit_bounds(model, entries, model.config).bounds[0]
    with torch.no_grad():
        q[:16].zero_()  # head 0 of 4 (head_dim 16): a singular Gram matrix
    after = attention_logit_bounds(model, entries, model.config).bounds[0]
    assert after[0] == pytest.approx(0.0, abs=1e-9) and after[1:] == pytest.approx(before[1:], rel=1e-9)
