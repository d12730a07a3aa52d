"""The Lightning callback on the real ``lightning.pytorch.Trainer`` (tiny LLaMA, CPU) with real files:
TensorBoardLogger event files, the offline W&B run file of a WandbLogger, CSV metrics, ``.ckpt`` checkpoints and
the SQLite run store."""

from __future__ import annotations

import csv
import glob
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from readback import tensorboard_events
from sabotage import collapse_rule, sabotage_queries

from weibull_monitor.demos.toy import ByteWindowDataset, tiny_llama
from weibull_monitor.integrations.lightning import WeibullCallback
from weibull_monitor.store import RunStore

EVERY = 5
MAX_STEPS = 20
DUE = [0, 5, 10, 15, 20]  # step 0: the initial weights, the reference of scale growth


class TinyCausalLM(pl.LightningModule):
    def __init__(self, sabotage: bool = False, lr: float = 1e-4) -> None:
        super().__init__()
        self.model = tiny_llama(0)
        self.lr = lr
        if sabotage:
            sabotage_queries(self.model)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def loader(accumulation: int = 1, max_steps: int = MAX_STEPS) -> torch.utils.data.DataLoader:
    dataset = ByteWindowDataset(n_samples=4 * max_steps * accumulation, seq_len=32)
    return torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)


def make_trainer(
    root: Path, callbacks: list, *, loggers=False, accumulation: int = 1, **kwargs
) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=str(root),
        max_steps=kwargs.pop("max_steps", MAX_STEPS),
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=callbacks,
        accumulate_grad_batches=accumulation,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        log_every_n_steps=5,
        **kwargs,
    )


@pytest.mark.trains
def test_lightning_loggers_alert_and_store_agree_full_run_without_stop(tmp_path, monkeypatch):
    import wandb
    from wandb_files import read_run_alerts, read_run_history, wait_for_run_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    wandb_logger = WandbLogger(project="weibull-tests", save_dir=str(tmp_path), offline=True)
    callback = WeibullCallback(every=EVERY, rules=[collapse_rule()], stop_on_critical=False, heatmap_every=2)
    trainer = make_trainer(tmp_path, [callback], loggers=[tb_logger, wandb_logger])
    try:
        trainer.fit(TinyCausalLM(sabotage=True), loader())
    finally:
        wandb.finish()
    assert trainer.global_step == MAX_STEPS  # the critical alert fired, but stopping was not asked for

    store_file = Path(tb_logger.log_dir) / "weibull.sqlite"  # the trainer's log directory (first logger's)
    with RunStore(store_file) as store:
        assert [row["step"] for row in store.snapshots()] == DUE
        stored = {(row["step"], row["metric"]): row["value"] for row in store.aggregates()}
        critical = [(a["step"], a["rule"]) for a in store.alerts() if a["level"] == "critical"]
    assert critical == [(5, "selection_collapse")]

    events = tensorboard_events(tb_logger.log_dir)
    for metric in ("weibull/transmission/k_median", "weibull/selection/k_median"):
        points = events.Scalars(metric)
        assert [p.step for p in points] == DUE
        for point in points:
            assert point.value == pytest.approx(stored[(point.step, metric)], rel=1e-6)
    assert len(events.Tensors("custom_scalars__config__")) == 1
    assert [(e.step, e.value) for e in events.Scalars("weibull/alerts/critical")] == [(5, 1.0)]

    (wandb_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    wait_for_run_file(wandb_file)
    history = read_run_history(wandb_file)
    rows = [row for row in history if "weibull/selection/k_median" in row]
    assert [row["trainer/global_step"] for row in rows] == DUE
    for row in rows:
        step = row["trainer/global_step"]
        assert row["weibull/selection/k_median"] == pytest.approx(
            stored[(step, "weibull/selection/k_median")]
        )
    assert [
        r["trainer/global_step"] for r in history if r.get("weibull/k_heatmap/_type") == "image-file"
    ] == [5, 15]
    alerts = read_run_alerts(wandb_file)
    assert [a["level"] for a in alerts if "selection_collapse" in a["title"]] == ["WARN", "ERROR"]


@pytest.mark.trains
def test_lightning_stop_on_critical_stops_early_csv_logger(tmp_path):
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    callback = WeibullCallback(every=EVERY, rules=[collapse_rule()], stop_on_critical=True)
    trainer = make_trainer(tmp_path, [callback], loggers=[csv_logger])
    trainer.fit(TinyCausalLM(sabotage=True), loader())
    assert trainer.global_step == 5
    with RunStore(Path(csv_logger.log_dir) / "weibull.sqlite") as store:
        assert [row["step"] for row in store.snapshots()] == [0, 5]
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows if r.get("weibull/selection/k_median")] == [0, 5]
    assert [int(r["step"]) for r in rows if r.get("weibull/alerts/critical")] == [5]


class _StopAt(Callback):
    """Ends training at a given step: the 'crash' after the checkpoint at step 10 and the snapshot at 15."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.trains
def test_lightning_resume_from_ckpt_continues_the_series(tmp_path):
    checkpoints = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), filename="{step}", every_n_train_steps=10, save_top_k=-1
    )
    first = WeibullCallback(every=EVERY)
    trainer = make_trainer(
        tmp_path,
        [first, _StopAt(16), checkpoints],
        loggers=[CSVLogger(str(tmp_path), name="csv")],
        enable_checkpointing=True,
    )
    trainer.fit(TinyCausalLM(), loader())
    store_file = Path(trainer.log_dir) / "weibull.sqlite"
    checkpoint = tmp_path / "ckpt" / "step=10.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][first.state_key]
    assert saved["monitor"]["last_snapshot_step"] == 10
    assert saved["store"] == str(store_file)
    with RunStore(store_file) as store:
        assert store.steps() == [0, 5, 10, 15]
        (run,) = store.runs()
        scale_first_before = store.load_state(run["run_id"])["scale_first"]

    second = WeibullCallback(every=EVERY)
    resumed = make_trainer(
        tmp_path,
        [second, ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"), every_n_train_steps=10)],
        loggers=[CSVLogger(str(tmp_path), name="csv")],  # a new logger version: a new log_dir
        enable_checkpointing=True,
    )
    resumed.fit(TinyCausalLM(), loader(), ckpt_path=str(checkpoint))
    assert resumed.global_step == MAX_STEPS
    assert Path(resumed.log_dir) != store_file.parent  # still, the series stays in the first run's store
    with RunStore(store_file) as store:
        (run,) = store.runs()
        assert [
            row["step"] for row in store.snapshots(run["run_id"])
        ] == DUE  # 15 once, 20 added, none missing
        state = store.load_state(run["run_id"])
        assert state["scale_first"] == scale_first_before  # lambda_first unchanged by the resume
    assert not (Path(resumed.log_dir) / "weibull.sqlite").exists()


@pytest.mark.trains
def test_lightning_gradient_accumulation_snapshots_on_optimizer_steps_once_each(tmp_path):
    callback = WeibullCallback(every=EVERY, store=tmp_path / "ga.sqlite")
    trainer = make_trainer(tmp_path, [callback], accumulation=4, max_steps=10)
    trainer.fit(TinyCausalLM(), loader(accumulation=4, max_steps=10))
    assert trainer.global_step == 10
    with RunStore(tmp_path / "ga.sqlite") as store:
        assert [row["step"] for row in store.snapshots()] == [0, 5, 10]


@pytest.mark.trains
def test_example_lightning_fit_runs_with_offline_wandb_and_tensorboard(tmp_path):
    import runpy

    from wandb_files import read_run_history, wait_for_run_file

    out = tmp_path / "example"
    example = runpy.run_path(str(Path(__file__).parents[2] / "examples" / "lightning_fit.py"))
    last = example["main"](
        ["--steps", "10", "--every", "5", "--out", str(out), "--threads", str(torch.get_num_threads())]
    )
    assert 1.0 < last["weibull/transmission/k_median"] < 1.4
    assert [
        e.step
        for e in tensorboard_events(str(out / "tb" / "version_0")).Scalars("weibull/selection/k_median")
    ] == [
        0,
        5,
        10,
    ]
    (wandb_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = read_run_history(wait_for_run_file(wandb_file))
    assert [r["trainer/global_step"] for r in history if "weibull/selection/k_median" in r] == [0, 5, 10]
