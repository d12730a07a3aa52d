"""The HF Trainer callback on the real ``transformers.Trainer`` (tiny LLaMA, CPU) with real dashboard files:
TensorBoard event files, the offline W&B run file, an MLflow file store and the SQLite run store."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from readback import tensorboard_events
from sabotage import collapse_rule, sabotage_queries
from transformers import Trainer, TrainerCallback, TrainingArguments

from weibull_monitor.demos.toy import ByteWindowDataset, tiny_llama
from weibull_monitor.integrations.hf import WeibullCallback
from weibull_monitor.store import RunStore

EVERY = 5
MAX_STEPS = 20
DUE = [0, 5, 10, 15, 20]  # step 0: the initial weights, the reference of scale growth


def make_trainer(
    output_dir: Path,
    callbacks: list,
    *,
    model: torch.nn.Module | None = None,
    report_to: list[str] | None = None,
    accumulation: int = 1,
    save_steps: int | None = None,
    restore_callback_states: bool = False,
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-4,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=report_to or [],
        logging_steps=5,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        restore_callback_states_from_checkpoint=restore_callback_states,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
    )
    dataset = ByteWindowDataset(n_samples=4 * MAX_STEPS * accumulation, seq_len=32)
    return Trainer(model=model or tiny_llama(0), args=args, train_dataset=dataset, callbacks=callbacks)


def store_rows(path: Path) -> tuple[list[dict], list[dict], list[dict]]:
    with RunStore(path) as store:
        return store.snapshots(), store.aggregates(), store.alerts()


@pytest.mark.trains
def test_hf_dashboards_alert_and_store_agree_full_run_without_stop(tmp_path, monkeypatch):
    import wandb
    from tensorboard.plugins.custom_scalar import layout_pb2
    from wandb_files import (
        iter_run_records,
        read_run_alerts,
        read_run_history,
        wait_for_run_file,
    )

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model = tiny_llama(0)
    sabotage_queries(model)
    callback = WeibullCallback(every=EVERY, rules=[collapse_rule()], stop_on_critical=False, heatmap_every=2)
    trainer = make_trainer(tmp_path / "out", [callback], model=model, report_to=["tensorboard", "wandb"])
    # W&B reads WANDB_DIR once per process, so the run is started here, in this test's directory; the
    # Trainer's W&B callback then uses the active run, as it does for users who call wandb.init themselves.
    wandb.init(project="weibull-tests", dir=str(tmp_path))
    try:
        trainer.train()
    finally:
        wandb.finish()
    assert trainer.state.global_step == MAX_STEPS  # the critical alert fired, but stopping was not asked for

    snapshots, aggregates, alerts = store_rows(tmp_path / "out" / "weibull.sqlite")
    assert [row["step"] for row in snapshots] == DUE
    critical = [a for a in alerts if a["level"] == "critical"]
    assert [(a["step"], a["rule"]) for a in critical] == [(5, "selection_collapse")]
    stored = {(row["step"], row["metric"]): row["value"] for row in aggregates}
    for step in DUE:  # the sabotage shows: Selection well below Transmission
        assert (
            stored[(step, "weibull/selection/k_median")]
            < stored[(step, "weibull/transmission/k_median")] - 0.05
        )

    # TensorBoard: the same directory as the Trainer's own events, scalars at the due steps, one layout.
    run_dirs = glob.glob(str(tmp_path / "out" / "runs" / "*"))
    assert len(run_dirs) == 1
    events = tensorboard_events(run_dirs[0])
    assert "train/loss" in events.Tags()["scalars"]  # the Trainer's TensorBoard callback wrote here too
    for metric in ("weibull/transmission/k_median", "weibull/selection/k_median"):
        points = events.Scalars(metric)
        assert [p.step for p in points] == DUE
        for point in points:  # the store agrees with the dashboard (TensorBoard keeps float32)
            assert point.value == pytest.approx(stored[(point.step, metric)], rel=1e-6)
    layouts = events.Tensors("custom_scalars__config__")
    assert len(layouts) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(layouts[0].tensor_proto.string_val[0])
    assert {c.title for c in layout.category} == {"weibull: classes", "weibull: per-layer k"}

    # W&B: metrics against train/global_step, equal to the store's; the critical alert as an ERROR alert.
    (wandb_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    wait_for_run_file(wandb_file)  # wandb.finish() returns before W&B's service has flushed the file
    history = read_run_history(wandb_file)
    weibull_rows = [row for row in history if "weibull/selection/k_median" in row]
    assert [row["train/global_step"] for row in weibull_rows] == DUE
    for row in weibull_rows:
        for metric in ("weibull/selection/k_median", "weibull/transmission/k_median"):
            assert row[metric] == pytest.approx(stored[(row["train/global_step"], metric)], rel=1e-12)
    assert any(row.get("weibull/fits/_type") == "table-file" for row in history)
    assert [r["train/global_step"] for r in history if r.get("weibull/k_heatmap/_type") == "image-file"] == [
        5,
        15,
    ]
    declared = [r.metric for r in iter_run_records(wandb_file) if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "weibull/*" and m.step_metric == "train/global_step" for m in declared)
    wandb_alerts = read_run_alerts(wandb_file)
    assert [a["level"] for a in wandb_alerts if "selection_collapse" in a["title"]] == ["WARN", "ERROR"]


@pytest.mark.trains
def test_hf_stop_on_critical_stops_early_and_reaches_mlflow(tmp_path, monkeypatch):
    report_to = []
    try:
        import mlflow
    except ImportError:  # not installed: the rest of the test still runs
        mlflow = None
    if mlflow is not None:
        monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "FALSE")
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "weibull-tests")
        report_to = ["mlflow"]
    model = tiny_llama(0)
    sabotage_queries(model)
    callback = WeibullCallback(every=EVERY, rules=[collapse_rule()], stop_on_critical=True)
    trainer = make_trainer(tmp_path / "out", [callback], model=model, report_to=report_to)
    trainer.train()
    assert trainer.state.global_step == 5  # stopped right after the snapshot whose critical alert fired
    snapshots, _, alerts = store_rows(tmp_path / "out" / "weibull.sqlite")
    assert [row["step"] for row in snapshots] == [0, 5]
    assert [a["level"] for a in alerts if a["step"] == 5] == ["warning", "critical"]

    if mlflow is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
        experiment = client.get_experiment_by_name("weibull-tests")
        (run,) = client.search_runs([experiment.experiment_id])
        history = client.get_metric_history(run.info.run_id, "weibull/selection/k_median")
        assert sorted(m.step for m in history) == [0, 5]
        assert "selection_collapse" in run.data.tags["weibull.last_alert"]


class _StopAt(TrainerCallback):
    """Ends training at a given step: the 'crash' after the checkpoint at step 10 and the snapshot at 15."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.trains
@pytest.mark.parametrize(
    "restore_callback_states", [False, True], ids=["read-state", "transformers-restores"]
)
def test_hf_resume_from_checkpoint_continues_the_series(tmp_path, restore_callback_states):
    output = tmp_path / "out"
    first = WeibullCallback(every=EVERY)
    make_trainer(output, [first, _StopAt(16)], save_steps=10).train()
    checkpoint = output / "checkpoint-10"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"][
        "WeibullCallback"
    ]
    assert saved["args"]["every"] == EVERY
    saved_state = saved["attributes"]["resume_state"]
    assert saved_state["last_snapshot_step"] == 10
    with RunStore(output / "weibull.sqlite") as store:
        assert store.steps() == [0, 5, 10, 15]
        (run,) = store.runs()
        scale_first_before = store.load_state(run["run_id"])["scale_first"]
    assert scale_first_before == saved_state["scale_first"]

    second = WeibullCallback(every=EVERY)
    resumed = make_trainer(output, [second], save_steps=10, restore_callback_states=restore_callback_states)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == MAX_STEPS
    (active,) = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, WeibullCallback)]
    assert (active is second) != restore_callback_states  # transformers rebuilds it from state() when asked

    with RunStore(output / "weibull.sqlite") as store:
        (run,) = store.runs()  # the resumed run appended to the same run
        assert [
            row["step"] for row in store.snapshots(run["run_id"])
        ] == DUE  # 15 once, 20 added, none missing
        state = store.load_state(run["run_id"])
        assert state["last_snapshot_step"] == MAX_STEPS
        assert state["scale_first"] == scale_first_before  # lambda_first unchanged by the resume
        fits_20 = {row["name"]: row for row in store.fits(step=20, run_id=run["run_id"])}
    for name, first_scale in scale_first_before.items():
        row = fits_20[name]
        if row["ok"] and row["scale_growth"] is not None:
            assert row["scale_growth"] == pytest.approx(row["scale"] / first_scale, rel=1e-9)


class _Steps(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)


@pytest.mark.trains
def test_hf_gradient_accumulation_snapshots_on_optimizer_steps_once_each(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb-from-env"))
    steps = _Steps()
    callback = WeibullCallback(every=EVERY, store=tmp_path / "ga.sqlite")
    make_trainer(tmp_path / "out", [callback, steps], accumulation=4, report_to=["tensorboard"]).train()
    assert steps.seen == list(range(1, MAX_STEPS + 1))  # once per optimizer step, not per micro-batch
    snapshots, _, _ = store_rows(tmp_path / "ga.sqlite")
    assert [row["step"] for row in snapshots] == DUE
    assert not os.path.exists(tmp_path / "out" / "weibull.sqlite")  # the store went where it was told
    events = tensorboard_events(
        str(tmp_path / "tb-from-env")
    )  # transformers 5's TensorBoard directory setting
    assert [e.step for e in events.Scalars("weibull/transmission/k_median")] == DUE


@pytest.mark.trains
def test_example_hf_trainer_runs_with_offline_wandb_and_tensorboard(tmp_path, monkeypatch):
    import runpy

    from wandb_files import read_run_history, wait_for_run_file

    out = tmp_path / "example"
    monkeypatch.setenv("WANDB_MODE", "offline")
    example = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "hf_trainer.py"))
    last = example["main"](
        ["--steps", "10", "--every", "5", "--out", str(out), "--threads", str(torch.get_num_threads())]
    )
    assert 1.0 < last["weibull/transmission/k_median"] < 1.4
    (run_dir,) = glob.glob(str(out / "runs" / "*"))
    assert [e.step for e in tensorboard_events(run_dir).Scalars("weibull/selection/k_median")] == [0, 5, 10]
    (wandb_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = read_run_history(wait_for_run_file(wandb_file))
    assert [r["train/global_step"] for r in history if "weibull/selection/k_median" in r] == [0, 5, 10]


def test_callback_state_survives_json_and_bad_options_are_refused():
    from weibull_monitor.integrations.options import CallbackOptions as CallbackSettings
    from weibull_monitor.plain_data import from_json_safe, json_safe

    state = {"sums": (1.5, float("nan")), "first": {"w": torch.tensor(0.25)}, "inf": float("-inf"), "n": None}
    round_trip = from_json_safe(json.loads(json.dumps(json_safe(state), allow_nan=False)))
    assert round_trip["first"] == {"w": 0.25} and round_trip["n"] is None
    assert (
        round_trip["sums"][0] == 1.5 and math.isnan(round_trip["sums"][1]) and round_trip["inf"] == -math.inf
    )
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        json_safe({"bad": object()})
    for bad in ({"every": 0}, {"every": 2.5}, {"heatmap_every": -1}, {"alert_wait_s": -1.0}):
        with pytest.raises(ValueError):
            CallbackSettings(**bad)
    with pytest.raises(ValueError):
        WeibullCallback(every=0)
    exported = WeibullCallback(
        every=7, store=Path("x.sqlite"), include=("*q_proj*",), rules=[collapse_rule()]
    ).state()
    json.dumps(exported, allow_nan=False)  # what transformers writes into trainer_state.json
    assert exported["args"]["store"] == "x.sqlite" and exported["args"]["include"] == ["*q_proj*"]
    assert "rules" not in exported["args"]  # objects are not exported: transformers could not rebuild them
