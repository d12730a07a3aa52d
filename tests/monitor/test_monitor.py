"""WeibullMonitor end to end on a real tiny LLaMA: training loop, store, sinks, faults, resume."""

from __future__ import annotations

import io
import logging
import math
import sqlite3
import statistics
import threading

import pytest
import torch

from weibull_monitor.demos.toy import byte_batches, tiny_llama
from weibull_monitor.estimator import K_GAUSSIAN
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.sinks import LoggingSink, Sink
from weibull_monitor.store import RunStore

CLASS_METRICS = ("k_median", "k_drift", "scale_median", "scale_growth")


class ListSink(Sink):
    """A real sink that keeps what it receives (as a dashboard would)."""

    def __init__(self):
        self.metrics, self.alerts, self.snapshots = [], [], []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_alert(self, alert):
        self.alerts.append(alert)

    def log_snapshot(self, snapshot):
        self.snapshots.append(snapshot.step)


def decay_groups(model, weight_decay):
    """The usual AdamW grouping: decay matrices, not norms."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer, warmup, total):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model, optimizer, scheduler, monitor, steps, batches, lr_log=None, start=1):
    for step in range(start, start + steps):
        ids = next(batches)
        model(input_ids=ids, labels=ids).loss.backward()
        if lr_log is not None:
            lr_log.append(scheduler.get_last_lr()[0])  # the lr this update uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        monitor.observe(step)


@pytest.mark.trains
@pytest.mark.slow
def test_two_settings_200_steps_store_matches_schedule_and_recomputation(tmp_path):
    path = tmp_path / "w.sqlite"
    steps, every = 200, 25
    due = list(range(0, steps + 1, every))
    for lr, wd in ((1e-3, 0.1), (3e-3, 0.02)):
        model = tiny_llama(0)
        optimizer = torch.optim.AdamW(decay_groups(model, wd), lr=lr)
        scheduler = cosine_with_warmup(optimizer, 20, steps)
        run_name = f"lr{lr}-wd{wd}"
        lrs = []
        with WeibullMonitor(model, optimizer, every=every, store=path, run_name=run_name) as monitor:
            monitor.observe(0)
            train(model, optimizer, scheduler, monitor, steps, byte_batches(4, 32, seed=1), lrs)
            watched = set(monitor.roles)
        with RunStore(path) as store:
            run = store.run_id(run_name)
            snapshots = store.snapshots(run)
            assert [s["step"] for s in snapshots] == due
            fits_at = {s: store.fits(step=s, run_id=run) for s in due}
            aggregates = store.aggregates(run)
        assert len(watched) == 2 * 7 + 2  # 7 projections per layer, embeddings, lm_head
        for rows in fits_at.values():
            assert {r["name"] for r in rows} == watched and all(r["ok"] for r in rows)
        # T/tau: the sum over updates of the scheduler's lr times weight decay
        for snap in snapshots:
            expected = (
                sum(lrs[: snap["step"]]) * wd if False else math.fsum(x * wd for x in lrs[: snap["step"]])
            )
            if snap["step"] == 0:
                assert snap["T_over_tau"] in (None, 0.0)
            else:
                assert snap["T_over_tau"] == pytest.approx(expected, rel=1e-9)
        # aggregates recomputed from the stored fits alone
        first_scale = {r["name"]: r["scale"] for r in fits_at[0]}
        by_step = {}
        for row in aggregates:
            by_step.setdefault(row["step"], {})[row["metric"]] = row["value"]
        for step, rows in fits_at.items():
            agg = by_step[step]
            for klass in ("selection", "transmission", "value", "other"):
                members = [r for r in rows if r["klass"] == klass and r["in_aggregates"] and r["ok"]]
                k_med = statistics.median(r["k"] for r in members)
                growth = statistics.median(r["scale"] / first_scale[r["name"]] for r in members)
                assert agg[f"weibull/{klass}/k_median"] == pytest.approx(k_med, rel=1e-12)
                assert agg[f"weibull/{klass}/k_drift"] == pytest.approx(k_med - K_GAUSSIAN, abs=1e-12)
                assert agg[f"weibull/{klass}/scale_median"] == pytest.approx(
                    statistics.median(r["scale"] for r in members), rel=1e-12
                )
                assert agg[f"weibull/{klass}/scale_growth"] == pytest.approx(growth, rel=1e-9)
            for r in rows:
                assert agg[r["metric_key"]] == pytest.approx(r["k"], rel=1e-12)
            if step:
                assert agg["weibull/T_over_tau"] == pytest.approx(
                    next(s["T_over_tau"] for s in snapshots if s["step"] == step), rel=1e-12
                )
        assert by_step[steps]["weibull/transmission/scale_growth"] > 1.0


def make(tmp_path, **kw):
    model = tiny_llama(0)
    optimizer = torch.optim.AdamW(decay_groups(model, 0.1), lr=1e-3)
    kw.setdefault("store", tmp_path / "w.sqlite")
    kw.setdefault("rules", [])
    return model, optimizer, WeibullMonitor(model, optimizer, **kw)


def step_once(model, optimizer, batches):
    ids = next(batches)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.trains
def test_observe_due_steps_once_and_per_micro_batch(tmp_path):
    model, optimizer, monitor = make(tmp_path, every=3)
    batches = byte_batches(2, 16)
    taken = []
    for step in range(0, 8):
        if step:
            step_once(model, optimizer, batches)
        for _ in range(3):  # e.g. a per-micro-batch hook repeating the same optimizer step
            snap = monitor.observe(step)
            if snap is not None:
                taken.append(snap.step)
    assert taken == [0, 3, 6]
    assert monitor.budget.updates == 7
    assert monitor.last_snapshot.T_over_tau == pytest.approx(6 * 1e-3 * 0.1, rel=1e-12)
    monitor.close()
    with RunStore(tmp_path / "w.sqlite") as store:
        assert store.steps() == [0, 3, 6]


@pytest.mark.trains
def test_no_weight_decay_reports_missing_never_inf(tmp_path):
    model = tiny_llama(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    with WeibullMonitor(model, optimizer, every=1, store=None) as monitor:
        step_once(model, optimizer, byte_batches(2, 16))
        snap = monitor.observe(1)
    assert snap.T_over_tau is None and "weibull/T_over_tau" not in snap.aggregates
    assert not any(k.endswith("scale_over_sqrt_lr_wd") for k in snap.aggregates)
    assert all(math.isfinite(v) for v in snap.aggregates.values())
    assert all(math.isnan(s.T_over_tau) for s in snap.matrices.values())


def test_optimizer_without_hooks_counts_skipped_steps_at_current_lr(tmp_path):
    class PlainSGD:  # an optimizer that is no torch.optim.Optimizer: no step hooks
        def __init__(self, params, lr, weight_decay):
            self.param_groups = [{"params": list(params), "lr": lr, "weight_decay": weight_decay}]

    model = tiny_llama(0)
    optimizer = PlainSGD(model.parameters(), 2e-3, 0.5)
    with WeibullMonitor(model, optimizer, every=10, store=None, rules=[]) as monitor:
        monitor.observe(0)
        monitor.observe(4)  # steps 1-4 counted at the current lr
        optimizer.param_groups[0]["lr"] = 1e-3
        snap = monitor.observe(10)
    assert snap.T_over_tau == pytest.approx(4 * 2e-3 * 0.5 + 6 * 1e-3 * 0.5, rel=1e-12)


def test_fused_qkv_model_reports_parent_and_split_views(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    with WeibullMonitor(model, store=None, rules=[]) as monitor:
        snap = monitor.snapshot(0)
    parent = "gpt_neox.layers.1.attention.query_key_value.weight"
    for component in ("q", "k", "v"):
        key = f"{parent}[{component}]"
        assert snap.fits[key].ok and snap.roles[key].fused_parent == parent
        assert snap.aggregates[f"weibull/k/L1/{component}"] == snap.fits[key].k
    assert snap.aggregates["weibull/k/L1/qkv"] == snap.fits[parent].k
    assert not snap.matrices[parent].in_aggregates
    selection = [
        k for k, r in snap.roles.items() if r.klass == "selection" and snap.matrices[k].in_aggregates
    ]
    assert len(selection) == 4 and all("[" in k for k in selection)
    assert snap.attention_kind == "fused" and snap.expectation == "transitional"


def test_include_exclude(tmp_path):
    model = tiny_llama(0)
    with WeibullMonitor(model, store=None, include="*self_attn*", exclude=["*.v_proj.*"]) as monitor:
        snap = monitor.snapshot(0)
    assert {r.component for r in snap.roles.values()} == {"q", "k", "o"}
    with pytest.raises(ValueError):
        WeibullMonitor(model, every=0, store=None)
    with pytest.raises(TypeError):
        WeibullMonitor("not a model", store=None)


@pytest.mark.trains
def test_logging_sink_line_and_guarded_sinks(tmp_path, caplog):
    stream = io.StringIO()

    class Broken(Sink):
        def __init__(self):
            self.fail = True
            self.ok_steps = []

        def log_metrics(self, metrics, step):
            if self.fail:
                raise ConnectionError("dashboard down")
            self.ok_steps.append(step)

    broken, kept = Broken(), ListSink()
    model, optimizer, monitor = make(tmp_path, every=1, sinks=[LoggingSink(stream=stream), broken, kept])
    batches = byte_batches(2, 16)
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        for step in range(0, 4):
            if step:
                step_once(model, optimizer, batches)
            if step == 3:
                broken.fail = False  # the fault clears
            monitor.observe(step)
        assert monitor.flush(timeout=10)
    monitor.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[1].startswith("weibull step 1 | selection k ")
    assert "transmission k" in lines[1] and "T/tau 0.0001" in lines[1]
    failures = [r for r in caplog.records if "dashboard down" in r.getMessage()]
    assert len(failures) == 1 and "failed in log_metrics" in failures[0].getMessage()  # once, with its cause
    assert any("recovered in log_metrics after 3 failed calls" in r.getMessage() for r in caplog.records)
    assert broken.ok_steps == [3]
    assert [s for s, _ in kept.metrics] == [0, 1, 2, 3] and kept.snapshots == [0, 1, 2, 3]
    with RunStore(tmp_path / "w.sqlite") as store:
        assert store.steps() == [0, 1, 2, 3]


def test_hanging_sink_does_not_block_training(tmp_path, caplog):
    release = threading.Event()

    class Hanging(Sink):
        def __init__(self):
            self.steps = []

        def log_metrics(self, metrics, step):
            release.wait(30)
            self.steps.append(step)

    hanging, kept = Hanging(), ListSink()
    _, _, monitor = make(tmp_path, every=1, sinks=[hanging, kept], sink_timeout=0.05)
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        monitor.observe(0)
        for step in range(1, 4):
            threading.Event().wait(0.1)  # let the hang outlast the timeout before the next call
            monitor.observe(step)
        # training went through 4 snapshots while the first sink call is still blocked
        assert not release.is_set() and hanging.steps == []
        assert any("has not returned from log_metrics" in r.getMessage() for r in caplog.records)
        release.set()
        assert monitor.flush(timeout=10)
    monitor.close()
    assert hanging.steps == [0, 1, 2, 3] and len(kept.metrics) == 4
    assert monitor.sinks[0].healthy


@pytest.mark.trains
def test_locked_store_does_not_stop_training_and_catches_up(tmp_path, caplog):
    path = tmp_path / "w.sqlite"
    model, optimizer, monitor = make(tmp_path, every=1, store=RunStore(path, timeout=0.05), run_name="r")
    monitor.observe(0)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    batches = byte_batches(2, 16)
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        for step in (1, 2):
            step_once(model, optimizer, batches)
            assert monitor.observe(step) is not None
        blocker.execute("ROLLBACK")
        blocker.close()
        step_once(model, optimizer, batches)
        monitor.observe(3)
    monitor.close()
    assert sum("write failed" in r.getMessage() for r in caplog.records) == 1
    with RunStore(path) as store:
        assert store.steps() == [0, 1, 2, 3]


@pytest.mark.trains
def test_resume_from_state_dict_and_from_store(tmp_path):
    path = tmp_path / "w.sqlite"
    model, optimizer, monitor = make(tmp_path, every=2, run_name="resumable")
    batches = byte_batches(2, 16)
    monitor.observe(0)
    for step in range(1, 5):
        step_once(model, optimizer, batches)
        monitor.observe(step)
    state = monitor.state_dict()
    first = dict(monitor.scale_first)
    t_before = monitor.last_snapshot.T_over_tau
    monitor.close()

    # resume from a checkpointed state (a fresh monitor, e.g. after a restart)
    again = WeibullMonitor(model, optimizer, every=2, store=path, rules=[])
    again.load_state_dict(state)
    assert again.run_name == "resumable" and again.scale_first == first
    assert again.observe(4) is None  # already taken before the restart
    for step in range(5, 7):
        step_once(model, optimizer, batches)
        again.observe(step)
    assert again.last_snapshot.T_over_tau == pytest.approx(t_before + 2 * 1e-4, rel=1e-12)
    again.close()

    # resume from the store alone: same run name restores the state written with the last snapshot
    third = WeibullMonitor(model, optimizer, every=2, store=path, run_name="resumable", rules=[])
    assert third.scale_first == first and third.state_dict()["last_snapshot_step"] == 6
    third.close()
    with RunStore(path) as store:
        assert [r["name"] for r in store.runs()] == ["resumable"]
        assert store.steps() == [0, 2, 4, 6]


def test_writer_false_writes_nothing(tmp_path):
    sink = ListSink()
    _, _, monitor = make(tmp_path, every=1, sinks=[sink], writer=False)
    snap = monitor.observe(0)
    monitor.close()
    assert snap is not None and snap.fits
    assert not (tmp_path / "w.sqlite").exists() and sink.metrics == []


def test_failing_snapshot_never_raises_from_observe(tmp_path, caplog):
    _, _, monitor = make(tmp_path, every=1, store=None, overrides={"(": "q"})  # invalid regex
    with caplog.at_level(logging.WARNING, logger="weibull_monitor"):
        assert monitor.observe(0) is None
        assert monitor.observe(1) is None
    assert sum("snapshot at step" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(Exception):  # noqa: B017 - a forced snapshot does raise
        monitor.snapshot(2)
    monitor.close()
