"""The run store: every snapshot, fit, aggregate and alert of a run in one SQLite file (standard library only).

Inside: ``schema`` (tables; per-matrix columns derived from the records) -> ``run_store`` (:class:`RunStore`:
one transaction per snapshot, readers) -> ``writer`` (:class:`StoreWriter`: failed writes kept and retried).
"""

from weibull_monitor.store.run_store import RunStore, StoreError
from weibull_monitor.store.schema import SCHEMA_VERSION, TABLES
from weibull_monitor.store.writer import StoreWriter

__all__ = ["SCHEMA_VERSION", "TABLES", "RunStore", "StoreError", "StoreWriter"]
