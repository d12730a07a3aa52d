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
