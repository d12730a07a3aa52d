"""One snapshot of a model's weights: which matrices are read, their fits, their dynamics and the dashboard metrics.

Pipeline inside: ``record`` (MatrixEntry, Snapshot) -> ``entries`` (collect the matrices, split fused ones) ->
fits (:func:`weibull_monitor.distributed.fit_matrices`, one process or all ranks) -> ``dynamics`` (per-matrix
drift, growth, λ/√(η/λ_wd); per-class aggregates, with ``classes`` saying who counts and ``budget`` keeping T/τ) ->
``builder`` (the one place a Snapshot is made, for the monitor and the scan alike). ``keys`` names every metric;
``adapters`` fits PEFT-adapted matrices on their effective weight and frozen ones once.
"""

from weibull_monitor.snapshot.builder import SnapshotBuilder
from weibull_monitor.snapshot.entries import collect_entries, entries_for
from weibull_monitor.snapshot.record import MatrixEntry, Snapshot

__all__ = ["MatrixEntry", "Snapshot", "SnapshotBuilder", "collect_entries", "entries_for"]
