"""Rewind with the real HF Trainer (the trial of the issue: a GPT-2 config, gradient accumulation 2, every=5,
save_steps=10): train to step 30, then resume from checkpoint-20 to step 40 with another learning rate, as after a
loss spike. The store's live series equals the resumed run's own snapshots step for step and its superseded branch
the abandoned run's; TensorBoard (real event files) shows each step once with the live values; each W&B offline run
holds each step once; the alert counters and T/τ at step 20 are those of the checkpoint."""

from __future__ import annotations

import glob
import logging
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from readback import stored_series, tensorboard_events
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from weibull_monitor.alerts import Breach, Rule
from weibull_monitor.demos.toy import ByteWindowDataset
from weibull_monitor.integrations.hf import WeibullCallback
from weibull_monitor.sinks import Sink
from weibull_monitor.store import RunStore

# These tests train (optimizer steps): .ci/run runs them again under another ATEN_CPU_CAPABILITY.
pytestmark = pytest.mark.trains

EVERY, WD = 5, 0.1


class Recorder(Sink):
    def __init__(self) -> None:
        self.rows: dict[int, tuple[dict, dict]] = {}
        self.alerts: list[tuple[int, str]] = []

    def log_snapshot(self, snapshot) -> None:
        assert snapshot.step not in self.rows  # one run never sends a step twice
        self.rows[snapshot.step] = (dict(snapshot.aggregates), {n: f.k for n, f in snapshot.fits.items()})

    def log_alert(self, alert) -> None:
        self.alerts.append((alert.step, alert.rule))


class Every3rd(Rule):
    """Breaches at every snapshot; fires at the 3rd in a row, then at most every 10 steps: when it fires depends on
    the restored counters (streak, last fired)."""

    name, level, patience, cooldown = "streak", "warning", 3, 10

    def evaluate(self, snapshot):
        return [Breach("all", (), {}, "streak")]


class LowerLR(TrainerCallback):
    """After a rollback: a lower learning rate. The Trainer restores the optimizer and scheduler from the checkpoint
    (``args.learning_rate`` does not change them), so it is set on the restored ones, as a user would."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = self.lr
        lr_scheduler.base_lrs = [self.lr] * len(optimizer.param_groups)


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2))


def trainer(output: Path, callbacks: list, max_steps: int, data_seed: int) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        weight_decay=WD,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=["tensorboard", "wandb"],
        logging_steps=5,
        save_strategy="steps",
        save_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
    )
    data = ByteWindowDataset(n_samples=4 * 2 * max_steps, seq_len=32, seed=data_seed)
    return Trainer(model=gpt2(), args=args, train_dataset=data, callbacks=callbacks)


def test_hf_rewind_to_an_earlier_checkpoint_with_another_learning_rate(tmp_path, monkeypatch):
    import wandb
    from wandb_files import read_run_config, read_run_history, wait_for_run_file

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    output = tmp_path / "out"
    a, b = Recorder(), Recorder()
    runs = []
    plan = (
        (a, 30, [], 0, None),
        (b, 40, [LowerLR(3e-4)], 1, output / "checkpoint-20"),
    )  # other lr, other data
    for recorder, steps, extra, data_seed, resume in plan:
        callback = WeibullCallback(every=EVERY, rules=[Every3rd()], sinks=[recorder])
        run = wandb.init(project="weibull-rewind", dir=str(tmp_path))  # what the Trainer's W&B callback uses
        runs.append(run.id)
        try:
            trainer(output, [callback, *extra], steps, data_seed).train(
                resume_from_checkpoint=None if resume is None else str(resume)
            )
        finally:
            wandb.finish()
        time.sleep(1.1)  # the Trainer names TensorBoard folders (and W&B offline ones) to the second
    assert sorted(a.rows) == list(range(0, 31, 5)) and sorted(b.rows) == [25, 30, 35, 40]

    with RunStore(output / "weibull.sqlite") as store:
        (run,) = store.runs()
        live = stored_series(store, run["run_id"])
        expected = {**{s: r for s, r in a.rows.items() if s <= 20}, **b.rows}
        assert live == expected  # 0 mixed, 0 dropped: each step from the timeline that owns it
        assert stored_series(store, run["run_id"], branch=0) == a.rows  # the abandoned run, whole
        (rewind,) = store.rewinds(run["run_id"])
        assert (rewind["step"], rewind["superseded_first"], rewind["superseded_last"]) == (20, 25, 30)
        alerts = [(x["step"], x["rule"]) for x in store.alerts(run["run_id"])]
        abandoned_alerts = [(x["step"], x["rule"]) for x in store.alerts(run["run_id"], branch=0)]
    # counters restored at 20 (fired at 20): the resumed run fires at 30 and 40, as an uninterrupted one would
    assert a.alerts == abandoned_alerts == [(10, "streak"), (20, "streak"), (30, "streak")]
    assert b.alerts == [(30, "streak"), (40, "streak")]
    assert alerts == [(10, "streak"), (20, "streak"), (30, "streak"), (40, "streak")]
    t20 = a.rows[20][0]["weibull/T_over_tau"]
    assert b.rows[25][0]["weibull/T_over_tau"] == pytest.approx(t20 + 5 * 3e-4 * WD, rel=1e-9)

    # TensorBoard: one directory per Trainer (the Trainer's choice); the abandoned points after 20 are hidden
    old_dir, new_dir = sorted(glob.glob(str(output / "runs" / "*")), key=os.path.getmtime)
    assert any(".weibull-purge-21" in name for name in os.listdir(old_dir))
    old, new = tensorboard_events(old_dir), tensorboard_events(new_dir)
    metric = "weibull/transmission/k_median"
    assert [p.step for p in old.Scalars(metric)] == [0, 5, 10, 15, 20]
    assert [p.step for p in new.Scalars(metric)] == [25, 30, 35, 40]
    for point in [*old.Scalars(metric), *new.Scalars(metric)]:
        assert point.value == pytest.approx(live[point.step][0][metric], rel=1e-6)
    assert max(p.step for p in old.Scalars("train/loss")) <= 20  # the Trainer's own abandoned points too

    # W&B: the Trainer starts a new run per train(); each holds each step once; the resumed one notes the rewind
    directories = [glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))[0] for run_id in runs]
    histories = [read_run_history(wait_for_run_file(d)) for d in directories]  # a run directory is accepted
    steps = [[r["train/global_step"] for r in h if metric in r] for h in histories]
    assert steps == [[0, 5, 10, 15, 20, 25, 30], [25, 30, 35, 40]]
    (note,) = read_run_config(directories[1])["weibull_rewinds"]
    assert (
        note["step"] == 20 and note["superseded_steps"] == [25, 30] and note["superseded_runs"] == [runs[0]]
    )
    assert "weibull_rewinds" not in read_run_config(directories[0])


def small_trainer(output: Path, callbacks: list, max_steps: int, save_steps: int = 500) -> Trainer:
    from weibull_monitor.demos.toy import tiny_llama

    args = TrainingArguments(
        output_dir=str(output),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=WD,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=save_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    data = ByteWindowDataset(n_samples=4 * max_steps, seq_len=32)
    return Trainer(model=tiny_llama(0), args=args, train_dataset=data, callbacks=callbacks)


def test_hf_resume_from_a_checkpoint_without_monitor_state(tmp_path, caplog):
    """The first training ran without the callback: the resumed one starts a run at step 10, and says so."""
    output = tmp_path / "out"
    small_trainer(output, [], 20, save_steps=10).train()
    with caplog.at_level(logging.WARNING):
        small_trainer(output, [WeibullCallback(every=EVERY)], 20).train(
            resume_from_checkpoint=str(output / "checkpoint-10")
        )
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "holds no weibull-monitor state" in messages
    assert "no monitor state for step 10: scale growth is measured from the next snapshot" in messages
    with RunStore(output / "weibull.sqlite") as store:
        (run,) = store.runs()
        snapshots = store.snapshots(run["run_id"])
    assert [s["step"] for s in snapshots] == [15, 20]
    assert snapshots[0]["T_over_tau"] == pytest.approx(5 * 1e-3 * WD, rel=1e-9)  # counted from step 10


def test_hf_new_training_in_an_old_output_dir(tmp_path, caplog):
    """No resume: a new run beside the old one (default run_name), or, under the old run's name, a restart that
    keeps the old timeline as a superseded branch. Both say so."""
    output = tmp_path / "out"
    small_trainer(output, [WeibullCallback(every=EVERY, run_name="exp")], 10).train()
    with caplog.at_level(logging.INFO, logger="weibull_monitor"):
        small_trainer(output, [WeibullCallback(every=EVERY)], 10).train()
    assert any("already holds 1 other run(s) (last: 'exp')" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        small_trainer(output, [WeibullCallback(every=EVERY, run_name="exp")], 5).train()
    assert any("'exp' restarted at step -1" in r.getMessage() for r in caplog.records)
    with RunStore(output / "weibull.sqlite") as store:
        runs = {r["name"]: r["run_id"] for r in store.runs()}
        assert len(runs) == 2
        assert store.steps(runs["exp"]) == [0, 5] and store.steps(runs["exp"], branch=0) == [0, 5, 10]
        (other,) = [run for name, run in runs.items() if name != "exp"]
        assert store.steps(other) == [0, 5, 10]
