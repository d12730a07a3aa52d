"""The run store: every snapshot, fit, aggregate and alert of a run in one SQLite file (standard library only).

Inside: ``schema`` (tables; per-matrix columns derived from the records; migration of older stores) ->
``branches`` (who wrote which part of a run; rewinds move replaced rows to the ``*_superseded`` tables) ->
``readers`` (the live timeline by default, branches on request) -> ``run_store`` (:class:`RunStore`: one
transaction per snapshot or fork) -> ``writer`` (:class:`StoreWriter`: failed writes kept and retried, forks in
order with the snapshots).
"""

from weibull_monitor.store.run_store import RunStore, StoreError, WriteResult
from weibull_monitor.store.schema import SCHEMA_VERSION, TABLES
from weibull_monitor.store.writer import StoreWriter

__all__ = ["SCHEMA_VERSION", "TABLES", "RunStore", "StoreError", "StoreWriter", "WriteResult"]
