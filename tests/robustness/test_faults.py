"""Faults that must not stop training: a W&B run that raises, a TensorBoard directory that cannot be
written, the SQLite store locked by another process, a full disk (real ENOSPC on a 1 MiB tmpfs), a sink that hangs.

Each test trains a real tiny LLaMA with a real monitor, injects one fault for a stretch of steps, clears it, and
checks: every training step ran; the fault was reported once, with its cause; the other sinks and the store got
every snapshot; and the faulty part works again once the fault is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from weibull_monitor.alerts import Breach, Rule
from weibull_monitor.demos.toy import byte_batches, tiny_llama
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.sinks import Sink
from weibull_monitor.store import RunStore

STEPS = 8
FAULT_STEPS = range(2, 5)  # the fault is active while these steps are observed


class KeepSink(Sink):
    """A healthy dashboard next to the faulty one: keeps what it receives."""

    def __init__(self):
        self.steps, self.alerts, self.snapshots = [], [], []

    def log_metrics(self, metrics, step):
        self.steps.append(step)

    def log_alert(self, alert):
        self.alerts.append((alert.step, alert.rule))

    def log_snapshot(self, snapshot):
        self.snapshots.append(snapshot.step)


class EverySnapshot(Rule):
    """Fires at every snapshot, so alert paths are exercised at every step."""

    name = "every_snapshot"
    level = "warning"

    def evaluate(self, snapshot):
        return [Breach(key="all", matrices=(), values={"step": float(snapshot.step)}, message="test alert")]


class Run:
    """A tiny LLaMA, AdamW and a monitor observing every step."""

    def __init__(self, tmp_path, **monitor_kwargs):
        self.model = tiny_llama(0, num_hidden_layers=1)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1)
        self.batches = byte_batches(2, 16)
        monitor_kwargs.setdefault("store", tmp_path / "w.sqlite")
        monitor_kwargs.setdefault("rules", [EverySnapshot()])
        monitor_kwargs.setdefault("run_name", "faults")
        self.monitor = WeibullMonitor(self.model, self.optimizer, every=1, **monitor_kwargs)
        self.trained: list[int] = []

    def step(self, step: int) -> None:
        if step:
            ids = next(self.batches)
            self.model(input_ids=ids, labels=ids).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.monitor.observe(step)
        self.trained.append(step)


def messages(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def stored_steps(path) -> list[int]:
    with RunStore(path) as store:
        return store.steps()


# ---------------------------------------------------------------------------------------------------------------
# W&B: a run whose log and alert raise


def _wandb_file(root: Path) -> Path:
    return next(root.rglob("run-*.wandb"))


@pytest.mark.trains
@pytest.mark.slow  # ~9 s: W&B starts its service process
def test_wandb_run_raising_in_log_and_alert(tmp_path, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    from wandb_files import read_run_alerts, read_run_history, wait_for_run_file

    from weibull_monitor.sinks.wandb_sink import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="weibull-faults", dir=str(tmp_path))
    try:
        real_log, real_alert = run.log, run.alert
        broken = threading.Event()

        def log(*args, **kwargs):
            if broken.is_set():
                raise ConnectionError("W&B backend unreachable (injected)")
            return real_log(*args, **kwargs)

        def alert(*args, **kwargs):
            if broken.is_set():
                raise ConnectionError("W&B alert endpoint unreachable (injected)")
            return real_alert(*args, **kwargs)

        monkeypatch.setattr(run, "log", log)
        monkeypatch.setattr(run, "alert", alert)
        keep = KeepSink()
        sink = WandbSink(run, table_every=0, heatmap_every=0, alert_wait_s=0)
        train = Run(tmp_path, sinks=[sink, keep], sink_timeout=5)
        with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
            for step in range(STEPS):
                if step == FAULT_STEPS.start:
                    train.monitor.flush()  # calls are asynchronous: the earlier ones run before the fault
                    broken.set()
                if step == FAULT_STEPS.stop:
                    train.monitor.flush()  # the faulty calls have run before the fault clears
                    broken.clear()
                train.step(step)
            assert train.monitor.flush(timeout=10)
            train.monitor.close()
        guard = train.monitor.sinks[0]
    finally:
        monkeypatch.undo()
        wandb.finish()

    assert train.trained == list(range(STEPS))
    assert keep.steps == list(range(STEPS)) and [s for s, _ in keep.alerts] == list(range(STEPS))
    assert stored_steps(tmp_path / "w.sqlite") == list(range(STEPS))
    # once per failing method, with the cause; recovery logged once per method
    failed_log = messages(caplog, "failed in log_metrics")
    failed_alert = messages(caplog, "failed in log_alert")
    assert len(failed_log) == 1 and "ConnectionError" in failed_log[0] and "unreachable" in failed_log[0]
    assert len(failed_alert) == 1 and "alert endpoint unreachable" in failed_alert[0]
    assert len(messages(caplog, "recovered in log_metrics")) == 1
    assert len(messages(caplog, "recovered in log_alert")) == 1
    assert guard.failures == 2 * len(FAULT_STEPS) and guard.healthy
    # the run file holds every step outside the fault, and none inside it
    path = wait_for_run_file(_wandb_file(tmp_path))
    logged = sorted(
        {int(row["train/global_step"]) for row in read_run_history(path) if "weibull/value/k_median" in row}
    )
    assert logged == [s for s in range(STEPS) if s not in FAULT_STEPS]
    alert_steps = sorted({a["text"].split(":")[0] for a in read_run_alerts(path)})
    assert alert_steps == sorted({f"step {s}" for s in range(STEPS) if s not in FAULT_STEPS})


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard: the log directory cannot be created (its parent is a file; works as root, unlike chmod)


def _tb_scalar_steps(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: set[int] = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps.update(e.step for e in accumulator.Scalars(tag))
    return sorted(steps)


@pytest.mark.trains
def test_tensorboard_directory_unwritable_then_writable(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from weibull_monitor.sinks.tensorboard_sink import TensorBoardSink

    # A regular file where the log directory's parent should be: even root cannot create a directory under it
    # (ENOTDIR), unlike a chmod. The sink meets it from its first call (an open writer keeps its open file).
    blocker = tmp_path / "logs"
    blocker.write_text("not a directory")
    log_dir = blocker / "tb"
    keep = KeepSink()
    train = Run(tmp_path, sinks=[TensorBoardSink(log_dir=str(log_dir)), keep], sink_timeout=5)
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        for step in range(STEPS):
            if step == FAULT_STEPS.stop:
                train.monitor.flush()
                blocker.unlink()
            train.step(step)
        assert train.monitor.flush(timeout=10)
        train.monitor.close()
    assert train.trained == list(range(STEPS))
    assert keep.steps == list(range(STEPS))
    assert stored_steps(tmp_path / "w.sqlite") == list(range(STEPS))
    failed = messages(caplog, "TensorBoardSink failed in log_metrics")
    assert len(failed) == 1 and "Not a directory" in failed[0], failed
    assert len(messages(caplog, "TensorBoardSink recovered in log_metrics")) == 1
    assert _tb_scalar_steps(log_dir, "weibull/value/k_median") == list(range(FAULT_STEPS.stop, STEPS))


# ---------------------------------------------------------------------------------------------------------------
# SQLite: the store locked by another process (BEGIN EXCLUSIVE held by a second connection in another process)

_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
conn.close()
print("released", flush=True)
"""


@pytest.mark.trains
def test_store_locked_by_another_process(tmp_path, caplog):
    path = tmp_path / "w.sqlite"
    keep = KeepSink()
    train = Run(tmp_path, store=RunStore(path, timeout=0.05), sinks=[keep])
    locker = None
    try:
        with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
            for step in range(STEPS):
                if step == FAULT_STEPS.start:
                    locker = subprocess.Popen(
                        [sys.executable, "-c", _LOCKER, str(path)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    assert locker.stdout.readline().strip() == "locked"
                if step == FAULT_STEPS.stop:
                    locker.stdin.write("go\n")
                    locker.stdin.flush()
                    assert locker.stdout.readline().strip() == "released"
                    locker.wait(10)
                if FAULT_STEPS.start < step < FAULT_STEPS.stop:
                    # while locked, nothing new reaches the file: snapshots wait in memory
                    assert stored_steps_readonly(path) == list(range(FAULT_STEPS.start))
                train.step(step)
            train.monitor.close()
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
            locker.wait()
    assert train.trained == list(range(STEPS)) and keep.steps == list(range(STEPS))
    failed = messages(caplog, "store write failed")
    assert len(failed) == 1 and "database is locked" in failed[0]
    assert len(messages(caplog, "store writes work again")) == 1
    with RunStore(path) as store:
        assert store.steps() == list(range(STEPS))  # the locked-out snapshots caught up, none twice
        assert [a["step"] for a in store.alerts()] == list(range(STEPS))


def stored_steps_readonly(path) -> list[int]:
    import sqlite3

    # a reader may read committed data while the writer's lock is held (WAL); read-only, so it takes no lock
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05)
    try:
        return [row[0] for row in conn.execute("SELECT step FROM snapshots ORDER BY step")]
    except sqlite3.OperationalError:
        return list(range(FAULT_STEPS.start))  # EXCLUSIVE in rollback-journal mode blocks readers too
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# Full disk: store and TensorBoard events on a 1 MiB tmpfs, filled up to a real ENOSPC


@contextlib.contextmanager
def small_tmpfs(size: str = "1m"):
    """A fresh tmpfs of ``size`` (needs mount rights: root with CAP_SYS_ADMIN); skipped with the reason if none."""
    mount = shutil.which("mount")
    where = tempfile.mkdtemp(prefix="wm-full-")
    if mount is None:
        os.rmdir(where)
        pytest.skip("no mount command: cannot make a small filesystem for a real ENOSPC")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], capture_output=True, text=True
    )
    if done.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): no real ENOSPC")
    try:
        yield Path(where)
    finally:
        subprocess.run(["umount", "-l", where], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(where)


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem says ENOSPC; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    written = 0
    try:
        while True:
            written += os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == 28, error  # ENOSPC, the real thing
    finally:
        os.close(fd)
    return written


def _full_disk_run(caplog):
    from weibull_monitor.sinks.tensorboard_sink import TensorBoardSink

    with small_tmpfs() as disk:
        store_path = disk / "w.sqlite"
        log_dir = disk / "tb"
        keep = KeepSink()
        train = Run(
            disk,
            store=RunStore(store_path, timeout=0.05),
            sinks=[TensorBoardSink(log_dir=str(log_dir)), keep],
        )
        filler = disk / "filler"
        with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
            for step in range(STEPS):
                if step == FAULT_STEPS.start:
                    train.monitor.flush()
                    assert fill(filler) > 0
                if step == FAULT_STEPS.stop:
                    train.monitor.flush()
                    filler.unlink()
                train.step(step)
            train.monitor.flush(timeout=10)
            train.monitor.close()
        with RunStore(store_path) as store:
            steps = store.steps()
            alert_steps = [a["step"] for a in store.alerts()]
        tb_steps = _tb_scalar_steps(log_dir, "weibull/value/k_median")
    return train, keep, steps, alert_steps, tb_steps


@pytest.mark.trains
def test_full_disk_store_and_other_sinks(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    train, keep, steps, alert_steps, _ = _full_disk_run(caplog)
    assert train.trained == list(range(STEPS)) and keep.steps == list(range(STEPS))
    failed = messages(caplog, "store write failed")
    assert len(failed) == 1 and ("disk is full" in failed[0] or "No space left" in failed[0]), failed
    assert len(messages(caplog, "store writes work again")) == 1
    assert steps == list(range(STEPS)) and alert_steps == list(range(STEPS))  # caught up, nothing twice
    # the guard reports per method (documented): one line per failing method, never one per step
    for method in ("log_metrics", "log_alert", "log_snapshot"):
        tb_failed = messages(caplog, f"TensorBoardSink failed in {method}")
        assert len(tb_failed) == 1 and "No space left on device" in tb_failed[0], tb_failed


@pytest.mark.trains
def test_full_disk_tensorboard_recovers_when_space_is_back(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    _, _, _, _, tb_steps = _full_disk_run(caplog)
    assert set(range(FAULT_STEPS.stop, STEPS)) <= set(tb_steps)
    assert len(messages(caplog, "TensorBoardSink recovered")) >= 1


# ---------------------------------------------------------------------------------------------------------------
# A sink that hangs: bounded by the guard's timeout, also when it never returns


@pytest.mark.trains
def test_hanging_sink_is_bounded_and_training_goes_on(tmp_path, caplog):
    release = threading.Event()
    entered = threading.Event()

    class Hangs(Sink):
        def __init__(self):
            self.steps = []

        def log_metrics(self, metrics, step):
            entered.set()
            if not release.wait(60):
                raise TimeoutError("never released")
            self.steps.append(step)

    hangs, keep = Hangs(), KeepSink()
    train = Run(tmp_path, sinks=[hangs, keep], sink_timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        train.step(0)
        assert entered.wait(10)
        threading.Event().wait(0.3)  # the hang now outlasts the guard's timeout
        for step in range(1, STEPS):
            train.step(step)
        # every step trained and stored, the healthy sink fed, while the first call is still stuck
        assert not release.is_set() and hangs.steps == []
        assert train.monitor.sinks[1].flush(timeout=10)  # the healthy sink's own queue drains meanwhile
        assert keep.steps == list(range(STEPS))
        assert stored_steps(tmp_path / "w.sqlite") == list(range(STEPS))
        hang = messages(caplog, "has not returned from log_metrics")
        assert len(hang) == 1 and "Hangs" in hang[0]
        release.set()
        assert train.monitor.flush(timeout=10)
        assert hangs.steps == list(range(STEPS))  # queued while hanging, delivered after
        assert len(messages(caplog, "returned again")) == 1


@pytest.mark.trains
def test_sink_that_never_returns_does_not_block_close(tmp_path, caplog):
    forever = threading.Event()

    class Stuck(Sink):
        def log_metrics(self, metrics, step):
            forever.wait(120)

    keep = KeepSink()
    train = Run(tmp_path, sinks=[Stuck(), keep], sink_timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        for step in range(STEPS):
            train.step(step)
        guard = train.monitor.sinks[0]
        train.monitor.close()  # returns after at most ~timeout per stuck sink
        assert guard._thread.is_alive()  # still stuck: abandoned, not waited for
        assert len(messages(caplog, "did not finish closing")) == 1
    forever.set()
    assert keep.steps == list(range(STEPS))
    assert stored_steps(tmp_path / "w.sqlite") == list(range(STEPS))
