"""Issue 19, training side: sinks that mutate what they receive or call sys.exit(), steps no store can hold, steps
that are no steps, and alert floods. Each with a real tiny LLaMA, a real store and guarded sinks."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sqlite3

import numpy as np
import pytest
import torch

from weibull_monitor.alerts import Breach, Rule
from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.sinks import Sink
from weibull_monitor.sinks.frozen import ReadOnlyDict, SnapshotView, frozen_snapshot
from weibull_monitor.sinks.guard import GuardedSink
from weibull_monitor.store import RunStore, StoreWriter


class Vandal(Sink):
    """A sink that tries to change everything it is handed, and records which attempts were refused."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def log_metrics(self, metrics, step) -> None:
        metrics.clear()  # its own copy: allowed

    def log_alert(self, alert) -> None:
        self._try("alert.values", lambda: alert.values.clear())

    def log_snapshot(self, snapshot) -> None:
        self._try("step", lambda: setattr(snapshot, "step", 1001))
        self._try("fits", lambda: [snapshot.fits.pop(k) for k in list(snapshot.fits)[::2]])
        self._try("aggregates", lambda: snapshot.aggregates.update({"weibull/fake": 1.0}))
        self._try("skipped", lambda: snapshot.skipped.setdefault("x", "y"))
        self._try("alerts", lambda: snapshot.alerts.append(None))
        self._try("delete", lambda: delattr(snapshot, "fits"))

    def _try(self, what, action) -> None:
        try:
            action()
        except (TypeError, AttributeError):
            self.refused.append(what)


class Fires(Rule):
    """A rule that fires ``count`` breaches at every snapshot."""

    def __init__(self, count: int = 1, message: str = "fired", **kw) -> None:
        super().__init__(**kw)
        self.count, self.message = count, message

    def evaluate(self, snapshot) -> list[Breach]:
        return [
            Breach(f"k{i}", (f"m{i}",), {"v": float(i + 1)}, f"{self.message} {i}") for i in range(self.count)
        ]


class Keeper(Sink):
    def __init__(self) -> None:
        self.snapshots = []

    def log_snapshot(self, snapshot) -> None:
        self.snapshots.append((snapshot.step, len(snapshot.fits), dict(snapshot.aggregates)))


def test_a_sink_that_mutates_its_snapshot_changes_nothing_elsewhere(tmp_path):
    """The store write is deferred (the store is locked at the first snapshot) while a vandal sink tries to edit
    the snapshot: the deferred write still stores the true step with every fit, and the other sink sees it whole."""
    path = tmp_path / "w.sqlite"
    model = tiny_llama(0)
    vandal, keeper = Vandal(), Keeper()
    always = Fires(name="always", level="info")
    monitor = WeibullMonitor(
        model,
        store=RunStore(path, timeout=0.05),
        every=1,
        run_name="r",
        sinks=[vandal, keeper],
        rules=[always],
    )
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    snapshot = monitor.observe(0)
    assert monitor.flush(5.0) is False  # the store still owes step 0
    blocker.execute("ROLLBACK")
    blocker.close()
    monitor.observe(1)
    monitor.close()
    assert set(vandal.refused) == {
        "aggregates",
        "alerts",
        "alert.values",
        "delete",
        "fits",
        "skipped",
        "step",
    }
    with RunStore(path, read_only=True) as store:
        assert store.steps() == [0, 1]
        assert len(store.fits(step=0)) == len(snapshot.fits) == 16
        assert "weibull/fake" not in {a["metric"] for a in store.aggregates(step=0)}
        assert [a["values"] for a in store.alerts()] == [{"v": 1.0}, {"v": 1.0}]
    assert [(s, n) for s, n, _ in keeper.snapshots] == [(0, 16), (1, 16)]
    assert snapshot.step == 0 and len(snapshot.fits) == 16  # the monitor's own snapshot is untouched


def test_the_read_only_view_copies_into_an_editable_snapshot():
    model = tiny_llama(0)
    snapshot = WeibullMonitor(model, store=None, every=1, rules=[]).observe(0)
    view = frozen_snapshot(snapshot)
    assert (
        isinstance(view, SnapshotView) and isinstance(view.fits, ReadOnlyDict) and view.fits == snapshot.fits
    )
    editable = copy.deepcopy(view)
    editable.step = 5
    editable.fits.clear()
    assert type(editable.fits) is dict and view.fits == snapshot.fits
    assert dataclasses.asdict(view)["step"] == 0


def test_a_sink_calling_sys_exit_is_a_failing_sink_not_a_dead_worker(caplog):
    class Quitter(Sink):
        def __init__(self) -> None:
            self.seen = []

        def log_metrics(self, metrics, step) -> None:
            self.seen.append(step)
            if step == 1:
                raise SystemExit(3)

    sink = Quitter()
    guard = GuardedSink(sink, timeout=5.0)
    with caplog.at_level(logging.WARNING, logger="weibull_monitor.sinks"):
        for step in range(4):
            guard.log_metrics({}, step)
        assert guard.flush(5.0)
    assert sink.seen == [0, 1, 2, 3]  # every later call still delivered
    assert guard.failures == 1 and guard.calls == 3
    assert any("SystemExit" in r.getMessage() for r in caplog.records)
    guard.close()


def test_a_step_beyond_sqlite_integer_blocks_nothing(tmp_path, caplog):
    path = tmp_path / "w.sqlite"
    model = tiny_llama(0)
    monitor = WeibullMonitor(model, store=path, every=1, run_name="r", rules=[])
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        assert monitor.observe(10**19) is None  # refused: no store could hold it
        assert monitor.observe(1) is not None
        assert monitor.observe(2) is not None
    monitor.close()
    with RunStore(path, read_only=True) as store:
        assert store.steps() == [1, 2]
    assert sum("ignored step" in r.getMessage() for r in caplog.records) == 1


def test_the_store_writer_drops_an_unstorable_step_and_writes_the_next(tmp_path, caplog):
    from weibull_monitor.snapshot import Snapshot

    store = RunStore(tmp_path / "w.sqlite")
    run = store.open_run("r")
    writer = StoreWriter(lambda: (store, run))
    with caplog.at_level(logging.WARNING, logger="weibull_monitor.store"):
        assert writer.write(Snapshot(step=10**19, fits={}, roles={}, aggregates={}))  # dropped, not kept
        assert writer.write(Snapshot(step=5, fits={}, roles={}, aggregates={}))
    assert store.steps(run) == [5] and writer.rejected == 1 and not writer.pending
    store.close()


BAD_STEPS = [None, math.nan, math.inf, -math.inf, "ten", b"10", 10.9, True, False, -1, 2**63, [3], object()]


@pytest.mark.parametrize("step", BAD_STEPS, ids=[repr(s)[:12] for s in BAD_STEPS])
def test_observe_never_raises_for_a_step_that_is_no_step(step, caplog):
    model = tiny_llama(0)
    monitor = WeibullMonitor(model, store=None, every=1, rules=[])
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        assert monitor.observe(step) is None
        assert monitor.observe(step) is None
    assert sum("observe() ignored step" in r.getMessage() for r in caplog.records) == 1  # once per kind
    assert monitor.observe(4).step == 4  # and the monitor works on


@pytest.mark.parametrize("step", [10.0, np.int64(10), torch.tensor(10), np.float32(10.0)])
def test_whole_numbers_of_other_types_are_steps(step):
    snapshot = WeibullMonitor(tiny_llama(0), store=None, every=5, rules=[]).observe(step)
    assert snapshot is not None and snapshot.step == 10 and type(snapshot.step) is int


def test_an_alert_flood_is_summarised_in_the_log_not_lost(tmp_path, caplog):
    rules = [
        Fires(120, "matrix", name="flood", level="warning"),
        Fires(1, "critical one", name="bad", level="critical"),
    ]
    model = tiny_llama(0)
    monitor = WeibullMonitor(model, store=tmp_path / "w.sqlite", every=1, run_name="r", rules=rules)
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        snapshot = monitor.observe(0)
    monitor.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "weibull_monitor"]
    assert len(snapshot.alerts) == 121
    assert len(lines) == 11 and any("critical one" in line for line in lines)
    assert "111 more alerts at step 0" in lines[-1] and "flood (warning): 111" in lines[-1]
    with RunStore(tmp_path / "w.sqlite", read_only=True) as store:
        assert len(store.alerts()) == 121
