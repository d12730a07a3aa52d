"""Alert engine semantics (warmup, patience, cooldown, once, resume) and each built-in rule."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from weibull_monitor.alerts import LEVELS, Alert, AlertEngine, Breach, Rule


class Threshold(Rule):
    """A user rule in one small class: breaches while ``snapshot.value`` exceeds a limit."""

    name = "threshold"
    level = "warning"

    def __init__(self, limit: float = 1.0, **kw):
        super().__init__(**kw)
        self.limit = limit

    def evaluate(self, snapshot):
        if snapshot.value > self.limit:
            return [
                Breach("value", ("m",), {"value": snapshot.value}, f"value {snapshot.value} > {self.limit}")
            ]
        return []


def run(engine, values, every=10):
    """Feed one snapshot per value at steps 0, every, 2*every, ...; return {step: [alerts]}."""
    return {i * every: engine(SimpleNamespace(step=i * every, value=v)) for i, v in enumerate(values)}


def fired_steps(result):
    return [step for step, alerts in result.items() if alerts]


def test_patience_needs_consecutive_breaches():
    engine = AlertEngine([Threshold(patience=3)])
    result = run(engine, [2, 2, 0, 2, 2, 2, 2])
    # the dip at step 20 resets the streak: 3 consecutive breaches first complete at step 50
    assert fired_steps(result) == [50, 60]


def test_cooldown_in_steps_and_once():
    result = run(AlertEngine([Threshold(cooldown=25)]), [2] * 8)
    assert fired_steps(result) == [0, 30, 60]
    result = run(AlertEngine([Threshold(once=True)]), [2, 0, 2, 2])
    assert fired_steps(result) == [0]


def test_warmup_skips_early_steps():
    result = run(AlertEngine([Threshold(warmup=35, patience=2)]), [2] * 7)
    # evaluated from step 40 on; patience 2 -> first alert at 50
    assert fired_steps(result) == [50, 60]


def test_alert_fields():
    (alert,) = AlertEngine([Threshold()])(SimpleNamespace(step=7, value=3))
    assert alert == Alert(7, "threshold", "warning", "value", ("m",), {"value": 3.0}, "value 3 > 1.0")
    assert str(alert) == "[warning] threshold at step 7: value 3 > 1.0"
    assert json.loads(json.dumps(alert.to_dict()))["matrices"] == ["m"]


def test_state_dict_resume_keeps_streak_and_cooldown():
    engine = AlertEngine([Threshold(patience=2, cooldown=100)])
    run(engine, [2, 2])  # fired at step 10
    state = json.loads(json.dumps(engine.state_dict()))  # must survive JSON (store, checkpoints)
    resumed = AlertEngine([Threshold(patience=2, cooldown=100)])
    resumed.load_state_dict(state)
    assert resumed(SimpleNamespace(step=20, value=2)) == []  # still cooling down
    assert resumed(SimpleNamespace(step=110, value=2))  # cooldown over, streak carried on
    with pytest.raises(ValueError):
        resumed.load_state_dict({"version": 99})


def test_broken_rule_reported_once_and_others_still_fire(caplog):
    class Broken(Rule):
        name = "broken"

        def evaluate(self, snapshot):
            raise RuntimeError("boom")

    engine = AlertEngine([Broken(), Threshold()])
    with caplog.at_level(logging.ERROR, logger="weibull_monitor.alerts"):
        result = run(engine, [2, 2, 2])
    assert all(len(alerts) == 1 for alerts in result.values())
    assert sum("broken" in r.getMessage() for r in caplog.records) == 1
    assert "boom" in caplog.text


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError):
        Threshold(level="fatal")
    with pytest.raises(ValueError):
        Threshold(patience=0)
    with pytest.raises(ValueError):
        AlertEngine([Threshold(), Threshold()])
    assert LEVELS == ("info", "warning", "critical")


# --------------------------------------------------------------------------------------------------------------
# Built-in rules, forced to fire on a real tiny LLaMA through the real monitor, store and logging.

import torch  # noqa: E402

from weibull_monitor.alerts import (  # noqa: E402
    AttentionLogitBound,
    NonFiniteWeights,
    NonWeibullShape,
    ScaleRunaway,
    SelectionCollapse,
    SelectionDepartureOnset,
    ShapeDriftUp,
    TransmissionOutOfBand,
)
from weibull_monitor.demos.toy import tiny_llama  # noqa: E402
from weibull_monitor.monitor import WeibullMonitor  # noqa: E402


def weibull_draws(shape, k: float, scale: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Signed draws whose magnitudes are Weibull(k, scale): |w| = scale * E^(1/k), E ~ Exp(1)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = scale * torch.empty(shape).exponential_(generator=g) ** (1.0 / k)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return magnitude * sign


def _set(model, suffixes, make):
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if any(name.endswith(s) for s in suffixes):
                p.copy_(make(p.shape, i))


def _attention(model):
    _set(model, ("q_proj.weight", "k_proj.weight"), lambda shape, i: weibull_draws(shape, 0.7, seed=i))


def _one_deep(model):
    _attention(model)
    _set(model, ("layers.1.self_attn.k_proj.weight",), lambda shape, i: weibull_draws(shape, 0.45, seed=i))


def _laplace(model):
    _set(model, ("q_proj.weight", "k_proj.weight"), lambda shape, i: weibull_draws(shape, 1.0, seed=i))


def _uniform_transmission(model):
    suffixes = ("o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    _set(model, suffixes, lambda shape, i: (torch.rand(shape) * 2 - 1) * 0.03)


def _mixture(model):
    def make(shape, i):
        w = torch.randn(shape)
        return torch.where(torch.rand(shape) < 0.5, w * 1e-4, w * 0.05)

    _set(model, ("layers.0.mlp.up_proj.weight",), make)


def _uniform_attention(model):  # k 1.2054 -> 1.375: the shape drifts up from where it started
    _set(model, ("q_proj.weight", "k_proj.weight"), lambda shape, i: (torch.rand(shape) * 2 - 1) * 0.03)


def _scale_qk(model):  # W_q and W_k of layer 0 ×12 each: its logit bound ×144
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(12)
        model.model.layers[0].self_attn.k_proj.weight.mul_(12)


def _nan(model):
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")


CASES = {
    # rule, sabotage applied before snapshot 0 (or between 0 and 25 for growth), expected (step, level, key)
    "collapse": (SelectionCollapse(patience=2, cooldown=50), _one_deep, None,
                 [(25, "warning", "median"), (25, "critical", "matrix"), (75, "warning", "median"), (75, "critical", "matrix")]),
    # measured from each matrix's first snapshot: a Laplace start is where it starts, a later change departs
    "onset": (SelectionDepartureOnset(), None, _laplace, [(25, "info", "selection")]),
    "onset_start": (SelectionDepartureOnset(), _laplace, None, []),
    "band": (TransmissionOutOfBand(patience=3, min_T_over_tau=None), _uniform_transmission, None, [(50, "info", "median")]),
    "band_in_progress": (TransmissionOutOfBand(patience=3), _uniform_transmission, None, []),  # no T/tau: not comparable
    "shape": (NonWeibullShape(cooldown=1000), _mixture, None, [(0, "info", "model.layers.0.mlp.up_proj.weight")]),
    "runaway": (ScaleRunaway(patience=1), None, lambda m: m.model.layers[0].self_attn.o_proj.weight.data.mul_(8),
                [(25, "info", "model.layers.0.self_attn.o_proj.weight")]),
    "drift_up": (ShapeDriftUp(classes=("selection",), z=3.0), None, _uniform_attention, [(25, "warning", "selection")]),
    "logit_bound": (AttentionLogitBound(), None, _scale_qk, [(25, "warning", "heads")]),
    "nonfinite": (NonFiniteWeights(), _nan, None, [(s, "critical", "weights") for s in (0, 25, 50, 75)]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_builtin_rule_fires_into_store_log_and_callback(case, tmp_path, caplog):
    rule, sabotage, later, expected = CASES[case]
    model = tiny_llama(0)
    if sabotage:
        sabotage(model)
    received = []
    monitor = WeibullMonitor(
        model, store=tmp_path / "w.sqlite", rules=[rule], on_alert=received.append, stop_on_critical=True
    )
    fired = []
    with caplog.at_level(logging.INFO, logger="weibull_monitor"):
        for step in (0, 25, 50, 75):
            fired += [(a.step, a.level, a.key) for a in monitor.snapshot(step).alerts]
            if later and step == 0:
                later(model)
    monitor.close()
    assert sorted(fired) == sorted(expected)
    assert sorted((a.step, a.level, a.key) for a in received) == sorted(expected)
    with monitor.store.__class__(tmp_path / "w.sqlite") as store:
        stored = store.alerts()
    assert sorted((a["step"], a["level"], a["key"]) for a in stored) == sorted(expected)
    assert all(a["rule"] == rule.rule_name and a["message"] for a in stored)
    logged = [r for r in caplog.records if rule.rule_name in r.getMessage() and "alert" in r.getMessage()]
    assert len(logged) == len(expected)
    assert {logging.getLevelName(r.levelno).lower() for r in logged} == {lvl for _, lvl, _ in expected}
    if any(lvl != "info" for _, lvl, _ in expected):  # every warning and critical says what to try
        assert all(
            " try " in a["message"] or "roll back" in a["message"] for a in stored if a["level"] != "info"
        )
    assert monitor.stop_requested == any(lvl == "critical" for _, lvl, _ in expected)
    if not expected:
        return
    first = received[0]
    assert (first.matrices or case == "logit_bound") and all(
        isinstance(v, float) for v in first.values.values()
    )
    if case == "shape":  # quantile-ratio figures replace k when the shape is not Weibull
        assert first.values["r2"] < 0.95 and first.values["q90_over_q10"] > 1


def test_rule_class_filter_and_custom_rule_on_real_snapshot(tmp_path):
    model = tiny_llama(0)
    _mixture(model)  # a transmission matrix leaves the Weibull family

    class FewMatrices(Rule):  # a user rule reading the snapshot's aggregates
        name, level = "few_matrices", "info"

        def evaluate(self, snapshot):
            k = snapshot.aggregates["weibull/transmission/k_median"]
            return [Breach("transmission", (), {"k_median": k}, f"transmission median {k:.3f}")]

    rules = [
        NonWeibullShape(classes=("selection",), name="selection_shape"),
        NonWeibullShape(),
        FewMatrices(),
    ]
    with WeibullMonitor(model, store=None, rules=rules) as monitor:
        alerts = monitor.snapshot(0).alerts
    assert sorted(a.rule for a in alerts) == ["few_matrices", "non_weibull_shape"]
