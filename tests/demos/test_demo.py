"""``weibull-monitor demo --steps N``, end to end: real Trainer, real callback, offline W&B, TensorBoard, store, report."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

from weibull_monitor.cli import main

STEPS, EVERY = 12, 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    before = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "TENSORBOARD_LOGGING_DIR")}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--steps", str(STEPS), "--every", str(EVERY), "--out", str(out)]) == 0
    # The demo's environment (offline W&B under its output) does not leak into the caller's.
    assert {k: os.environ.get(k) for k in before} == before
    return out, printed.getvalue()


@pytest.mark.trains
@pytest.mark.slow
def test_demo_writes_store_report_and_dashboards(demo_run):
    from weibull_monitor.store import RunStore

    out, printed = demo_run
    with RunStore(out / "weibull.sqlite") as store:
        (run,) = store.runs()
        steps = store.steps(run["run_id"])
        aggregates = store.aggregates(run_id=run["run_id"], step=STEPS)
        first = store.aggregates(run_id=run["run_id"], step=0)
        snapshot = store.snapshots(run["run_id"])[-1]
    assert steps == [0, 3, 6, 9, 12]  # the initial weights, then every EVERY steps
    metrics = {row["metric"]: row["value"] for row in aggregates}
    # λ grows from the first snapshot (scale_growth is λ / λ at step 0; 1.011 for Transmission after 12 steps of the
    # demo's lr 1e-3).
    assert metrics["weibull/transmission/scale_growth"] > 1.002
    assert metrics["weibull/selection/scale_growth"] > 1.002
    # At initialisation every class sits at the Gaussian anchor.
    from weibull_monitor.estimator import K_GAUSSIAN

    assert abs({r["metric"]: r["value"] for r in first}["weibull/transmission/k_median"] - K_GAUSSIAN) < 0.02
    # T/τ = Σ η_t·λ_wd: STEPS updates at the demo's lr and weight decay (the one warm-up step runs at lr 0).
    from weibull_monitor.demos.demo import LEARNING_RATE, WEIGHT_DECAY

    assert snapshot["T_over_tau"] == pytest.approx(STEPS * LEARNING_RATE * WEIGHT_DECAY, rel=0.15)
    assert snapshot["attention_kind"] == "gqa"

    report = out / "report" / "index.html"
    assert report.is_file()
    figures = sorted(p.name for p in (out / "report").glob("*.png"))
    assert len(figures) == 5 and all(name in report.read_text() for name in figures)

    # TensorBoard: real event files holding the Weibull scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for event_file in (out / "tensorboard").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    assert "weibull/transmission/k_median" in tags
    assert any(tag.startswith("weibull/k/L0/") for tag in tags)

    # W&B: an offline run directory with its transaction log, nothing sent anywhere.
    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("run-*.wandb"))

    # The printed tour names every output and how to open it.
    for text in (
        str(report),
        "webbrowser",
        "weibull.sqlite",
        "tensorboard --logdir",
        "wandb sync",
        str(wandb_run),
    ):
        assert text in printed, text
    assert "alert rules evaluated at every snapshot: attention_logit_bound, scale_jump" in printed
    assert "median k" in printed and "scale λ x" in printed


def test_demo_rejects_bad_arguments(tmp_path):
    from weibull_monitor.demos.demo import run_demo

    with pytest.raises(ValueError, match="steps"):
        run_demo(steps=0, out=tmp_path)
    with pytest.raises(ValueError, match="every"):
        run_demo(steps=5, every=0, out=tmp_path)


def test_demo_dashboards_follow_what_is_installed(monkeypatch):
    import importlib.util

    from weibull_monitor.demos import demo

    assert demo._available_dashboards() == (["wandb", "tensorboard"], [])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert demo._available_dashboards() == (["tensorboard"], [("wandb", "wandb")])
