"""Branches in the run store on real SQLite files: forks move the abandoned rows to the superseded tables (one
transaction), readers return the live timeline by default and a branch's or every row on request, a replaced writer
keeps its own branch, and a version-1 store (a dump of a file written by the version-1 code) is migrated in place."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from weibull_monitor.alerts import Alert
from weibull_monitor.estimator import fit_weibull
from weibull_monitor.models import Role
from weibull_monitor.snapshot import Snapshot
from weibull_monitor.store import SCHEMA_VERSION, RunStore, StoreWriter, WriteResult
from weibull_monitor.store.readers import StoreReaders

V1_DUMP = Path(__file__).parent / "data" / "store_v1.sql"
ME = {"writer": "w-a", "pid": 111, "host": "host-a"}
OTHER = {"writer": "w-b", "pid": 222, "host": "host-b"}


def snap(step: int, value: float) -> Snapshot:
    """A small snapshot whose numbers say which timeline wrote it (``value``)."""
    generator = torch.Generator().manual_seed(step)
    fit = fit_weibull(torch.randn(32, 32, generator=generator))
    return Snapshot(
        step=step,
        fits={"w.q": fit},
        roles={"w.q": Role(0, "q", "selection")},
        aggregates={"weibull/selection/k_median": value, "weibull/T_over_tau": 0.01 * step},
        alerts=[Alert(step, "rule", "warning", "all", ("w.q",), {"v": value}, f"at {step}")],
        T_over_tau=0.01 * step,
    )


def k_of(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["value"] for r in rows if r["metric"] == "weibull/selection/k_median"}


def test_fork_moves_the_abandoned_rows_and_readers_follow_the_live_timeline(tmp_path):
    with RunStore(tmp_path / "w.sqlite") as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        run = store.open_run("r")
        claimed = store.fork(run, -1, writer=ME, reason="start", state={"at": -1})
        assert claimed["claimed"] and claimed["branch"] == 0  # a new run is claimed, not forked
        for step in range(0, 31, 5):
            assert store.write_snapshot(run, snap(step, 1.0 + step), {"at": step}, branch=0) == WriteResult.LIVE
        result = store.fork(run, 20, writer=OTHER, reason="resume", state={"at": 20}, dashboards=[{"kind": "x"}])
        assert result["branch"] == 1 and result["parent"] == 0 and not result["claimed"]
        (gone,) = result["superseded"]
        assert (gone["branch"], gone["first_step"], gone["last_step"], gone["n_snapshots"]) == (0, 25, 30, 2)
        assert gone["pid"] == 111 and gone["host"] == "host-a"
        assert store.load_state(run) == {"at": 20}  # the state at the rewind step
        for step in (25, 30, 35, 40):
            assert store.write_snapshot(run, snap(step, 2.0 + step), {"at": step}, branch=1) == WriteResult.LIVE

        # live timeline: the old one up to 20, the resumed one after: one row per step, no mixing
        assert store.steps(run) == [0, 5, 10, 15, 20, 25, 30, 35, 40]
        assert k_of(store.aggregates(run)) == {
            **{s: 1.0 + s for s in (0, 5, 10, 15, 20)},
            **{s: 2.0 + s for s in (25, 30, 35, 40)},
        }
        assert [r["branch"] for r in store.snapshots(run)] == [0] * 5 + [1] * 4
        assert [a["step"] for a in store.alerts(run)] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
        assert len(store.fits(run_id=run)) == 9
        # the abandoned timeline, as its writer made it
        assert store.steps(run, branch=0) == [0, 5, 10, 15, 20, 25, 30]
        assert k_of(store.aggregates(run, branch=0)) == {s: 1.0 + s for s in range(0, 31, 5)}
        marked = [r for r in store.snapshots(run, branch=0) if r["superseded_by"] is not None]
        assert [(r["step"], r["superseded_by"], r["rewind_step"]) for r in marked] == [(25, 1, 20), (30, 1, 20)]
        assert all(r["superseded_at"] >= r["wall_time"] for r in marked)
        assert store.steps(run, branch=1) == [0, 5, 10, 15, 20, 25, 30, 35, 40]
        everything = store.aggregates(run, branch="all")
        assert len(everything) == 2 * 11 and sum(r["superseded_by"] is not None for r in everything) == 4
        assert [a["step"] for a in store.alerts(run, branch=0)] == [0, 5, 10, 15, 20, 25, 30]
        alert_ids = [a["alert_id"] for a in store.alerts(run, branch="all")]
        assert len(alert_ids) == len(set(alert_ids)) == 11
        # who wrote what, and the rewind
        branches = {b["branch"]: b for b in store.branches(run)}
        assert branches[1]["live"] and not branches[0]["live"]
        assert (branches[0]["n_live"], branches[0]["n_superseded_rows"]) == (5, 2)
        assert (branches[1]["fork_step"], branches[1]["pid"], branches[1]["dashboards"]) == (20, 222, [{"kind": "x"}])
        (rewind,) = store.rewinds(run)
        assert (rewind["step"], rewind["branch"], rewind["superseded_first"], rewind["superseded_last"]) == (
            20,
            1,
            25,
            30,
        )
        # the state the store restores at a step: the one written with the last live snapshot at or before it
        assert store.state_at(run, 33) == {"step": 30, "branch": 1, "state": {"at": 30}}
        assert store.state_at(run, 24) == {"step": 20, "branch": 0, "state": {"at": 20}}
        assert store.state_at(run, -1) is None
        # pandas frames follow the readers
        assert store.to_pandas("aggregates", run_id=run)["step"].nunique() == 9
        assert len(store.to_pandas("snapshots", run_id=run, branch="all")) == 11
        assert set(store.to_pandas("branches")["branch"]) == {0, 1}
        with pytest.raises(ValueError, match="needs run_id"):
            store.snapshots(branch=1)


def test_a_replaced_writer_keeps_its_own_branch_outside_the_live_timeline(tmp_path):
    path = tmp_path / "w.sqlite"
    with RunStore(path) as first, RunStore(path) as second:
        run = first.open_run("shared")
        a = first.fork(run, -1, writer=ME, reason="start")["branch"]
        for step in (0, 1, 2):
            assert first.write_snapshot(run, snap(step, 1.0), branch=a) == WriteResult.LIVE
        b = second.fork(second.run_id("shared"), 1, writer=OTHER, reason="resume")["branch"]
        assert second.write_snapshot(run, snap(2, 2.0), branch=b) == WriteResult.LIVE
        # the first writer goes on: its rows are kept, superseded, never in the live series
        assert first.write_snapshot(run, snap(3, 1.0), branch=a) == WriteResult.SUPERSEDED
        assert first.write_snapshot(run, snap(3, 1.0), branch=a) == WriteResult.DUPLICATE
        assert second.write_snapshot(run, snap(3, 2.0), branch=b) == WriteResult.LIVE
        assert k_of(first.aggregates(run)) == {0: 1.0, 1: 1.0, 2: 2.0, 3: 2.0}
        assert k_of(first.aggregates(run, branch=a)) == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
        late = next(r for r in first.snapshots(run, branch=a) if r["step"] == 3)
        assert late["superseded_by"] == b and late["rewind_step"] == 1


def test_concurrent_forks_and_writes_lose_nothing(tmp_path):
    """Two connections race (threads, separate connections, as two processes would): each fork is atomic, every
    write lands exactly once, in the live timeline or in its writer's superseded branch."""
    path = tmp_path / "w.sqlite"
    with RunStore(path) as setup:
        run = setup.open_run("race")
    errors = []

    def writer(identity, value):
        try:
            with RunStore(path, timeout=30) as store:
                branch = store.fork(run, -1, writer=identity, reason="start")["branch"]
                for step in range(40):
                    assert store.write_snapshot(run, snap(step, value), branch=branch)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(identity, v)) for identity, v in ((ME, 1.0), (OTHER, 2.0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with RunStore(path) as store:
        live = store.snapshots(run)
        assert [r["step"] for r in live] == list(range(40))  # one timeline, every step once
        live_branch = store.live_branch(run)
        owners = {r["branch"] for r in store.snapshots(run)}
        everything = store.snapshots(run, branch="all")
        assert len(everything) == 80  # nothing lost: both writers' 40 snapshots are somewhere
        for branch in {r["branch"] for r in everything}:
            assert [r["step"] for r in store.snapshots(run, branch=branch) if r["branch"] == branch]
        # the live timeline after the last fork is the last forker's alone
        last_fork = max(store.branches(run), key=lambda b: b["branch"])
        assert last_fork["branch"] == live_branch
        assert owners <= {b["branch"] for b in store.branches(run)}


def test_a_failed_fork_changes_nothing(tmp_path):
    path = tmp_path / "w.sqlite"
    with RunStore(path) as store:
        run = store.open_run("r")
        store.fork(run, -1, writer=ME)
        for step in (0, 1, 2, 3):
            store.write_snapshot(run, snap(step, 1.0), {"at": step}, branch=0)
        before = {t: store._conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("snapshots", "fits")}
        store._conn.execute("DROP TABLE alerts_superseded")  # the last table a fork moves rows into
        with pytest.raises(sqlite3.OperationalError):
            store.fork(run, 1, writer=OTHER)
        assert store.steps(run) == [0, 1, 2, 3] and store.live_branch(run) == 0
        assert {t: store._conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in before} == before
        assert store._conn.execute("SELECT COUNT(*) FROM snapshots_superseded").fetchone()[0] == 0
        assert len(store.branches(run)) == 1 and store.load_state(run) == {"at": 3}


def _v1_store(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V1_DUMP.read_text())
    conn.close()


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    _v1_store(path)
    raw = sqlite3.connect(path)
    v1_rows = {t: raw.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("snapshots", "aggregates")}
    v1_state = json.loads(raw.execute("SELECT state FROM state WHERE run_id = 2").fetchone()[0])
    raw.close()
    with RunStore(path) as store:  # opening for writing migrates
        assert store.schema_version == 2
        old = store.run_id("old-run")
        assert store.steps(old) == [0, 2, 4, 6] and store.steps(store.run_id("other-run")) == [0]
        assert [r["branch"] for r in store.snapshots(old)] == [0, 0, 0, 0]
        assert [b["branch"] for b in store.branches(old)] == [0]
        assert store.load_state(old) == v1_state
        assert store.state_at(old, 100) == {"step": 6, "branch": 0, "state": v1_state}  # the saved state kept
        assert len(store.alerts(old)) == 4 and len(store.fits(run_id=old)) == 4 * 9
        migrated = {
            t: [tuple(r)[: len(v1_rows[t][0])] for r in store._conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2")]
            for t in v1_rows
        }
        assert migrated == v1_rows  # nothing rewritten
        # the migrated run resumes and rewinds like any other
        result = store.fork(old, 2, writer=ME, reason="resume")
        assert result["branch"] == 1 and [s["n_snapshots"] for s in result["superseded"]] == [2]
        assert store.steps(old) == [0, 2] and store.steps(old, branch=0) == [0, 2, 4, 6]
    with RunStore(path) as again:  # reopening a version-2 file changes nothing
        assert again.schema_version == 2 and again.steps(again.run_id("old-run")) == [0, 2]


def test_an_unmigrated_version_1_store_reads_as_one_live_branch(tmp_path):
    """A reader that opens a version-1 file without migrating it (read-only) sees it all as branch 0, live."""
    path = tmp_path / "old.sqlite"
    _v1_store(path)
    reader = StoreReaders()
    reader._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    reader._conn.row_factory = sqlite3.Row
    reader._lock = threading.RLock()
    old = reader.run_id("old-run")
    assert reader.steps(old) == [0, 2, 4, 6]
    assert reader.steps(old, branch=0) == [0, 2, 4, 6] and reader.steps(old, branch=1) == []
    assert all(r["superseded_by"] is None for r in reader.snapshots(old, branch="all"))
    assert reader.branches(old) == [{"run_id": old, "branch": 0, "parent": None, "fork_step": None, "live": True}]
    assert reader.rewinds() == [] and reader.state_at(old, 6) is None and reader.live_branch(old) == 0
    assert len(reader.to_pandas("fits", run_id=old)) == 36
    reader._conn.close()


def test_writer_forks_in_order_and_reports_a_takeover(tmp_path):
    path = tmp_path / "w.sqlite"
    store_a, store_b = RunStore(path, timeout=0.05), RunStore(path)
    forks, takeovers = [], []
    writer = StoreWriter(
        lambda: (store_a, store_a.open_run("r")),
        identity=ME,
        on_fork=forks.append,
        on_superseded=lambda store, run, step: takeovers.append(step),
        dashboards=lambda: [{"kind": "tensorboard", "id": "/tb"}],
    )
    assert writer.write(snap(0, 1.0)) and writer.branch == 0 and forks[0]["claimed"]
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    assert not writer.write(snap(1, 1.0))
    assert writer.fork(0, reason="resume", state={"at": 0}) is None  # busy: waits, in order after step 1
    assert not writer.write(snap(1, 3.0))
    blocker.execute("ROLLBACK")
    blocker.close()
    assert writer.retry() and writer.branch == 1
    run = store_a.run_id("r")
    assert k_of(store_a.aggregates(run)) == {0: 1.0, 1: 3.0}  # step 1 written, then superseded by the fork
    assert k_of(store_a.aggregates(run, branch=0)) == {0: 1.0, 1: 1.0}
    assert store_a.branches(run)[1]["dashboards"] == [{"kind": "tensorboard", "id": "/tb"}]
    store_b.fork(run, 0, writer=OTHER)  # another process takes the run over
    assert writer.write(snap(2, 3.0))
    assert takeovers == [2] and writer.superseded == 1
    store_a.close()
    store_b.close()
