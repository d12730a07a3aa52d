"""Every sink through the same checks, the way the monitor drives it (inside a GuardedSink), against its real
library and real files: metrics come back at their steps, an alert is recorded, the sink leaves the snapshot it is
handed untouched, and closing twice (or calling after close) is harmless. A new dashboard adds one entry to SINKS."""

from __future__ import annotations

import copy
import csv
import glob
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from weibull_monitor.alerts import Alert
from weibull_monitor.distributed import LocalMatrix
from weibull_monitor.estimator import fit_many
from weibull_monitor.models import Role
from weibull_monitor.sinks import LoggingSink
from weibull_monitor.sinks.guard import GuardedSink
from weibull_monitor.snapshot import MatrixEntry, Snapshot, SnapshotBuilder, keys

STEPS = (0, 10, 20)
K_MEDIAN = keys.class_metric("selection", "k_median")
ALERT = Alert(20, "selection_collapse", "critical", "matrix", ("L0.q",), {"k_min": 0.5}, "a test alert")


def real_snapshots() -> list[Snapshot]:
    """Snapshots built the way the monitor builds them, from real fits of two layers of Q, K, W_o and FFN."""
    builder = SnapshotBuilder()
    generator = torch.Generator().manual_seed(3)
    snapshots = []
    for step in STEPS:
        entries = []
        tensors = {}
        for layer in range(2):
            for component, klass in (("q", "selection"), ("k", "selection"), ("o", "transmission")):
                key = f"model.layers.{layer}.{component}.weight"
                tensors[key] = torch.randn(64, 64, generator=generator) * (0.02 + 0.001 * step)
                role = Role(layer=layer, component=component, klass=klass)
                entries.append(MatrixEntry(key, key, LocalMatrix(tensors[key]), role))
        snapshots.append(builder.build(step, entries, fit_many(tensors), attention_kind="mha"))
    return snapshots


@dataclass
class Case:
    """A sink made for a test, and how to read back what it wrote: ``read()`` -> ({step: k_median}, alert seen)."""

    sink: Any
    read: Callable[[], tuple[dict[int, float], bool]]
    tolerance: float = 1e-6  # what the dashboard keeps of a number (a log line keeps 3 decimals)


def logging_case(tmp_path: Path, caplog: Any) -> Case:
    caplog.set_level(logging.INFO, logger="weibull-conformance")
    sink = LoggingSink(logging.getLogger("weibull-conformance"))

    def read() -> tuple[dict[int, float], bool]:
        lines = [r.getMessage() for r in caplog.records if r.name == "weibull-conformance"]
        values = {}
        for line in lines:
            step = int(line.split("weibull step ")[1].split(" ")[0])
            values[step] = float(line.split("selection k ")[1].split(" ")[0])
        return values, any("critical selection_collapse" in line for line in lines)

    return Case(sink, read, tolerance=5e-4)


def tensorboard_case(tmp_path: Path, caplog: Any) -> Case:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from weibull_monitor.sinks.tensorboard_sink import TensorBoardSink

    def read() -> tuple[dict[int, float], bool]:
        accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
        accumulator.Reload()
        values = {e.step: e.value for e in accumulator.Scalars(K_MEDIAN)}
        return values, keys.alert_count("critical") in accumulator.Tags()["scalars"]

    return Case(TensorBoardSink(log_dir=str(tmp_path)), read)


def mlflow_case(tmp_path: Path, caplog: Any, monkeypatch: Any) -> Case:
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from weibull_monitor.sinks.mlflow_sink import MLflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("conformance")).info.run_id

    def read() -> tuple[dict[int, float], bool]:
        values = {m.step: m.value for m in client.get_metric_history(run_id, K_MEDIAN)}
        return values, "weibull.last_alert" in client.get_run(run_id).data.tags

    del mlflow
    return Case(MLflowSink(run_id, tracking_uri=uri), read)


def lightning_csv_case(tmp_path: Path, caplog: Any) -> Case:
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from weibull_monitor.sinks.lightning_sink import LightningLoggerSink

    logger = CSVLogger(str(tmp_path), name="conformance")

    def read() -> tuple[dict[int, float], bool]:
        logger.save()
        (path,) = glob.glob(str(tmp_path / "conformance" / "*" / "metrics.csv"))
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        values = {int(r["step"]): float(r[K_MEDIAN]) for r in rows if r.get(K_MEDIAN)}
        return values, any(r.get(keys.alert_count("critical")) for r in rows)

    return Case(LightningLoggerSink(logger), read)


def wandb_case(tmp_path: Path, caplog: Any, monkeypatch: Any) -> Case:
    wandb = pytest.importorskip("wandb")
    from wandb_files import read_run_alerts, read_run_history, wait_for_run_file

    from weibull_monitor.sinks.wandb_sink import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="weibull-conformance", dir=str(tmp_path))

    def read() -> tuple[dict[int, float], bool]:
        run.finish()
        (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
        wait_for_run_file(path)
        history = read_run_history(path)
        values = {int(r["train/global_step"]): r[K_MEDIAN] for r in history if K_MEDIAN in r}
        return values, bool(read_run_alerts(path))

    return Case(WandbSink(run, heatmap_every=0), read)


SINKS = {
    "logging": logging_case,
    "tensorboard": tensorboard_case,
    "mlflow": mlflow_case,
    "lightning_csv": lightning_csv_case,
    "wandb": wandb_case,
}


@pytest.mark.parametrize("name", list(SINKS))
def test_every_sink_records_metrics_and_alerts_and_leaves_the_snapshot_alone(
    name, tmp_path, caplog, monkeypatch
):
    make = SINKS[name]
    case = (
        make(tmp_path, caplog, monkeypatch)
        if "monkeypatch" in make.__code__.co_varnames
        else make(tmp_path, caplog)
    )
    guarded = GuardedSink(case.sink, timeout=30.0)
    snapshots = real_snapshots()
    before = [copy.deepcopy((s.fits, s.aggregates, s.roles, s.matrices)) for s in snapshots]
    for snapshot in snapshots:
        snapshot.alerts = [ALERT] if snapshot.step == 20 else []
        guarded.log_metrics(dict(snapshot.aggregates), snapshot.step)
        for alert in snapshot.alerts:
            guarded.log_alert(alert)
        guarded.log_snapshot(snapshot)
    assert guarded.flush(30.0), f"{name} did not drain"
    assert guarded.failures == 0 and guarded.healthy, name
    guarded.close()
    guarded.close()  # twice: harmless
    guarded.log_metrics({K_MEDIAN: 1.0}, 99)  # after close: dropped, never raises
    values, alerted = case.read()
    expected = {s.step: s.aggregates[K_MEDIAN] for s in snapshots}
    assert values == pytest.approx(expected, abs=case.tolerance, rel=1e-6), name
    assert alerted, f"{name} recorded no alert"
    after = [(s.fits, s.aggregates, s.roles, s.matrices) for s in snapshots]
    assert after == before, f"{name} changed the snapshot it was handed"
