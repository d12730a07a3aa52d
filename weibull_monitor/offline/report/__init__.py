"""``weibull-monitor report``: figures and one HTML page drawn from a run store (``data`` -> ``figures`` -> ``page``)."""

from weibull_monitor.offline.report.data import ReportError, RunData, load_run
from weibull_monitor.offline.report.page import write_report

__all__ = ["ReportError", "RunData", "load_run", "write_report"]
