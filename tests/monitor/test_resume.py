"""Resume and rewind with the plain-loop API on a real tiny LLaMA: train, checkpoint, continue past it, roll back,
continue with another learning rate. The store's live series equals the resumed run's own snapshots step for step,
the superseded branch equals the abandoned run's, and the state at the rewind step (alert counters, λ_first, T/τ)
equals that of an uninterrupted run stopped there."""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from readback import stored_series

from weibull_monitor.alerts import AlertEngine, Breach, NonFiniteWeights, Rule
from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.sinks import Sink
from weibull_monitor.store import RunStore

# These tests train (optimizer steps): .ci/run runs them again under another ATEN_CPU_CAPABILITY.
pytestmark = pytest.mark.trains

LR, NEW_LR, WD, EVERY = 1e-3, 3e-4, 0.1, 5


def tiny(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed, num_hidden_layers=1, hidden_size=32, intermediate_size=64)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1000 + step))


class Recorder(Sink):
    """What the monitor sent, in order: one entry per snapshot (step, aggregates, k per matrix), and alerts."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[int, dict, dict]] = []
        self.alerts: list[tuple[int, str, str]] = []
        self.rewinds: list[int] = []

    def log_snapshot(self, snapshot) -> None:
        ks = {name: fit.k for name, fit in snapshot.fits.items()}
        self.snapshots.append((snapshot.step, dict(snapshot.aggregates), ks))

    def log_alert(self, alert) -> None:
        self.alerts.append((alert.step, alert.rule, alert.level))

    def rewind(self, step, superseded=()) -> None:
        self.rewinds.append(step)

    def by_step(self, after: int | None = None, through: int | None = None) -> dict[int, tuple[dict, dict]]:
        return {
            s: (agg, ks)
            for s, agg, ks in self.snapshots
            if (after is None or s > after) and (through is None or s <= through)
        }


def make(model, store, **kw):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    kw.setdefault("rules", [])
    return optimizer, WeibullMonitor(model, optimizer, every=EVERY, store=store, **kw)


def train(model, optimizer, monitor, steps, lr=None, checkpoints=None, at=()):
    for step in steps:
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        monitor.observe(step)
        if step in at and checkpoints is not None:
            checkpoints[step] = {
                "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict()),
                "monitor": json.loads(json.dumps(monitor.state_dict())),
            }


def reference_state(steps: int = 20) -> dict:
    """The monitor state of an uninterrupted run stopped at ``steps``."""
    model = tiny()
    optimizer, monitor = make(model, None)
    monitor.observe(0)
    train(model, optimizer, monitor, range(1, steps + 1))
    state = monitor.state_dict()
    monitor.close()
    return state


def same_state(a: dict, b: dict) -> None:
    """Alert counters, λ_first and T/τ sums identical (the run name and step bookkeeping aside)."""
    assert a["alerts"] == b["alerts"]
    assert a["scale_first"] == b["scale_first"]
    assert a["budget"] == b["budget"]


def run_a(store, checkpoints, **kw):
    """The first timeline: steps 0-30, checkpoints at 20."""
    model = tiny()
    sink = Recorder()
    optimizer, monitor = make(model, store, sinks=[sink], **kw)
    monitor.observe(0)
    train(model, optimizer, monitor, range(1, 31), checkpoints=checkpoints, at=(20,))
    monitor.close()
    return sink, monitor


def check_timelines(path, run_name, a: Recorder, b: Recorder, rewind: int = 20) -> None:
    """Live series = a up to the rewind + b after it; the superseded branch = a, step for step."""
    with RunStore(path) as store:
        run = store.run_id(run_name)
        live = stored_series(store, run)
        expected = {**a.by_step(through=rewind), **b.by_step(after=rewind)}
        assert sorted(live) == sorted(expected)  # no step missing, none twice
        assert live == expected  # 0 mixed: every value from the timeline that owns that step
        (rewound,) = store.rewinds(run)
        assert rewound["step"] == rewind
        abandoned = stored_series(store, run, branch=0)
        assert abandoned == a.by_step()
        resumed = stored_series(store, run, branch=rewound["branch"])
        assert resumed == expected


def test_resume_from_checkpoint_state_in_a_new_process(tmp_path, caplog):
    path = tmp_path / "w.sqlite"
    checkpoints: dict = {}
    a, first = run_a(path, checkpoints)
    ckpt = checkpoints[20]
    # "a new process": new model, optimizer and monitor; weights and monitor state from the checkpoint
    model = tiny(5)
    b = Recorder()
    optimizer, monitor = make(model, path, sinks=[b])
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        monitor.load_state_dict(ckpt["monitor"])
    assert monitor.run_name == first.run_name
    same_state(monitor.state_dict(), reference_state(20))  # the state at the rewind step, exactly
    assert any(
        "rewound at step 20" in r.getMessage() and "steps 25-30" in r.getMessage() for r in caplog.records
    )
    train(model, optimizer, monitor, range(21, 41), lr=NEW_LR)
    monitor.close()
    check_timelines(path, first.run_name, a, b)
    t20 = a.by_step()[20][0]["weibull/T_over_tau"]
    assert b.by_step()[25][0]["weibull/T_over_tau"] == pytest.approx(t20 + 5 * NEW_LR * WD, rel=1e-12)
    with RunStore(path) as store:
        run = store.run_id(first.run_name)
        assert json.loads(json.dumps(store.state_at(run, 20)["state"]))["budget"] == ckpt["monitor"]["budget"]


def test_rollback_in_one_process_without_state_is_detected(tmp_path, caplog):
    """The loop restores a checkpoint's weights but not the monitor's: observe(21) after 30 is a rollback."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from weibull_monitor.sinks import TensorBoardSink

    path, tb = tmp_path / "w.sqlite", tmp_path / "tb"
    model = tiny()
    sink = Recorder()
    optimizer, monitor = make(model, path, sinks=[sink, TensorBoardSink(log_dir=str(tb))], run_name="loop")
    checkpoints: dict = {}
    monitor.observe(0)
    train(model, optimizer, monitor, range(1, 31), checkpoints=checkpoints, at=(20,))
    monitor.flush()  # the sink runs in its own thread: let it take every snapshot so far before copying them
    a = Recorder()
    a.snapshots = list(sink.snapshots)
    model.load_state_dict(checkpoints[20]["model"])
    optimizer.load_state_dict(checkpoints[20]["optimizer"])
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        train(model, optimizer, monitor, [21], lr=NEW_LR)
        assert any("step went back from 30 to 21" in r.getMessage() for r in caplog.records)
        state = monitor.state_dict()
        reference = reference_state(20)
        assert state["alerts"] == reference["alerts"] and state["scale_first"] == reference["scale_first"]
        # T/τ: the state of step 20 (kept with its snapshot) plus the one update since, at the new rate
        assert state["budget"]["sums"][0] == pytest.approx(
            reference["budget"]["sums"][0] + NEW_LR * WD, rel=1e-12
        )
        train(model, optimizer, monitor, range(22, 41), lr=NEW_LR)
    monitor.close()
    assert sink.rewinds == [20]
    b = Recorder()
    b.snapshots = sink.snapshots[len(a.snapshots) :]
    check_timelines(path, "loop", a, b)
    # TensorBoard: the points after 20 of the abandoned timeline are hidden; each step once, the live values
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    points = events.Scalars("weibull/transmission/k_median")
    expected = {**a.by_step(through=20), **b.by_step(after=20)}
    assert [p.step for p in points] == sorted(expected)
    for point in points:
        assert point.value == pytest.approx(
            expected[point.step][0]["weibull/transmission/k_median"], rel=1e-6
        )


def test_store_based_rollback_in_a_new_process_restores_the_stored_state(tmp_path):
    """A new process reuses the run name (the store restores the state at 30), loads the weights of step 20 but no
    monitor state, and observes 21: the state saved with the snapshot at 20 comes back from the store."""
    path = tmp_path / "w.sqlite"
    checkpoints: dict = {}
    a, _ = run_a(path, checkpoints, run_name="named")
    model = tiny(3)
    b = Recorder()
    optimizer, monitor = make(model, path, sinks=[b], run_name="named")
    assert monitor.state_dict()["last_snapshot_step"] == 30  # restored from the store
    model.load_state_dict(checkpoints[20]["model"])
    optimizer.load_state_dict(checkpoints[20]["optimizer"])
    train(model, optimizer, monitor, [21], lr=NEW_LR)
    reference = reference_state(20)
    state = monitor.state_dict()
    assert state["alerts"] == reference["alerts"] and state["scale_first"] == reference["scale_first"]
    assert state["budget"]["sums"][0] == pytest.approx(
        reference["budget"]["sums"][0] + NEW_LR * WD, rel=1e-12
    )
    train(model, optimizer, monitor, range(22, 41), lr=NEW_LR)
    monitor.close()
    check_timelines(path, "named", a, b)


@pytest.mark.parametrize("store", ["sqlite", None])
def test_a_critical_alert_fires_again_after_a_rollback(tmp_path, store):
    """NaN weights at step 100 fire non_finite_weights and request a stop; rolled back to step 40 with the NaN
    still there, observe(40), (50), (60) fire it again and the stop is requested again."""
    model = tiny()
    path = tmp_path / "w.sqlite" if store else None
    monitor = WeibullMonitor(model, every=10, store=path, rules=[NonFiniteWeights()], stop_on_critical=True)
    for step in range(0, 91, 10):
        assert not monitor.observe(step).alerts
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    assert [a.rule for a in monitor.observe(100).alerts] == ["non_finite_weights"]
    assert monitor.stop_requested
    fired = []
    for step in (40, 50, 60):  # the rollback: a checkpoint of step 39 or so, with the same NaN
        snapshot = monitor.observe(step)
        fired.append([(a.rule, a.level) for a in snapshot.alerts])
        assert monitor.stop_requested
    assert fired == [[("non_finite_weights", "critical")]] * 3
    monitor.close()
    if store:
        with RunStore(path) as s:
            run = s.run_id(monitor.run_name)
            assert [a["step"] for a in s.alerts(run)] == [40, 50, 60]
            assert [a["step"] for a in s.alerts(run, branch=0)] == [100]


def test_alert_engine_cooldown_and_once_after_a_rolled_back_firing():
    class Always(Rule):
        name, level = "always", "critical"

        def evaluate(self, snapshot):
            return [Breach("all", (), {}, "x")]

    class Step:
        def __init__(self, step):
            self.step = step

    for rule in (Always(), Always(cooldown=50), Always(once=True)):
        engine = AlertEngine([rule])
        assert len(engine(Step(100))) == 1
        assert len(engine(Step(40))) == 1  # 40 - 100 < cooldown used to suppress it, even with cooldown 0
    engine = AlertEngine([Always(cooldown=50)])
    engine(Step(100))
    engine.rewind(40)
    assert engine.state_dict()["keys"]["always\x1fall"] == {"streak": 0, "last_fired": None, "fired": False}


def test_reusing_a_run_name_for_a_fresh_run_restarts_it_with_a_warning(tmp_path, caplog):
    path = tmp_path / "w.sqlite"
    old, _ = run_a(path, {}, run_name="reused")
    model = tiny(1)  # another seed: other weights
    sink = Recorder()
    optimizer, monitor = make(model, path, sinks=[sink], run_name="reused")
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        monitor.observe(0)
    assert any(
        "restarted at step -1" in r.getMessage() and "steps 0-30" in r.getMessage() for r in caplog.records
    )
    train(model, optimizer, monitor, range(1, 16))
    monitor.close()
    with RunStore(path) as store:
        run = store.run_id("reused")
        assert stored_series(store, run) == sink.by_step()  # steps 0-15 of the new run, none dropped
        assert stored_series(store, run, branch=0) == old.by_step()  # the old run, whole, on request
        (restart,) = store.rewinds(run)
        assert restart["step"] == -1 and restart["n_superseded"] == 7
        fits = {(r["step"], r["name"]): r for r in store.fits(run_id=run)}
        for (step, name), row in fits.items():  # scale growth against the new run's own first λ
            if step == 15 and row["ok"]:
                assert row["scale_growth"] == pytest.approx(row["scale"] / fits[(0, name)]["scale"], rel=1e-9)
        snapshot = {r["step"]: r for r in store.snapshots(run)}
        assert snapshot[15]["T_over_tau"] == pytest.approx(15 * LR * WD, rel=1e-12)  # not the old run's sum


TWO_WRITERS = """
import os, sys, time, torch
torch.set_num_threads(1)
from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.monitor import WeibullMonitor
path, seed, steps, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = tiny_llama(seed, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
with WeibullMonitor(model, optimizer, every=1, store=path, run_name="shared", rules=[]) as monitor:
    for step in range(steps + 1):
        if step:
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        monitor.observe(step)
        print("step", step, flush=True)
        if os.path.exists(stop):
            break
        time.sleep(0.02)
"""


def test_two_processes_writing_one_run_name_keep_everything(tmp_path):
    """Two processes write run "shared" at once: the later one owns the live timeline (a restart, with a
    warning), the earlier one is told it was taken over and keeps its snapshots in its own branch. Nothing lost."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(TWO_WRITERS))
    path, stop = tmp_path / "w.sqlite", tmp_path / "stop"
    steps = 60
    first = subprocess.Popen(  # runs until told to stop, so it is still writing when the second one starts
        [sys.executable, str(script), str(path), "0", "100000", str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while first.poll() is None:  # the second starts once the first has written a few snapshots
        time.sleep(0.1)
        if path.exists():
            with RunStore(path) as store:
                if len(store.snapshots()) >= 5:
                    break
    second = subprocess.run(
        [sys.executable, str(script), str(path), "1", str(steps), str(tmp_path / "never")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    stop.touch()
    out, err = first.communicate(timeout=300)
    first_steps = int(out.split()[-1])
    assert first.returncode == 0 and second.returncode == 0, err[-2000:] + second.stderr[-2000:]
    assert "restarted at step -1" in second.stderr
    assert "was taken over by another writer" in err
    with RunStore(path) as store:
        run = store.run_id("shared")
        branches = {b["pid"]: b for b in store.branches(run)}
        assert len(branches) == 2
        live = store.snapshots(run)
        assert [r["step"] for r in live] == list(range(steps + 1))  # the second process's run, whole
        assert {r["branch"] for r in live} == {store.live_branch(run)}
        taken = {pid: steps for pid in branches}
        taken[first.pid] = first_steps
        for pid, branch in branches.items():  # each process: every one of its snapshots, in its own branch
            own = [
                r for r in store.snapshots(run, branch=branch["branch"]) if r["branch"] == branch["branch"]
            ]
            assert [r["step"] for r in own] == list(range(taken[pid] + 1))
        assert first_steps > steps  # the first one outlived the second and kept writing: superseded rows


def test_a_checkpoint_older_than_the_first_snapshot(tmp_path, caplog):
    path = tmp_path / "w.sqlite"
    model = tiny()
    optimizer, monitor = make(model, path, run_name="late")
    train(model, optimizer, monitor, range(1, 31))  # no observe(0): the first snapshot is step 5
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        monitor.resume(3)  # weights of step 3, no monitor state of step 3
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "older than the run's first snapshot (step 5)" in messages and "steps 5-30" in messages
    assert monitor.state_dict()["scale_first"] == {} and monitor.budget.state_dict()["sums"] == []
    train(model, optimizer, monitor, range(4, 11))
    monitor.close()
    with RunStore(path) as store:
        run = store.run_id("late")
        assert store.steps(run) == [5, 10] and store.steps(run, branch=0) == list(range(5, 31, 5))
        assert store.snapshots(run)[0]["T_over_tau"] == pytest.approx(
            2 * LR * WD, rel=1e-12
        )  # counted from 3


def test_store_false_means_no_store(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with (
        caplog.at_level(logging.WARNING, logger="weibull_monitor"),
        WeibullMonitor(tiny(), every=1, store=False, rules=[]) as monitor,
    ):
        assert monitor.observe(0) is not None and monitor.observe(1) is not None
        assert monitor.store is None
    assert not caplog.records and not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match="store must be"):
        WeibullMonitor(tiny(), store=3.5)


def test_crash_resume_with_unchanged_arguments_gives_identical_values(tmp_path):
    """The common case stays exact: a resume with the same data and settings rewrites the same values."""
    path = tmp_path / "w.sqlite"
    checkpoints: dict = {}
    a, first = run_a(path, checkpoints)
    model = tiny()
    b = Recorder()
    optimizer, monitor = make(model, path, sinks=[b])
    model.load_state_dict(checkpoints[20]["model"])
    optimizer.load_state_dict(checkpoints[20]["optimizer"])
    monitor.load_state_dict(checkpoints[20]["monitor"])
    train(model, optimizer, monitor, range(21, 31))
    monitor.close()
    assert b.by_step() == a.by_step(after=20)
    with RunStore(path) as store:
        run = store.run_id(first.run_name)
        assert stored_series(store, run) == stored_series(store, run, branch=0) == a.by_step()
        assert not any(math.isnan(r["T_over_tau"] or 0.0) for r in store.snapshots(run))
