"""What each dashboard shows after a rewind when the resumed timeline goes to the *same* destination as the
abandoned one (real files: W&B offline run files, an MLflow file store, TensorBoard event files): no step twice in
a series. TensorBoard hides the abandoned points; W&B and MLflow, which cannot drop points from the client, hold the
resumed steps back up to the last abandoned one (the store has them); a W&B run started with ``resume_from`` is
truncated by W&B and gets every resumed step."""

from __future__ import annotations

import copy
import glob
import time

import pytest
import torch

from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.store import RunStore

# These tests train (optimizer steps): .ci/run runs them again under another ATEN_CPU_CAPABILITY.
pytestmark = pytest.mark.trains

METRIC = "weibull/transmission/k_median"


def tiny():
    return tiny_llama(0, num_hidden_layers=1, hidden_size=32, intermediate_size=64)


def train(model, optimizer, monitor, steps, seed=0):
    for step in steps:
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step + seed))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.observe(step)


def rollback_in_one_process(store, sinks):
    """Steps 0-30, then the weights of step 20 with other data, to 40, on one monitor (its sinks keep their
    destination): the rollback is detected by observe."""
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    monitor = WeibullMonitor(model, optimizer, every=5, store=store, sinks=sinks, rules=[], run_name="r")
    monitor.observe(0)
    train(model, optimizer, monitor, range(1, 21))
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, monitor, range(21, 31))
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    train(model, optimizer, monitor, range(21, 41), seed=7)
    monitor.close()


def test_wandb_run_continued_in_place_holds_the_abandoned_steps_back(tmp_path):
    import wandb
    from wandb_files import read_run_config, read_run_history, wait_for_run_file

    from weibull_monitor.sinks import WandbSink

    run = wandb.init(project="weibull-rewind", dir=str(tmp_path), mode="offline")
    try:
        rollback_in_one_process(tmp_path / "w.sqlite", [WandbSink(run, step_metric="step", heatmap_every=0)])
    finally:
        wandb.finish()
    (directory,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    history = read_run_history(wait_for_run_file(directory))
    steps = [r["step"] for r in history if METRIC in r]
    assert steps == [0, 5, 10, 15, 20, 25, 30, 35, 40]  # each once: 25 and 30 of the resumed run held back
    (note,) = read_run_config(directory)["weibull_rewinds"]
    assert note["held_back_through"] == 30 and note["superseded_steps"] == [25, 30]
    with RunStore(tmp_path / "w.sqlite") as store:  # the store has the resumed 25 and 30
        run_id = store.run_id("r")
        resumed = {r["step"]: r["value"] for r in store.aggregates(run_id) if r["metric"] == METRIC}
        abandoned = {r["step"]: r["value"] for r in store.aggregates(run_id, branch=0) if r["metric"] == METRIC}
    assert resumed[25] != abandoned[25]
    assert {r["step"]: r[METRIC] for r in history if METRIC in r}[25] == pytest.approx(abandoned[25])


def test_wandb_run_started_with_resume_from_gets_every_resumed_step(tmp_path):
    """A new process resumes the W&B run with ``resume_from``: W&B truncates it (offline: the branch point is
    recorded in the run file, applied when synced), so the sink sends the resumed steps 25 and 30 too."""
    import wandb
    from wandb_files import iter_run_records, read_run_history, wait_for_run_file

    from weibull_monitor.sinks import WandbSink

    path = tmp_path / "w.sqlite"
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    first = wandb.init(project="weibull-rewind", dir=str(tmp_path), mode="offline")
    monitor = WeibullMonitor(model, optimizer, every=5, store=path, sinks=[WandbSink(first, heatmap_every=0)])
    monitor.observe(0)
    train(model, optimizer, monitor, range(1, 21))
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), monitor.state_dict()
    train(model, optimizer, monitor, range(21, 31))
    monitor.close()
    run_id = first.id
    wandb.finish()
    time.sleep(1.1)  # W&B names offline run directories to the second: same id, same second, same directory

    second = wandb.init(project="weibull-rewind", dir=str(tmp_path), mode="offline", resume_from=f"{run_id}?_step=4")
    assert second.id == run_id
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    monitor = WeibullMonitor(model, optimizer, every=5, store=path, sinks=[WandbSink(second, heatmap_every=0)])
    monitor.load_state_dict(saved[2])
    train(model, optimizer, monitor, range(21, 41), seed=7)
    monitor.close()
    wandb.finish()
    files = sorted(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}")))
    assert len(files) == 2
    resumed = read_run_history(wait_for_run_file(files[-1]))
    assert [r["train/global_step"] for r in resumed if METRIC in r] == [25, 30, 35, 40]
    (run_record,) = [r.run for r in iter_run_records(files[-1]) if r.WhichOneof("record_type") == "run"]
    assert any("branch_point" in item.value_json for item in run_record.config.update)


def test_mlflow_run_continued_in_place_logs_each_step_once(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    from weibull_monitor.sinks import MLflowSink

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("weibull-rewind")
    run = client.create_run(experiment)
    rollback_in_one_process(tmp_path / "w.sqlite", [MLflowSink(run.info.run_id, tracking_uri=uri)])
    history = client.get_metric_history(run.info.run_id, METRIC)
    assert sorted(m.step for m in history) == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert "steps 21-30 not re-logged" in client.get_run(run.info.run_id).data.tags["weibull.rewind"]
    del mlflow


def test_tensorboard_directory_reused_by_the_resumed_process(tmp_path):
    """The resumed run writes into the directory the abandoned one used (a fixed log_dir, or
    TENSORBOARD_LOGGING_DIR): the purge file hides the old points after 20, the new ones show."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from weibull_monitor.sinks import TensorBoardSink

    path, tb = tmp_path / "w.sqlite", tmp_path / "tb"
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    monitor = WeibullMonitor(model, optimizer, every=5, store=path, sinks=[TensorBoardSink(log_dir=str(tb))])
    monitor.observe(0)
    train(model, optimizer, monitor, range(1, 21))
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), monitor.state_dict()
    train(model, optimizer, monitor, range(21, 31))
    monitor.close()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    monitor = WeibullMonitor(model, optimizer, every=5, store=path, sinks=[TensorBoardSink(log_dir=str(tb))])
    monitor.load_state_dict(saved[2])
    train(model, optimizer, monitor, range(21, 41), seed=7)
    monitor.close()
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    points = events.Scalars(METRIC)
    assert [p.step for p in points] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    with RunStore(path) as store:
        live = {r["step"]: r["value"] for r in store.aggregates(store.runs()[0]["run_id"]) if r["metric"] == METRIC}
    for point in points:
        assert point.value == pytest.approx(live[point.step], rel=1e-6)


def test_wandb_files_accept_a_run_directory_or_file_and_say_what_else_they_want(tmp_path):
    from wandb_files import read_run_history, run_file

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no run-\*\.wandb file"):
        read_run_history(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_run_history(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such W&B run file"):
        run_file(tmp_path / "missing.wandb")
    (tmp_path / "two").mkdir()
    for name in ("run-a.wandb", "run-b.wandb"):
        (tmp_path / "two" / name).write_bytes(b":W&B")
    with pytest.raises(ValueError, match="several run files"):
        run_file(tmp_path / "two")
