"""Alerts in the log without a flood: a snapshot of a 10,000-matrix model can fire a hundred alerts at once (123
WARNING lines at step 0 in the issue-19 trial), which buries everything else in the training log.

The log gets every critical alert and the first few of the rest, then one line counting what was left out per rule
and level. Nothing is lost: every alert still reaches the store, the sinks and ``on_alert``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from weibull_monitor.alerts import LOGGING_LEVELS

__all__ = ["ALERT_LINES", "log_alerts"]

#: Alert lines one snapshot writes to the log at most (critical alerts are always written).
ALERT_LINES = 10


def log_alerts(logger: logging.Logger, alerts: Sequence[Any], step: int, limit: int = ALERT_LINES) -> None:
    """Log ``alerts`` of the snapshot at ``step``: every critical one and others up to ``limit`` lines in all, in
    their order, then one summary line."""
    room = max(0, limit - sum(1 for alert in alerts if alert.level == "critical"))
    held: Counter[tuple[str, str]] = Counter()
    for alert in alerts:
        if alert.level == "critical" or room > 0:
            room -= alert.level != "critical"
            logger.log(LOGGING_LEVELS.get(alert.level, logging.WARNING), "weibull-monitor alert: %s", alert)
        else:
            held[(alert.rule, alert.level)] += 1
    if held:
        worst = max(
            (LOGGING_LEVELS.get(level, logging.WARNING) for _, level in held), default=logging.WARNING
        )
        parts = ", ".join(f"{rule} ({level}): {n}" for (rule, level), n in sorted(held.items()))
        logger.log(
            worst,
            "weibull-monitor: %d more alerts at step %d not logged one by one (%s); all of them are in the store "
            "and the sinks",
            sum(held.values()),
            step,
            parts,
        )
