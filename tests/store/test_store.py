"""RunStore on a real SQLite file: schema, one transaction per snapshot, resume, readers, faults."""

from __future__ import annotations

import logging
import math
import sqlite3

import pytest
import torch

from weibull_monitor.alerts import Alert
from weibull_monitor.estimator import fit_weibull
from weibull_monitor.models import Role
from weibull_monitor.snapshot import Snapshot
from weibull_monitor.store import SCHEMA_VERSION, RunStore, StoreError, StoreWriter


def make_snapshot(step: int, name: str = "model.layers.0.self_attn.q_proj.weight") -> Snapshot:
    fit = fit_weibull(torch.randn(64, 64) * 0.02)
    bad = fit_weibull(torch.randn(3, 3))  # too small: not ok, nan fields
    alert = Alert(step, "rule", "warning", "median", (name,), {"k": 1.0, "nan": math.nan}, "a message")
    return Snapshot(
        step=step,
        fits={name: fit, "tiny": bad},
        roles={name: Role(0, "q", "selection"), "tiny": Role(1, "o", "transmission")},
        aggregates={"weibull/selection/k_median": fit.k, "weibull/T_over_tau": 0.5 * step},
        alerts=[alert],
        attention_kind="gqa",
        T_over_tau=0.5 * step,
        expectation="mild",
    )


def test_write_read_and_no_duplicate_step(tmp_path):
    path = tmp_path / "sub" / "w.sqlite"
    with RunStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        run = store.open_run("run-a", {"optimizer": {"lr": 1e-3}, "note": "x"})
        assert store.write_snapshot(run, make_snapshot(0), state={"a": 1})
        assert store.write_snapshot(run, make_snapshot(10))
        assert not store.write_snapshot(run, make_snapshot(10))  # already stored: nothing written
        assert store.steps(run) == [0, 10]
        assert len(store.fits(step=10, run_id=run)) == 2
        assert len(store.aggregates(run)) == 4
        assert len(store.alerts(run)) == 2
        (row,) = [r for r in store.fits(step=0) if r["name"] == "tiny"]
        assert row["ok"] == 0 and row["k"] is None and row["reason"]  # NaN stored as NULL
        alert = store.alerts(run)[0]
        assert alert["matrices"] == ["model.layers.0.self_attn.q_proj.weight"]
        assert alert["values"] == {"k": 1.0, "nan": None}
        (meta,) = store.runs()
        assert meta["optimizer"] == {"lr": 1e-3} and meta["meta"] == {"note": "x"} and meta["package_version"]
        assert store.load_state(run) == {"a": 1}
        mode = store._conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    # reopen: same run name -> same id, appends
    with RunStore(path) as store:
        run = store.open_run("run-a", {})
        assert run == store.run_id("run-a")
        assert store.write_snapshot(run, make_snapshot(20))
        assert store.steps(run) == [0, 10, 20]
        other = store.open_run("run-b", {})
        assert other != run and store.steps(other) == []
        frame = store.to_pandas("fits")
        assert len(frame) == 6 and {"k", "klass", "lr", "scale_growth"} <= set(frame.columns)
        with pytest.raises(ValueError):
            store.to_pandas("fits; DROP TABLE runs")


def test_names_with_quotes_are_stored_verbatim(tmp_path):
    name = "layers.0.\"q'); DROP TABLE fits; --.weight"
    with RunStore(tmp_path / "w.sqlite") as store:
        run = store.open_run('it\'s a "run"', {})
        store.write_snapshot(run, make_snapshot(0, name=name))
        assert {r["name"] for r in store.fits()} == {name, "tiny"}
        assert store.runs()[0]["name"] == 'it\'s a "run"'


def test_failed_write_leaves_no_partial_snapshot(tmp_path):
    snapshot = make_snapshot(5)
    snapshot.aggregates["weibull/bad"] = object()  # not storable: fails after the fits were inserted
    with RunStore(tmp_path / "w.sqlite") as store:
        run = store.open_run("r", {})
        with pytest.raises(sqlite3.Error):
            store.write_snapshot(run, snapshot)
        assert store.snapshots() == [] and store.fits() == [] and store.aggregates() == []
        assert store.write_snapshot(run, make_snapshot(5))  # the step is still free


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "w.sqlite"
    RunStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="upgrade"):
        RunStore(path)


def test_writer_survives_a_locked_store_and_recovers(tmp_path, caplog):
    path = tmp_path / "w.sqlite"
    store = RunStore(path, timeout=0.05)
    writer = StoreWriter(lambda: (store, store.open_run("r", {})))
    assert writer.write(make_snapshot(0))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the lock
    with caplog.at_level(logging.WARNING, logger="weibull_monitor.store"):
        assert not writer.write(make_snapshot(10))
        assert not writer.write(make_snapshot(20))
        assert len(writer.pending) == 2
        blocker.execute("ROLLBACK")
        blocker.close()
        assert writer.write(make_snapshot(30))
    failures = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failures) == 1 and "locked" in failures[0].getMessage()  # once, with its cause
    assert any("work again" in r.getMessage() for r in caplog.records)
    assert store.steps() == [0, 10, 20, 30] and not writer.pending
    store.close()


def test_writer_drops_a_snapshot_the_store_rejects_and_keeps_going(tmp_path, caplog):
    store = RunStore(tmp_path / "w.sqlite")
    writer = StoreWriter(lambda: (store, store.open_run("r", {})))
    poisoned = make_snapshot(10)
    poisoned.aggregates["weibull/bad"] = object()
    with caplog.at_level(logging.WARNING, logger="weibull_monitor.store"):
        assert writer.write(poisoned)
        assert writer.write(make_snapshot(20))
    assert store.steps() == [20] and writer.rejected == 1
    assert any("rejected the snapshot of step 10" in r.getMessage() for r in caplog.records)
    store.close()


def test_record_fields_are_columns_and_an_older_store_gains_new_ones(tmp_path):
    from weibull_monitor.estimator.record import FIELDS
    from weibull_monitor.snapshot.dynamics import STAT_FIELDS

    path = tmp_path / "old.sqlite"
    with RunStore(path) as store:
        columns = {row[1] for row in store._conn.execute("PRAGMA table_info(fits)")}
        assert set(FIELDS) <= columns and set(STAT_FIELDS) <= columns
    with sqlite3.connect(path) as conn:  # a store written before k_first existed
        conn.execute("ALTER TABLE fits DROP COLUMN k_first")
    with RunStore(path) as store:
        run = store.open_run("r", {})
        assert store.write_snapshot(run, make_snapshot(3))
        assert all("k_first" in row for row in store.fits(step=3))
