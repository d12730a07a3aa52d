"""Dashboard sinks against the real libraries and their real files: W&B offline run files, TensorBoard event
files, an MLflow file store, Lightning loggers (CSV, TensorBoard, W&B offline)."""

from __future__ import annotations

import csv
import glob
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from weibull_monitor.alerts import Alert
from weibull_monitor.models import Role

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


@dataclass(frozen=True)
class _Fit:
    """The fields of a WeibullFit the sinks read (a plain value object: the sinks own no math)."""

    k: float
    k_stderr: float = 0.02
    scale: float = 0.02
    r2: float = 0.997
    n: int = 4096
    ok: bool = True
    reason: str | None = None


@dataclass
class _Snapshot:
    step: int
    fits: dict
    roles: dict
    aggregates: dict = field(default_factory=dict)
    alerts: list = field(default_factory=list)
    attention_kind: str | None = "gqa"
    T_over_tau: float | None = None


COMPONENTS = {"q": "selection", "k": "selection", "o": "transmission", "ffn_up": "transmission"}


def snapshot_at(step: int, q_k: float = 1.2) -> _Snapshot:
    """Two layers of Q, K, W_o, FFN-up; W_q's k falls with the step so the heatmap has something to show."""
    fits, roles = {}, {}
    for layer in range(2):
        for component, klass in COMPONENTS.items():
            key = f"model.layers.{layer}.{component}"
            k = q_k - 0.005 * step if component == "q" else 1.2
            fits[key] = _Fit(k=k)
            roles[key] = Role(layer=layer, component=component, klass=klass)
    fits["model.embed_tokens.weight"] = _Fit(k=math.nan, ok=False, reason="too few elements")
    roles["model.embed_tokens.weight"] = Role(layer=None, component="embed", klass="other")
    return _Snapshot(step=step, fits=fits, roles=roles)


def metrics_at(step: int) -> dict[str, float]:
    return {
        "weibull/selection/k_median": 1.2 - 0.0025 * step,
        "weibull/transmission/k_median": 1.2,
        "weibull/k/L0/q": 1.2 - 0.005 * step,
        "weibull/k/L1/q": 1.2 - 0.005 * step,
    }


CRITICAL = Alert(
    step=20,
    rule="selection_collapse",
    level="critical",
    key="matrix",
    matrices=("model.layers.0.q", "model.layers.1.q"),
    values={"k_min": 0.5},
    message="2 Selection matrices below k 0.60",
)
STEPS = (5, 10, 15, 20)


def _feed(sink, steps=STEPS, alert=CRITICAL) -> None:
    for step in steps:
        sink.log_metrics(metrics_at(step), step)
        sink.log_snapshot(snapshot_at(step))
    if alert is not None:
        sink.log_alert(alert)


def _event_accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _layouts(accumulator) -> list:
    from tensorboard.plugins.custom_scalar import layout_pb2

    layouts = []
    for event in accumulator.Tensors("custom_scalars__config__"):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        layouts.append(layout)
    return layouts


def _wandb_file(root: Path) -> Path:
    """The finished offline run file under ``root`` (waits for W&B's service to flush it)."""
    from wandb_files import wait_for_run_file

    files = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    return wait_for_run_file(files[0])


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="weibull-tests", dir=str(tmp_path))
    yield run
    if wandb.run is not None:
        wandb.finish()


def test_tensorboard_sink_scalars_references_alert_and_one_layout_per_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from weibull_monitor.estimator import K_GAUSSIAN
    from weibull_monitor.sinks.tensorboard_sink import TensorBoardSink

    writer = SummaryWriter(log_dir=str(tmp_path / "shared"))
    first, second = TensorBoardSink(writer), TensorBoardSink(writer)  # two sinks, one writer: one layout
    _feed(first)
    second.log_metrics({"weibull/T_over_tau": 0.5}, 20)
    first.close()
    second.close()
    writer.close()  # a shared writer stays open after the sinks close: its owner closes it

    accumulator = _event_accumulator(tmp_path / "shared")
    medians = accumulator.Scalars("weibull/selection/k_median")
    assert [event.step for event in medians] == list(STEPS)
    assert medians[-1].value == pytest.approx(metrics_at(20)["weibull/selection/k_median"], abs=1e-6)
    assert [e.step for e in accumulator.Scalars("weibull/transmission/k_median")] == list(STEPS)
    assert [e.step for e in accumulator.Scalars("weibull/k/L1/q")] == list(STEPS)
    anchor = accumulator.Scalars("weibull/ref/k_gaussian")
    assert [e.step for e in anchor] == list(STEPS)
    assert anchor[0].value == pytest.approx(K_GAUSSIAN, abs=1e-6)
    assert accumulator.Scalars("weibull/ref/transmission_band_low")[0].value == pytest.approx(1.186)  # as the report
    assert accumulator.Scalars("weibull/ref/selection_band_low")[0].value == pytest.approx(1.10)  # GQA: mild
    assert [(e.step, e.value) for e in accumulator.Scalars("weibull/alerts/critical")] == [(20, 1.0)]

    layouts = _layouts(accumulator)
    assert len(layouts) == 1
    charts = {chart.title: chart for category in layouts[0].category for chart in category.chart}
    medians_chart = next(c for title, c in charts.items() if title.startswith("k median of Selection"))
    assert {"weibull/selection/k_median", "weibull/transmission/k_median", "weibull/ref/k_gaussian"} <= set(
        medians_chart.multiline.tag
    )
    band = charts["Transmission k median inside its band"].margin.series[0]
    assert (band.value, band.lower, band.upper) == (
        "weibull/transmission/k_median",
        "weibull/ref/transmission_band_low",
        "weibull/ref/transmission_band_high",
    )
    assert list(charts["k per layer: q"].multiline.tag) == [r"^weibull/k/L\d+/q$"]


def test_tensorboard_sink_owns_a_writer_made_from_log_dir(tmp_path):
    from weibull_monitor.sinks.tensorboard_sink import TensorBoardSink

    sink = TensorBoardSink(log_dir=str(tmp_path / "own"))
    _feed(sink, steps=(5,), alert=None)
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.log_metrics({"weibull/T_over_tau": 1.0}, 6)
    accumulator = _event_accumulator(tmp_path / "own")
    assert [e.step for e in accumulator.Scalars("weibull/transmission/k_median")] == [5]
    assert len(_layouts(accumulator)) == 1
    with pytest.raises(ValueError, match="writer or a log_dir"):
        TensorBoardSink()


def test_wandb_sink_offline_file_holds_metrics_table_heatmap_and_alert(tmp_path, wandb_offline):
    import wandb
    from wandb_files import read_run_alerts, read_run_history

    from weibull_monitor.sinks.wandb_sink import WandbSink

    sink = WandbSink(heatmap_every=2, alert_wait_s=120)
    _feed(sink)
    sink.close()
    run_dir = Path(wandb_offline.dir).parent
    wandb.finish()

    history = read_run_history(_wandb_file(tmp_path))
    metric_rows = [row for row in history if "weibull/selection/k_median" in row]
    assert [row["train/global_step"] for row in metric_rows] == list(STEPS)
    assert metric_rows[-1]["weibull/selection/k_median"] == pytest.approx(
        metrics_at(20)["weibull/selection/k_median"]
    )
    table_rows = [row for row in history if row.get("weibull/fits/_type") == "table-file"]
    assert [row["train/global_step"] for row in table_rows] == list(STEPS)
    assert all(row["weibull/fits/nrows"] == 9 for row in table_rows)  # 8 fits + the not-ok embedding
    heatmaps = [row for row in history if row.get("weibull/k_heatmap/_type") == "image-file"]
    assert [row["train/global_step"] for row in heatmaps] == [10, 20]  # every 2nd snapshot
    assert all((run_dir / "files" / row["weibull/k_heatmap/path"]).stat().st_size > 1000 for row in heatmaps)
    assert [row["weibull/alerts/critical"] for row in history if "weibull/alerts/critical" in row] == [1]

    alerts = read_run_alerts(_wandb_file(tmp_path))
    assert alerts == [
        {
            "title": "weibull-monitor critical: selection_collapse",
            "text": "step 20: 2 Selection matrices below k 0.60 [model.layers.0.q, model.layers.1.q]",
            "level": "ERROR",
            "wait_duration_s": 120.0,
        }
    ]


def test_wandb_sink_level_mapping_and_missing_run(tmp_path, wandb_offline):
    import wandb
    from wandb_files import read_run_alerts

    from weibull_monitor.sinks.wandb_sink import WandbSink

    sink = WandbSink(wandb_offline, step_metric="trainer/global_step", table_every=0, heatmap_every=0)
    for level in ("info", "warning", "critical"):
        sink.log_alert(Alert(7, f"rule_{level}", level, "key", (), {}, f"{level} message"))
    sink.log_snapshot(snapshot_at(7))  # tables and heatmaps off: nothing logged
    wandb.finish()
    assert [a["level"] for a in read_run_alerts(_wandb_file(tmp_path))] == ["INFO", "WARN", "ERROR"]
    with pytest.raises(RuntimeError, match="no active W&B run"):
        WandbSink().log_metrics({"weibull/T_over_tau": 1.0}, 1)
    with pytest.raises(ValueError):
        WandbSink(heatmap_every=-1)


def test_wandb_sink_without_matplotlib_skips_the_heatmap_visibly(
    tmp_path, wandb_offline, monkeypatch, caplog
):
    import sys

    import wandb
    from wandb_files import read_run_history

    from weibull_monitor.sinks.wandb_sink import WandbSink

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if the `plot` extra were not installed
    sink = WandbSink(table_every=1, heatmap_every=1)
    sink.log_snapshot(snapshot_at(5))
    assert sink.heatmap_every == 0
    assert "no k heatmap without matplotlib" in caplog.text
    wandb.finish()
    history = read_run_history(_wandb_file(tmp_path))
    assert [r["train/global_step"] for r in history if r.get("weibull/fits/_type") == "table-file"] == [5]
    assert not any("weibull/k_heatmap/_type" in r for r in history)


def test_k_heatmap_groups_layers_by_step():
    from weibull_monitor.sinks.heatmap import KHistory, render_k_heatmap

    history = KHistory()
    for step in STEPS:
        history.add(snapshot_at(step))
    layers, steps, rows = history.matrix("Q")
    assert layers == [0, 1] and steps == list(STEPS)
    assert rows[0] == pytest.approx([1.2 - 0.005 * s for s in STEPS])
    assert history.matrix("FFN")[2] == [[1.2] * 4, [1.2] * 4]
    pixels = render_k_heatmap(history, anchor=1.2054)
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.std() > 0


def test_mlflow_sink_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from weibull_monitor.sinks.mlflow_sink import MLflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("weibull-sink-tests")  # not one an earlier test left active in another store
        with mlflow.start_run() as run:
            sink = MLflowSink()  # the active run
            _feed(sink)
            sink.close()
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run.info.run_id, "weibull/selection/k_median")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(STEPS)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "weibull/alerts/critical")] == [20]
    assert "selection_collapse" in client.get_run(run.info.run_id).data.tags["weibull.last_alert"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "weibull/fits")]
    assert artifacts == [f"weibull/fits/step_{s:08d}.json" for s in STEPS]
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        MLflowSink(tracking_uri=uri).log_metrics({"weibull/T_over_tau": 1.0}, 1)


def test_lightning_logger_sink_csv_tensorboard_and_wandb_loggers(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    import wandb
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from wandb_files import read_run_alerts, read_run_history

    from weibull_monitor.sinks.lightning_sink import LightningLoggerSink

    csv_logger = CSVLogger(str(tmp_path), name="csv")
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_logger = WandbLogger(project="weibull-tests", save_dir=str(tmp_path), offline=True)
    sinks = [LightningLoggerSink(logger) for logger in (csv_logger, tb_logger, wandb_logger)]
    assert [sink.run_in_thread for sink in sinks] == [False, True, True]  # CSV rows are not thread-safe
    for sink in sinks:
        _feed(sink)
    for sink in sinks:
        sink.close()
    csv_logger.save()
    tb_logger.finalize("success")
    wandb.finish()

    with open(csv_logger.experiment.metrics_file_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = [
        (int(r["step"]), float(r["weibull/selection/k_median"]))
        for r in rows
        if r["weibull/selection/k_median"]
    ]
    assert [step for step, _ in logged] == list(STEPS)
    assert [float(r["weibull/alerts/critical"]) for r in rows if r.get("weibull/alerts/critical")] == [1.0]

    accumulator = _event_accumulator(Path(tb_logger.log_dir))
    assert [e.step for e in accumulator.Scalars("weibull/transmission/k_median")] == list(STEPS)
    assert [e.step for e in accumulator.Scalars("weibull/ref/k_gaussian")] == list(STEPS)
    assert len(_layouts(accumulator)) == 1

    wandb_file = _wandb_file(tmp_path)
    history = read_run_history(wandb_file)
    assert [r["trainer/global_step"] for r in history if "weibull/selection/k_median" in r] == list(STEPS)
    assert any(r.get("weibull/fits/_type") == "table-file" for r in history)
    assert [a["level"] for a in read_run_alerts(wandb_file)] == ["ERROR"]
    with pytest.raises(TypeError, match="log_metrics"):
        LightningLoggerSink(object())
