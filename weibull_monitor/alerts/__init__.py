"""Alerts: rules say *what* breaches in one snapshot; the engine says *when* a breach becomes an alert (warmup,
patience, cooldown, once) and keeps that state across resumes. docs/alerts.md."""

from weibull_monitor.alerts.engine import (
    LEVELS,
    LOGGING_LEVELS,
    Alert,
    AlertEngine,
    Breach,
    Rule,
    check_level,
)
from weibull_monitor.alerts.rules import (
    AttentionLogitBound,
    NonFiniteWeights,
    NonWeibullShape,
    ScaleJump,
    ScaleRunaway,
    SelectionCollapse,
    SelectionDepartureOnset,
    ShapeDriftUp,
    TransmissionOutOfBand,
    default_rules,
)

__all__ = [
    "LEVELS",
    "LOGGING_LEVELS",
    "Alert",
    "AlertEngine",
    "AttentionLogitBound",
    "Breach",
    "NonFiniteWeights",
    "NonWeibullShape",
    "Rule",
    "ScaleJump",
    "ScaleRunaway",
    "SelectionCollapse",
    "SelectionDepartureOnset",
    "ShapeDriftUp",
    "TransmissionOutOfBand",
    "check_level",
    "default_rules",
]
