"""LoggingSink: one compact line per snapshot through Python ``logging`` (or straight to a stream)."""

from __future__ import annotations

import logging
import math
from typing import IO, TYPE_CHECKING

from weibull_monitor.sinks.base import Sink

if TYPE_CHECKING:
    from weibull_monitor.snapshot import Snapshot

_CLASS_ORDER = ("selection", "transmission", "value", "mixed", "other")


def format_snapshot_line(snapshot: Snapshot) -> str:
    """``step 200 | selection k 1.152 (-0.053) | transmission k 1.203 (-0.002) | T/tau 0.0183 | alerts: ...``

    Each class shows its median k and, in brackets, the median drift from the Gaussian anchor.
    """
    agg = snapshot.aggregates
    parts = [f"weibull step {snapshot.step}"]
    for klass in _CLASS_ORDER:
        k = agg.get(f"weibull/{klass}/k_median")
        if k is None:
            continue
        drift = agg.get(f"weibull/{klass}/k_drift")
        parts.append(f"{klass} k {k:.3f}" + (f" ({drift:+.3f})" if drift is not None else ""))
    gap = agg.get("weibull/selection_transmission_gap")
    if gap is not None:
        parts.append(f"gap {gap:+.3f}")
    t = snapshot.T_over_tau
    parts.append(f"T/tau {t:.4g}" if t is not None and math.isfinite(t) else "T/tau n/a")
    if snapshot.alerts:
        parts.append("alerts: " + ", ".join(f"{a.level} {a.rule}" for a in snapshot.alerts))
    return " | ".join(parts)


class LoggingSink(Sink):
    """Writes :func:`format_snapshot_line` for every snapshot.

    ``stream``: write to this text stream (e.g. ``sys.stdout``) instead of the logger. Alerts themselves are
    already logged by the monitor at their own level; this sink only names them in the snapshot line.
    """

    run_in_thread = False  # a log line is cheap, and keeping it inline keeps it in order with training output

    def __init__(
        self, logger: logging.Logger | None = None, level: int = logging.INFO, stream: IO[str] | None = None
    ) -> None:
        self.logger = logger or logging.getLogger("weibull_monitor")
        self.level = level
        self.stream = stream

    def log_snapshot(self, snapshot: Snapshot) -> None:
        line = format_snapshot_line(snapshot)
        if self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()
        else:
            self.logger.log(self.level, "%s", line)
