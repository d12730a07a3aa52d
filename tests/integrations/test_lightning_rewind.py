"""Rewind with the real Lightning Trainer: fit to step 30 with checkpoints every 10 steps, then fit again from
``ckpt_path=step=20.ckpt`` to step 40 with a lower learning rate and other data. The store's live series equals the
resumed fit's own snapshots step for step and its superseded branch the abandoned fit's; the TensorBoard logger's
versions, the CSV file (one version for both fits: Lightning starts it afresh) and the W&B offline runs each hold
every step once."""

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
from readback import stored_series, tensorboard_events

from weibull_monitor.alerts import Breach, Rule
from weibull_monitor.demos.toy import ByteWindowDataset, tiny_llama
from weibull_monitor.integrations.lightning import WeibullCallback
from weibull_monitor.sinks import Sink
from weibull_monitor.store import RunStore

# These tests train (optimizer steps): .ci/run runs them again under another ATEN_CPU_CAPABILITY.
pytestmark = pytest.mark.trains

EVERY, WD, LR, NEW_LR = 5, 0.1, 1e-3, 3e-4
METRIC = "weibull/transmission/k_median"


class Recorder(Sink):
    def __init__(self) -> None:
        self.rows: dict[int, tuple[dict, dict]] = {}
        self.alerts: list[tuple[int, str]] = []

    def log_snapshot(self, snapshot) -> None:
        assert snapshot.step not in self.rows
        self.rows[snapshot.step] = (dict(snapshot.aggregates), {n: f.k for n, f in snapshot.fits.items()})

    def log_alert(self, alert) -> None:
        self.alerts.append((alert.step, alert.rule))


class Every3rd(Rule):
    name, level, patience, cooldown = "streak", "warning", 3, 10

    def evaluate(self, snapshot):
        return [Breach("all", (), {}, "streak")]


class TinyCausalLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(0)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WD)


class LowerLR(Callback):
    """The optimizer comes back from the checkpoint with its learning rate; a lower one is set on it."""

    def on_train_start(self, trainer, pl_module):
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = NEW_LR


def fit(tmp_path: Path, recorder: Recorder, max_steps: int, data_seed: int, extra: list, ckpt_path=None):
    import wandb

    loggers = [
        TensorBoardLogger(str(tmp_path), name="tb"),  # Lightning's default: a new version per fit
        CSVLogger(str(tmp_path), name="csv", version=0),  # pinned: both fits write one file
        WandbLogger(project="weibull-rewind", save_dir=str(tmp_path), offline=True),
    ]
    checkpoints = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), filename="{step}", every_n_train_steps=10, save_top_k=-1
    )
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=[WeibullCallback(every=EVERY, rules=[Every3rd()], sinks=[recorder]), checkpoints, *extra],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    data = ByteWindowDataset(n_samples=4 * max_steps, seq_len=32, seed=data_seed)
    try:
        trainer.fit(TinyCausalLM(), torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    finally:
        wandb.finish()
    return trainer, loggers


def test_lightning_rewind_to_an_earlier_checkpoint(tmp_path, monkeypatch):
    from wandb_files import read_run_config, read_run_history, wait_for_run_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    a, b = Recorder(), Recorder()
    first, first_loggers = fit(tmp_path, a, 30, 0, [])
    store_file = Path(first.log_dir) / "weibull.sqlite"
    second, second_loggers = fit(
        tmp_path, b, 40, 1, [LowerLR()], ckpt_path=str(tmp_path / "ckpt" / "step=20.ckpt")
    )
    assert second.global_step == 40 and Path(second.log_dir) != store_file.parent
    assert sorted(a.rows) == list(range(0, 31, 5)) and sorted(b.rows) == [25, 30, 35, 40]

    with RunStore(store_file) as store:  # the series stays in the first fit's store
        (run,) = store.runs()
        live = stored_series(store, run["run_id"])
        assert live == {**{s: r for s, r in a.rows.items() if s <= 20}, **b.rows}
        assert stored_series(store, run["run_id"], branch=0) == a.rows
        (rewind,) = store.rewinds(run["run_id"])
        assert (rewind["step"], rewind["superseded_first"], rewind["superseded_last"]) == (20, 25, 30)
        assert [x["step"] for x in store.alerts(run["run_id"])] == [10, 20, 30, 40]
    assert a.alerts == [(10, "streak"), (20, "streak"), (30, "streak")]
    assert b.alerts == [(30, "streak"), (40, "streak")]  # counters as at step 20
    t20 = a.rows[20][0]["weibull/T_over_tau"]
    assert b.rows[25][0]["weibull/T_over_tau"] == pytest.approx(t20 + 5 * NEW_LR * WD, rel=1e-9)

    # TensorBoard: version_0 keeps steps 0-20 (the rest hidden), version_1 has the resumed steps
    old, new = (tensorboard_events(lg.log_dir) for lg in (first_loggers[0], second_loggers[0]))
    assert [p.step for p in old.Scalars(METRIC)] == [0, 5, 10, 15, 20]
    assert [p.step for p in new.Scalars(METRIC)] == [25, 30, 35, 40]
    for point in [*old.Scalars(METRIC), *new.Scalars(METRIC)]:
        assert point.value == pytest.approx(live[point.step][0][METRIC], rel=1e-6)

    # CSV pinned to one version: Lightning deletes its metrics.csv when the second fit opens it, so the file holds
    # the resumed fit alone, every step once
    with open(Path(first_loggers[1].log_dir) / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(METRIC)]
    assert [int(r["step"]) for r in rows] == [25, 30, 35, 40]
    for row in rows:
        assert float(row[METRIC]) == pytest.approx(b.rows[int(row["step"])][0][METRIC], rel=1e-6)

    # W&B: a new run per fit (Lightning's default), each step once per run; the second notes the rewind
    ids = [lg.experiment.id for lg in (first_loggers[2], second_loggers[2])]
    directories = [glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{i}"))[0] for i in ids]
    histories = [read_run_history(wait_for_run_file(d)) for d in directories]
    steps = [[r["trainer/global_step"] for r in h if METRIC in r] for h in histories]
    assert steps == [[0, 5, 10, 15, 20, 25, 30], [25, 30, 35, 40]]
    (note,) = read_run_config(directories[1])["weibull_rewinds"]
    assert note["superseded_runs"] == [ids[0]] and note["superseded_steps"] == [25, 30]


def test_lightning_resume_from_a_checkpoint_without_monitor_state(tmp_path, caplog):
    import logging

    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{step}", every_n_train_steps=10)
    data = torch.utils.data.DataLoader(ByteWindowDataset(n_samples=80, seq_len=32), batch_size=4)
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    pl.Trainer(
        default_root_dir=str(tmp_path), max_steps=10, logger=False, callbacks=[checkpoints], **settings
    ).fit(TinyCausalLM(), data)
    callback = WeibullCallback(every=EVERY, store=tmp_path / "w.sqlite")
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path), max_steps=20, logger=False, callbacks=[callback], **settings
    )
    with caplog.at_level(logging.WARNING):
        trainer.fit(TinyCausalLM(), data, ckpt_path=str(tmp_path / "ckpt" / "step=10.ckpt"))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "holds no weibull-monitor state" in messages and "no monitor state for step 10" in messages
    with RunStore(tmp_path / "w.sqlite") as store:
        (run,) = store.runs()
        snapshots = store.snapshots(run["run_id"])
    assert [s["step"] for s in snapshots] == [15, 20]
    assert snapshots[0]["T_over_tau"] == pytest.approx(5 * LR * WD, rel=1e-9)
